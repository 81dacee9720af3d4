//! The shape docs/architecture.md describes, held against the code:
//! - the api's modules (one per file) import each other in no cycle;
//! - no source file of the api is longer than 600 lines (tests aside);
//! - in the resource folders (`vms/`, `volumes/`, `networks/`, `images/`, `identity/`)
//!   domain errors are typed, and the public error envelope (`socket_http::ApiError`) is
//!   named only at the edge: in the folder's `http.rs` (the handlers) and `error.rs`
//!   (the one conversion of its error into the envelope); tests aside;
//! - no daemon depends on another daemon, on the api, or on utoipa (so no daemon wire
//!   type can appear in the public document), with dev-dependencies too (`cargo metadata`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const MAX_LINES: usize = 600;

/// The folders of the public resources, whose errors are typed.
const RESOURCE_FOLDERS: [&str; 6] = ["vms", "volumes", "networks", "images", "identity", "databases"];

/// The files of a resource folder that may name the public error envelope.
const EDGE_FILES: [&str; 2] = ["http.rs", "error.rs"];

fn api_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read_dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `vms/http.rs` is `vms::http`, `vms/mod.rs` is `vms`, `lib.rs` is the crate root.
fn module_of(file: &Path) -> Option<String> {
    let rel = file.strip_prefix(api_src()).ok()?;
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.first().is_some_and(|p| p == "bin") {
        return None;
    }
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    Some(parts.join("::"))
}

/// The source without comments and string literals, so that paths in docs and
/// messages are not taken for imports, and without `#[cfg(test)]` modules.
fn code_of(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '"' => {
                let mut escaped = false;
                for c in chars.by_ref() {
                    match c {
                        '\\' if !escaped => escaped = true,
                        '"' if !escaped => break,
                        _ => escaped = false,
                    }
                }
                out.push_str("\"\"");
            }
            _ => out.push(c),
        }
    }
    match out.find("#[cfg(test)]") {
        Some(i) => out[..i].to_string(),
        None => out,
    }
}

/// Every path a file names, with `use` groups expanded: `crate::{a, b::{c, d}}` gives
/// `crate::a`, `crate::b::c`, `crate::b::d`.
fn paths_in(code: &str) -> Vec<String> {
    fn expand(prefix: &str, group: &str, out: &mut Vec<String>) {
        let mut depth = 0;
        let mut start = 0;
        let bytes = group.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'{' => depth += 1,
                b'}' => depth -= 1,
                b',' if depth == 0 => {
                    one(prefix, &group[start..i], out);
                    start = i + 1;
                }
                _ => {}
            }
        }
        one(prefix, &group[start..], out);
    }
    fn one(prefix: &str, item: &str, out: &mut Vec<String>) {
        let item = item.trim();
        if item.is_empty() {
            return;
        }
        match item.find('{') {
            Some(i) => {
                let inner = item[i + 1..].trim_end().trim_end_matches('}');
                expand(&format!("{prefix}{}", &item[..i]), inner, out);
            }
            None => out.push(format!("{prefix}{item}")),
        }
    }
    let mut out = Vec::new();
    for start in ["crate::", "super::"] {
        let mut rest = code;
        while let Some(i) = rest.find(start) {
            let before = rest[..i].chars().last();
            rest = &rest[i..];
            let len = rest
                .char_indices()
                .find(|&(_, c)| !(c.is_alphanumeric() || c == '_' || c == ':'))
                .map_or(rest.len(), |(n, _)| n);
            let path = &rest[..len];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                rest = &rest[len..];
                continue;
            }
            if rest[len..].starts_with('{') {
                let mut depth = 0;
                let end = rest[len..]
                    .char_indices()
                    .find(|&(_, c)| {
                        depth += match c {
                            '{' => 1,
                            '}' => -1,
                            _ => 0,
                        };
                        depth == 0
                    })
                    .map_or(rest.len() - len, |(n, _)| n);
                expand(path, &rest[len + 1..len + end], &mut out);
                rest = &rest[len + end..];
            } else {
                out.push(path.to_string());
                rest = &rest[len..];
            }
        }
    }
    out
}

