//! `Idempotency-Key`: a client retrying a POST gets the first answer back and nothing
//! is made twice, also when the retries race; a key reused for another request is 422;
//! keys of different API keys do not mix; a POST without the header is unchanged.

mod common;

use common::{create_body, in_private_netns, Stack};
use serde_json::{json, Value};

async fn post(stack: &Stack, key: &str, path: &str, body: &Value, idem: Option<&str>) -> (u16, bool, Value) {
    let headers: Vec<(&str, &str)> = idem.map(|k| vec![("Idempotency-Key", k)]).unwrap_or_default();
    let bytes = body.to_string().into_bytes();
    let (status, h, v) = stack
        .request_with("POST", path, Some(&bytes), Some(key), &headers)
        .await
        .expect("request");
    (status, h.get("idempotent-replayed").is_some(), v)
}

#[test]
fn retried_posts_do_the_work_once() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let admin = stack.key.clone();

        // A network: the retry gets the same 201 (not "name taken"), marked as replayed.
        let net = json!({"name": "lab", "subnet": "10.78.0.0/24"});
        let first = post(&stack, &admin, "/v1/networks", &net, Some("net-1")).await;
        assert_eq!((first.0, first.1), (201, false), "{}", first.2);
        let again = post(&stack, &admin, "/v1/networks", &net, Some("net-1")).await;
        assert_eq!((again.0, again.1), (201, true), "{}", again.2);
        assert_eq!(again.2, first.2, "the replay is the first answer");
        let plain = post(&stack, &admin, "/v1/networks", &net, None).await;
        assert_eq!(plain.0, 409, "without a key a repeat is a new request: {}", plain.2);

        // The same key for a different body: refused, nothing made.
        let other = json!({"name": "lab2", "subnet": "10.79.0.0/24"});
        let reused = post(&stack, &admin, "/v1/networks", &other, Some("net-1")).await;
        assert_eq!(reused.0, 422, "{}", reused.2);
        assert!(reused.2["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("different request"));
        assert_eq!(stack.call("GET", "/v1/networks/lab2", None).await.0, 404);

        // Five racing retries of one VM create: one VM, one operation, every answer
        // either that 202 or "still being processed".
        let body = {
            let mut b = create_body("once", "qemu");
            b["start"] = json!(false);
            b
        };
        let answers =
            futures_util::future::join_all((0..5).map(|_| post(&stack, &admin, "/v1/vms", &body, Some("vm-once"))))
                .await;
        let accepted: Vec<&(u16, bool, Value)> = answers.iter().filter(|a| a.0 == 202).collect();
        assert!(!accepted.is_empty(), "{answers:?}");
        for a in &answers {
            assert!(a.0 == 202 || a.0 == 409, "{a:?}");
        }
        let op_ids: std::collections::BTreeSet<&str> = accepted
            .iter()
            .map(|a| a.2["operation"]["id"].as_str().expect("operation id"))
            .collect();
        assert_eq!(op_ids.len(), 1, "one operation: {op_ids:?}");
        let op = stack.wait_op(&accepted[0].2).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        let replay = post(&stack, &admin, "/v1/vms", &body, Some("vm-once")).await;
        assert_eq!((replay.0, replay.1), (202, true));
        assert_eq!(replay.2["operation"]["id"], accepted[0].2["operation"]["id"]);
        let (_, vms) = stack.call("GET", "/v1/vms", None).await;
        let named_once = vms
            .as_array()
            .expect("list")
            .iter()
            .filter(|v| v["name"] == "once")
            .count();
        assert_eq!(named_once, 1, "{vms}");

        // Another API key with the same Idempotency-Key is a different request.
        let other_key = stack.key_for("ops", "default", "member").await;
        let theirs = post(&stack, &other_key, "/v1/networks", &other, Some("net-1")).await;
        assert_eq!((theirs.0, theirs.1), (201, false), "{}", theirs.2);

        // A malformed key is refused before anything runs.
        let bad = post(
            &stack,
            &admin,
            "/v1/networks",
            &json!({"name": "lab3", "subnet": "10.80.0.0/24"}),
            Some(" "),
        )
        .await;
        assert_eq!(bad.0, 400, "{}", bad.2);
        assert_eq!(stack.call("GET", "/v1/networks/lab3", None).await.0, 404);

        for path in ["/v1/vms/once"] {
            let (status, accepted) = stack.call("DELETE", path, None).await;
            assert_eq!(status, 202, "{accepted}");
            stack.wait_op(&accepted).await;
        }
        for n in ["lab", "lab2"] {
            stack.call("DELETE", &format!("/v1/networks/{n}"), None).await;
        }
    });
}
