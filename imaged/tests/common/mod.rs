//! Helpers the imaged tests share.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

/// Runs a tool the test needs, with `input` on its stdin; panics with its stderr when
/// it fails.
pub fn run_with_input(cmd: &str, args: &[&str], input: Option<&str>) {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{cmd}: {e} (scripts/deps.sh installs the test tools)"));
    let mut stdin = child.stdin.take().expect("stdin");
    stdin.write_all(input.unwrap_or("").as_bytes()).expect("stdin");
    drop(stdin);
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn run(cmd: &str, args: &[&str]) {
    run_with_input(cmd, args, None);
}

/// A path as a command argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}