/// The module a path leads into: its longest prefix that is a module of the crate.
fn target(path: &str, from: &str, modules: &BTreeSet<String>) -> Option<String> {
    let absolute = if let Some(rest) = path.strip_prefix("crate::") {
        rest.to_string()
    } else {
        let mut base: Vec<&str> = from.split("::").filter(|s| !s.is_empty()).collect();
        let mut rest = path;
        while let Some(r) = rest.strip_prefix("super::") {
            base.pop();
            rest = r;
        }
        base.push(rest);
        base.join("::")
    };
    let segments: Vec<&str> = absolute.split("::").filter(|s| !s.is_empty()).collect();
    (1..=segments.len())
        .rev()
        .map(|n| segments[..n].join("::"))
        .find(|m| modules.contains(m))
}

/// The api's import graph: module -> the modules it names.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let mut files = Vec::new();
    rust_files(&api_src(), &mut files);
    let sources: Vec<(String, String)> = files
        .iter()
        .filter_map(|f| Some((module_of(f)?, std::fs::read_to_string(f).expect("read"))))
        .collect();
    let modules: BTreeSet<String> = sources.iter().map(|(m, _)| m.clone()).collect();
    let mut graph = BTreeMap::new();
    for (module, text) in &sources {
        let edges: BTreeSet<String> = paths_in(&code_of(text))
            .iter()
            .filter_map(|p| target(p, module, &modules))
            // Itself is no import, and the crate root only declares modules.
            .filter(|t| t != module && !module.is_empty())
            .collect();
        graph.insert(module.clone(), edges);
    }
    graph
}

/// Tarjan's strongly connected components of more than one module.
fn cycles(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        found: Vec<Vec<String>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            let n = self.index.len();
            self.index.insert(v, n);
            self.low.insert(v, n);
            self.stack.push(v);
            self.on_stack.insert(v);
            for w in self.graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let lw = self.low[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(lw);
                } else if self.on_stack.contains(w) {
                    let iw = self.index[w];
                    let lv = self.low.get_mut(v).expect("visited");
                    *lv = (*lv).min(iw);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w.to_string());
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.found.push(component);
                }
            }
        }
    }
    let mut walk = Walk {
        graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        found: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    walk.found
}

#[test]
fn the_parser_finds_grouped_and_relative_imports() {
    let code = code_of(
        "use crate::{auth::keys::Caller, vms::{http, list::views}};\n\
         // crate::commented::out\n\
         let x = \"crate::in_a_string\"; super::super::state::AppState; notcrate::x",
    );
    let paths = paths_in(&code);
    for p in [
        "crate::auth::keys::Caller",
        "crate::vms::http",
        "crate::vms::list::views",
        "super::super::state::AppState",
    ] {
        assert!(paths.iter().any(|q| q == p), "{p} missing from {paths:?}");
    }
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("commented") || p.contains("in_a_string")),
        "{paths:?}"
    );
    let modules: BTreeSet<String> = ["state", "vms", "vms::list", "auth", "auth::keys"]
        .map(String::from)
        .into();
    assert_eq!(
        target("super::super::state::AppState", "vms::list", &modules).as_deref(),
        Some("state")
    );
    assert_eq!(
        target("crate::vms::list::views", "auth", &modules).as_deref(),
        Some("vms::list")
    );
    let graph: BTreeMap<String, BTreeSet<String>> =
        [("a", vec!["b"]), ("b", vec!["c"]), ("c", vec!["a"]), ("d", vec!["a"])]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.into_iter().map(String::from).collect()))
            .collect();
    assert_eq!(cycles(&graph), vec![vec!["a".to_string(), "b".into(), "c".into()]]);
}

#[test]
fn api_modules_import_each_other_in_no_cycle() {
    let graph = import_graph();
    assert!(graph.len() > 30, "the api has {} modules?", graph.len());
    assert!(
        graph["vms::http"].contains("state"),
        "the graph sees vms::http use the state: {:?}",
        graph["vms::http"]
    );
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "modules of the api that import each other in a cycle: {found:?}\n\
         (move what both need into a module below them, as state.rs and daemons.rs are)"
    );
    // The shared state is at the bottom: it names no module that serves a route.
    for up in &graph["state"] {
        assert!(!up.ends_with("http") && up != "server", "state imports {up}");
    }
}

