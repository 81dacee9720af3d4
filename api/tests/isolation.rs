//! Projects keep tenants apart, proved route by route from the served OpenAPI document:
//! for every operation, a key of project beta can neither read nor change project
//! alpha's resources (403 when it names alpha, 404 when it looks for them from beta),
//! and a viewer of alpha is refused every change with 403 naming the permission. At the
//! end alpha's VM, network, volume and snapshot are exactly as they were. Also: API keys
//! are listed by prefix without secrets and stop working when revoked, and failed
//! authentication is rate-limited.

mod common;

use common::{in_private_netns, Stack};
use serde_json::{json, Value};

/// A concrete request for the documented `method path`, aimed at alpha's resources.
fn request_for(method: &str, path: &str, op_id: &str) -> (String, Option<Value>) {
    let concrete = path
        .replace("/v1/vms/{id}/{action}", "/v1/vms/vm-a/stop")
        .replace("/v1/databases/{name}/{action}", "/v1/databases/db-a/restart")
        .replace("/v1/databases/{name}", "/v1/databases/db-a")
        .replace("/v1/operations/{id}", &format!("/v1/operations/{op_id}"))
        .replace("/v1/api-keys/{id}", "/v1/api-keys/KEYID")
        .replace("{id}", "vm-a")
        .replace("/v1/volumes/{name}", "/v1/volumes/vol-a")
        .replace("/v1/networks/{name}", "/v1/networks/net-a")
        .replace("/v1/images/{name}", "/v1/images/tiny")
        .replace("/v1/projects/{name}", "/v1/projects/alpha")
        .replace("/v1/users/{name}", "/v1/users/alice")
        .replace("{snapshot}", "s1")
        .replace("{user}", "alice");
    let body = match (method, path) {
        ("POST", "/v1/vms") => Some(json!({"name": "intruder", "image": "tiny", "start": false, "nics": []})),
        ("POST", "/v1/volumes") => Some(json!({"name": "intruder", "size": "1M"})),
        ("POST", "/v1/networks") => Some(json!({"name": "intruder", "subnet": "10.99.0.0/24"})),
        ("POST", "/v1/databases") => Some(json!({"name": "intruder", "storage": "1G"})),
        ("POST", "/v1/images") => Some(json!({"name": "intruder", "path": "/nonexistent.raw"})),
        ("POST", "/v1/projects") => Some(json!({"name": "intruder"})),
        ("POST", "/v1/users") => Some(json!({"name": "intruder"})),
        ("POST", "/v1/api-keys") => Some(json!({"name": "intruder", "user": "alice"})),
        ("PUT", _) => Some(json!({"role": "viewer"})),
        ("POST", p) if p.ends_with("/resize") => Some(json!({"size": "128M"})),
        ("POST", p) if p.ends_with("/snapshots") => Some(json!({"name": "s2"})),
        ("POST", p) if p.ends_with("/clone") => Some(json!({"name": "intruder"})),
        ("POST", p) if p.ends_with("/attach") => Some(json!({"vm": "vm-a"})),
        ("POST", p) if p.ends_with("/restore") => Some(json!({"snapshot": "s1"})),
        ("PATCH", _) => Some(json!({"vcpus": 2})),
        ("POST", _) => Some(json!({})),
        _ => None,
    };
    (concrete, body)
}

