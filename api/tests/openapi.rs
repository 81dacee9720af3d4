//! The OpenAPI document: the checked-in `docs/openapi.json` is what the code generates
//! (regenerate with `cargo run -p api --bin hearth-api -- --openapi > docs/openapi.json`),
//! the api serves exactly that without a key, and every documented route without path
//! parameters answers with JSON from a real handler rather than the "no such route"
//! fallback. (schemathesis fuzzes it against a live api in scripts/schemathesis.sh.)

mod common;

use common::{in_private_netns, Stack};

fn checked_in() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    std::fs::read_to_string(path).expect("docs/openapi.json")
}

#[test]
fn checked_in_document_is_current() {
    let generated = hearth_api::server::openapi_document();
    assert!(
        generated == checked_in(),
        "docs/openapi.json is stale: regenerate it with\n  cargo run -p api --bin hearth-api -- --openapi > docs/openapi.json"
    );
    let doc: serde_json::Value = serde_json::from_str(&generated).expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/v1/vms",
        "/v1/vms/{id}",
        "/v1/volumes/{name}/attach",
        "/v1/images",
        "/v1/operations/{id}",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    // Every $ref points at a schema that exists.
    let schemas = doc["components"]["schemas"].as_object().expect("schemas");
    let mut refs = Vec::new();
    collect_refs(&doc, &mut refs);
    assert!(refs.len() > 50, "{} refs", refs.len());
    for r in refs {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or(&r);
        assert!(schemas.contains_key(name), "dangling reference {r}");
    }
}

fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                if k == "$ref" {
                    out.extend(v.as_str().map(String::from));
                } else {
                    collect_refs(v, out);
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| collect_refs(v, out)),
        _ => {}
    }
}

#[test]
fn the_api_serves_the_document_and_every_plain_route_is_real() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let (status, served) = stack
            .request_as("GET", "/openapi.json", None, None)
            .await
            .expect("request");
        assert_eq!(status, 200, "/openapi.json needs no key");
        let want: serde_json::Value = serde_json::from_str(&checked_in()).expect("json");
        assert_eq!(served, want, "the served document is the checked-in one");

        let paths = want["paths"].as_object().expect("paths");
        let mut checked = 0;
        for (path, item) in paths {
            if path.contains('{') || item.get("get").is_none() || path == "/v1/events" {
                continue;
            }
            let (status, body) = stack.call("GET", path, None).await;
            assert_ne!(
                body["error"]["message"], "no such route",
                "GET {path} is documented but not routed"
            );
            assert!(status < 500, "GET {path}: {status} {body}");
            checked += 1;
        }
        assert!(checked >= 8, "only {checked} routes checked");
        let (status, body) = stack.call("GET", "/v1/nothing-here", None).await;
        assert_eq!(
            (status, body["error"]["message"].as_str()),
            (404, Some("no such route"))
        );
    });
}