#[test]
fn no_api_source_file_is_longer_than_600_lines() {
    let mut files = Vec::new();
    rust_files(&api_src(), &mut files);
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let text = std::fs::read_to_string(f).expect("read");
            let code = text.split("#[cfg(test)]").next().unwrap_or_default();
            let n = code.lines().count();
            (n > MAX_LINES).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "split these: {long:?}");
}

/// Whether `code` names `ident` as a whole identifier, or imports everything of
/// socket_http (which would name it unseen).
fn names(code: &str, ident: &str) -> bool {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    code.match_indices(ident).any(|(i, _)| {
        let before = code[..i].chars().last();
        let after = code[i + ident.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    }) || code.contains("socket_http::*")
}

#[test]
fn the_envelope_is_found_where_it_is_named() {
    let code = code_of("use socket_http::{ApiError, Client};\n// ApiError in a comment\nlet m = \"ApiError\";");
    assert!(names(&code, "ApiError"));
    for clean in [
        "// only ApiError in a comment\nlet m = \"an ApiError in a string\";",
        "struct NotAnApiErrorAtAll; fn f() -> ApiErrors {}",
        "fn f() {}\n#[cfg(test)]\nmod tests { use socket_http::ApiError; }",
    ] {
        assert!(!names(&code_of(clean), "ApiError"), "{clean}");
    }
    assert!(names(&code_of("use socket_http::*;"), "ApiError"));
}

#[test]
fn resource_errors_become_the_envelope_only_at_the_edge() {
    let mut checked = 0;
    let mut named = Vec::new();
    for folder in RESOURCE_FOLDERS {
        let mut files = Vec::new();
        rust_files(&api_src().join(folder), &mut files);
        assert!(
            files.iter().any(|f| f.ends_with("error.rs")),
            "{folder}/ has no error.rs: its errors are typed there"
        );
        for f in files {
            let name = f.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if EDGE_FILES.contains(&name) {
                continue;
            }
            checked += 1;
            if names(&code_of(&std::fs::read_to_string(&f).expect("read")), "ApiError") {
                named.push(f.strip_prefix(api_src()).unwrap_or(&f).display().to_string());
            }
        }
    }
    assert!(checked >= 20, "only {checked} files outside the edge?");
    assert!(
        named.is_empty(),
        "these files name the public error envelope (ApiError) outside the edge: {named:?}\n\
         (return the folder's own error, from its error.rs; it becomes an ApiError in http.rs through `?`)"
    );
}

#[test]
fn daemons_depend_on_no_other_daemon_and_not_on_the_api() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let daemons = ["vmm-manager", "netd", "blockd", "imaged"];
    // What may not appear among a package's dependencies (any kind).
    let forbidden = |package: &str| -> Vec<&str> {
        let mut f = vec!["api", "hearth-cli"];
        if daemons.contains(&package) {
            f.extend(daemons.iter().filter(|d| **d != package));
            // The public document is made of the api's own types: a daemon's wire
            // types cannot derive a schema, so none can reach docs/openapi.json.
            f.push("utoipa");
        }
        if ["socket-http", "hearth-store"].contains(&package) {
            f.extend(daemons);
        }
        f
    };
    let packages = meta["packages"].as_array().expect("packages");
    let mut seen = 0;
    for p in packages {
        let name = p["name"].as_str().unwrap_or_default();
        if !daemons.contains(&name) && !["socket-http", "hearth-store"].contains(&name) {
            continue;
        }
        seen += 1;
        for d in p["dependencies"].as_array().into_iter().flatten() {
            let dep = d["name"].as_str().unwrap_or_default();
            assert!(
                !forbidden(name).contains(&dep),
                "{name} depends on {dep} ({} dependency): daemons know nothing of each other, the api \
                 or its public document",
                d["kind"].as_str().unwrap_or("normal")
            );
        }
    }
    assert!(seen >= daemons.len(), "found {seen} of the daemons in cargo metadata");
}