async fn send(stack: &Stack, key: &str, method: &str, path: &str, project: &str, body: Option<&Value>) -> (u16, Value) {
    let sep = if path.contains('?') { '&' } else { '?' };
    let bytes = body.map(|b| b.to_string().into_bytes());
    stack
        .request_as(
            method,
            &format!("{path}{sep}project={project}"),
            bytes.as_deref(),
            Some(key),
        )
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[test]
fn projects_are_isolated_on_every_route() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let alice = stack.key_for("alice", "alpha", "member").await;
        let bob = stack.key_for("bob", "beta", "admin").await;
        let vic = stack.key_for("vic", "alpha", "viewer").await;

        // Alice's resources in alpha.
        let (s, b) = send(
            &stack,
            &alice,
            "POST",
            "/v1/networks",
            "alpha",
            Some(&json!({"name": "net-a", "subnet": "10.81.0.0/24"})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = send(
            &stack,
            &alice,
            "POST",
            "/v1/volumes",
            "alpha",
            Some(&json!({"name": "vol-a", "size": "64M"})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = send(
            &stack,
            &alice,
            "POST",
            "/v1/volumes/vol-a/snapshots",
            "alpha",
            Some(&json!({"name": "s1"})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (s, accepted) = send(
            &stack,
            &alice,
            "POST",
            "/v1/vms",
            "alpha",
            Some(&json!({"name": "vm-a", "image": "tiny", "hypervisor": "qemu", "start": false, "nics": [{"network": "net-a"}]})),
        )
        .await;
        assert_eq!(s, 202, "{accepted}");
        let op_id = accepted["operation"]["id"].as_str().expect("op").to_string();
        // Wait as alice: the admin's key works in `default` unless it names alpha.
        loop {
            let (s, op) = send(
                &stack,
                &alice,
                "GET",
                &format!("/v1/operations/{op_id}?wait=10"),
                "alpha",
                None,
            )
            .await;
            assert_eq!(s, 200, "{op}");
            if op["status"] != "running" {
                assert_eq!(op["status"], "succeeded", "{op}");
                break;
            }
        }
        // A database in alpha (a VM of the postgres image): its routes are checked too.
        let (s, accepted) = send(
            &stack,
            &alice,
            "POST",
            "/v1/databases",
            "alpha",
            Some(&json!({"name": "db-a", "network": "net-a", "storage": "1G", "memory_mib": 512})),
        )
        .await;
        assert_eq!(s, 202, "{accepted}");
        let db_op = accepted["operation"]["id"].as_str().expect("op").to_string();
        loop {
            let (s, op) = send(
                &stack,
                &alice,
                "GET",
                &format!("/v1/operations/{db_op}?wait=10"),
                "alpha",
                None,
            )
            .await;
            assert_eq!(s, 200, "{op}");
            if op["status"] != "running" {
                assert_eq!(op["status"], "succeeded", "{op}");
                break;
            }
        }
        let before = snapshot_of_alpha(&stack, &alice).await;

        for list in [
            "/v1/vms",
            "/v1/volumes",
            "/v1/networks",
            "/v1/operations",
            "/v1/databases",
        ] {
            let (s, b) = send(&stack, &bob, "GET", list, "beta", None).await;
            assert_eq!(s, 200, "{b}");
            let text = b.to_string();
            assert!(
                !text.contains("vm-a")
                    && !text.contains("net-a")
                    && !text.contains(&op_id)
                    && !text.contains("db-a")
                    && !text.contains("\"alpha\""),
                "beta's {list} shows alpha's resources: {text}"
            );
        }

        let doc: Value = stack
            .request_as("GET", "/openapi.json", None, None)
            .await
            .expect("doc")
            .1;
        let mut routes = 0;
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in ["get", "post", "put", "delete"] {
                let Some(op) = item.get(method) else { continue };
                let public = op["security"]
                    .as_array()
                    .is_some_and(|s| s.iter().any(|r| r.as_object().is_some_and(|o| o.is_empty())));
                if public {
                    continue;
                }
                let m = method.to_uppercase();
                let (concrete, body) = request_for(&m, path, &op_id);
                let streaming = path == "/v1/events";
                routes += 1;

                // 1. Bob names alpha: refused before anything runs.
                let (s, b) = send(&stack, &bob, &m, &concrete, "alpha", body.as_ref()).await;
                let identity = path.starts_with("/v1/projects/") || path.starts_with("/v1/api-keys");
                let own_listing = m == "GET" && (path == "/v1/api-keys" || path == "/v1/projects");
                if own_listing {
                    // Lists of one's own keys and projects: beta's, never alpha's.
                    assert_eq!(s, 200, "{b}");
                    assert!(
                        !b.to_string().contains("alpha") && !b.to_string().contains("alice"),
                        "{b}"
                    );
                } else if identity {
                    // Project and key routes address their target in the path: alpha
                    // and alice's keys are invisible to bob (404), never changed.
                    assert!(s == 403 || s == 404, "bob {m} {concrete} ?project=alpha: {s} {b}");
                } else {
                    assert_eq!(s, 403, "bob {m} {concrete} ?project=alpha: {b}");
                    assert!(
                        b["error"]["message"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("permission"),
                        "bob {m} {concrete}: the 403 names the permission: {b}"
                    );
                }

                // 2. Bob in his own project addressing alpha's resources by name: not found.
                if path.contains('{') && !identity {
                    let (s, b) = if path.ends_with("/console") || path.ends_with("/vnc") {
                        // A real WebSocket handshake, so the handler itself answers.
                        let bearer = format!("Bearer {bob}");
                        let (s, _, b) = stack
                            .request_with(
                                "GET",
                                &format!("{concrete}?project=beta"),
                                None,
                                None,
                                &[
                                    ("authorization", bearer.as_str()),
                                    ("connection", "upgrade"),
                                    ("upgrade", "websocket"),
                                    ("sec-websocket-version", "13"),
                                    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
                                ],
                            )
                            .await
                            .expect("request");
                        (s, b)
                    } else {
                        send(&stack, &bob, &m, &concrete, "beta", body.as_ref()).await
                    };
                    // Images are host-wide (readable from every project). A DELETE of
                    // what beta does not have is the usual "nothing to delete" 204;
                    // alpha's copy is checked untouched at the end.
                    let images_read = path.starts_with("/v1/images") && m == "GET";
                    let ok = s == 404 || s == 403 || images_read || (m == "DELETE" && s == 204);
                    assert!(ok, "bob {m} {concrete} ?project=beta: {s} {b}");
                }

                // 3. Vic, a viewer of alpha: reads work, every change is 403 naming the permission.
                if m != "GET" {
                    let (s, b) = send(&stack, &vic, &m, &concrete, "alpha", body.as_ref()).await;
                    let ticket_read = concrete.ends_with("/console/ticket");
                    let own_keys = path.starts_with("/v1/api-keys");
                    if ticket_read {
                        // A viewer may get a ticket to watch, not to type (default write=true).
                        assert_eq!(s, 403, "vic {m} {concrete}: {b}");
                    } else if own_keys {
                        // Keys are one's own business: vic can make and revoke only his.
                        assert!(s == 403 || s == 404, "vic {m} {concrete}: {s} {b}");
                    } else {
                        assert_eq!(s, 403, "vic {m} {concrete}: {b}");
                    }
                    assert!(
                        b["error"]["message"]
                            .as_str()
                            .unwrap_or_default()
                            .contains("permission")
                            || s == 404,
                        "vic {m} {concrete}: {b}"
                    );
                } else if !streaming && !path.ends_with("/console") && !path.ends_with("/vnc") {
                    let (s, b) = send(&stack, &vic, &m, &concrete, "alpha", None).await;
                    let host_admin =
                        path == "/metrics" || path.starts_with("/v1/users") || path.starts_with("/v1/hosts");
                    if host_admin {
                        assert_eq!(s, 403, "vic {m} {concrete}: {b}");
                    } else {
                        assert_eq!(s, 200, "vic reads {concrete}: {b}");
                    }
                }
            }
        }
        assert!(routes >= 35, "only {routes} routes checked");
        let after = snapshot_of_alpha(&stack, &alice).await;
        assert_eq!(before, after, "alpha changed");

        // Names are per project: bob can have a vol-a of his own; alice's is untouched.
        let (s, b) = send(
            &stack,
            &bob,
            "POST",
            "/v1/volumes",
            "beta",
            Some(&json!({"name": "vol-a", "size": "1M"})),
        )
        .await;
        assert_eq!(s, 201, "{b}");
        let (s, b) = send(&stack, &bob, "DELETE", "/v1/volumes/vol-a", "beta", None).await;
        assert_eq!(s, 204, "{b}");
        assert_eq!(
            snapshot_of_alpha(&stack, &alice).await,
            before,
            "bob's vol-a was another volume"
        );

        // Keys: listed by prefix without secrets; a revoked key stops at once.
        let (s, keys) = send(&stack, &alice, "GET", "/v1/api-keys", "alpha", None).await;
        assert_eq!(s, 200);
        let mine = keys.as_array().expect("keys");
        assert_eq!(mine.len(), 1, "alice sees only her key: {keys}");
        assert!(alice.starts_with(mine[0]["prefix"].as_str().expect("prefix")));
        assert!(
            !keys.to_string().contains(&alice[alice.len() - 20..]),
            "no secret in listings"
        );
        let id = mine[0]["id"].as_str().expect("id").to_string();
        let (s, _) = send(&stack, &bob, "DELETE", &format!("/v1/api-keys/{id}"), "beta", None).await;
        assert_eq!(s, 404, "bob cannot revoke alice's key");
        let (s, b) = send(&stack, &alice, "DELETE", &format!("/v1/api-keys/{id}"), "alpha", None).await;
        assert_eq!(s, 409, "a key does not revoke itself: {b}");
        let (s, _) = send(
            &stack,
            &stack.key,
            "DELETE",
            &format!("/v1/api-keys/{id}"),
            "alpha",
            None,
        )
        .await;
        assert_eq!(s, 204, "an administrator revokes alice's key");
        let (s, b) = send(&stack, &alice, "GET", "/v1/vms", "alpha", None).await;
        assert_eq!(s, 401, "{b}");
        assert!(
            b["error"]["message"].as_str().unwrap_or_default().contains("revoked"),
            "{b}"
        );

        // Failed authentication is limited per address: after 10 failures, 429 with
        // Retry-After, even for a good key, until the minute is over.
        let mut statuses = Vec::new();
        for i in 0..11 {
            let (s, _) = stack
                .request_as("GET", "/v1/vms", None, Some(&format!("hth_nope_{i}")))
                .await
                .expect("request");
            statuses.push(s);
        }
        // The revoked key's refusal above was failure number one from this address.
        assert!(statuses[..9].iter().all(|s| *s == 401), "{statuses:?}");
        assert!(statuses[9..].iter().all(|s| *s == 429), "{statuses:?}");
        let (s, h, b) = stack
            .request_with("GET", "/v1/vms", None, Some(&stack.key), &[])
            .await
            .expect("request");
        assert_eq!(s, 429, "{b}");
        let wait: u64 = h["retry-after"].to_str().expect("ascii").parse().expect("seconds");
        assert!((1..=60).contains(&wait), "{wait}");
    });
}

/// What alpha holds, as its member sees it.
async fn snapshot_of_alpha(stack: &Stack, alice: &str) -> Value {
    let mut out = serde_json::Map::new();
    for path in [
        "/v1/vms/vm-a",
        "/v1/networks/net-a",
        "/v1/volumes/vol-a",
        "/v1/databases/db-a",
        "/v1/projects/alpha/members",
    ] {
        let (s, mut b) = send(stack, alice, "GET", path, "alpha", None).await;
        assert_eq!(s, 200, "{path}: {b}");
        // Usage figures move on their own; what matters is existence and shape.
        if let Some(o) = b.as_object_mut() {
            o.remove("allocated_bytes");
            o.remove("allocated");
            o.remove("reason");
        }
        out.insert(path.to_string(), b);
    }
    Value::Object(out)
}
