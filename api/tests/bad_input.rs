//! Bad input gets a clear error with an honest status code and leaves nothing behind.

mod common;

use common::{create_body, in_private_netns, Stack};
use serde_json::json;

#[test]
fn bad_requests_are_refused_clearly() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let host_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|k| k.parse::<u64>().ok())
            })
            .map(|kb| kb / 1024)
            .expect("meminfo");
        let cases = [
            (json!({"name": "a", "image": "no-such-image"}), 422, "no-such-image"),
            (json!({"name": "a", "image": "../../etc"}), 422, "invalid"),
            (json!({"name": "a", "image": "tiny", "vcpus": 0}), 422, "vcpus"),
            (
                json!({"name": "a", "image": "tiny", "memory_mib": 63}),
                422,
                "memory_mib",
            ),
            (
                json!({"name": "a", "image": "tiny", "memory_mib": host_mib + 1}),
                422,
                "memory_mib",
            ),
            (json!({"name": "Bad_Name", "image": "tiny"}), 422, "invalid VM name"),
            (
                json!({"name": "a", "image": "tiny", "hypervisor": "xen"}),
                422,
                "unknown hypervisor",
            ),
            (
                json!({"name": "a", "image": "tiny", "colour": "red"}),
                422,
                "unknown field `colour`",
            ),
            (
                json!({"name": "a", "image": "tiny", "vcpus": "two"}),
                422,
                "invalid type",
            ),
            (
                json!({"name": "a", "image": "tiny", "placement": {"host": "nowhere"}}),
                422,
                "placement names host nowhere, which does not exist",
            ),
            (
                json!({"name": "a", "image": "tiny", "placement": {"anti_affinity_group": "Bad Group"}}),
                422,
                "invalid anti-affinity group name",
            ),
        ];
        for (body, status, needle) in cases {
            let (got, err) = stack.call("POST", "/v1/vms", Some(body.clone())).await;
            assert_eq!(got, status, "{body} -> {err}");
            let msg = err["error"]["message"].as_str().unwrap_or_default();
            assert!(msg.contains(needle), "{body}: {msg}");
            assert!(err["error"]["code"].is_string(), "envelope: {err}");
        }
        // One host, on the embedded store: it leads, and no other host can join.
        let (got, hosts) = stack.call("GET", "/v1/hosts", None).await;
        assert_eq!(got, 200, "{hosts}");
        assert_eq!(hosts.as_array().map(Vec::len), Some(1), "{hosts}");
        assert_eq!(
            (hosts[0]["state"].as_str(), hosts[0]["leader"].as_bool()),
            (Some("ready"), Some(true)),
            "{hosts}"
        );
        let (got, err) = stack.call("POST", "/v1/hosts/join-tokens", Some(json!({}))).await;
        assert_eq!(got, 409, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("several hosts need etcd"),
            "{err}"
        );
        let (got, err) = stack
            .call(
                "POST",
                "/v1/hosts/join",
                Some(json!({"token": "hjt_x_y", "name": "h2", "address": "10.0.0.2"})),
            )
            .await;
        assert_eq!(got, 409, "{err}");
        let (got, _) = stack.call("GET", "/v1/hosts/nowhere", None).await;
        assert_eq!(got, 404);
        let (got, _) = stack.call("POST", "/v1/hosts/nowhere/cordon", None).await;
        assert_eq!(got, 404);
        // Malformed JSON: 400 with the parser's message.
        let (got, err) = stack
            .request_as("POST", "/v1/vms", Some(b"{\"image\": "), Some(&stack.key))
            .await
            .expect("request");
        assert_eq!(got, 400, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("EOF while parsing"),
            "{err}"
        );

        // Authentication.
        let (got, err) = stack.request_as("GET", "/v1/vms", None, None).await.expect("request");
        assert_eq!(got, 401, "{err}");
        assert!(err["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("Authorization"));
        let (got, _) = stack
            .request_as("GET", "/v1/vms", None, Some("hth_nope_wrong"))
            .await
            .expect("request");
        assert_eq!(got, 401);
        let mut wrong = stack.key.clone();
        wrong.push('x');
        let (got, _) = stack
            .request_as("GET", "/v1/vms", None, Some(&wrong))
            .await
            .expect("request");
        assert_eq!(got, 401);
        let (got, _) = stack
            .request_as("GET", "/health/live", None, None)
            .await
            .expect("request");
        assert_eq!(got, 200, "health needs no key");

        // Unknown VM, unknown operation, unknown action.
        assert_eq!(stack.call("GET", "/v1/vms/ghost", None).await.0, 404);
        assert_eq!(stack.call("GET", "/v1/operations/ghost", None).await.0, 404);

        // Duplicate name: 409, and the first VM is untouched (defined, not started).
        let mut body = create_body("twin", "qemu");
        body["start"] = json!(false);
        let (got, accepted) = stack.call("POST", "/v1/vms", Some(body.clone())).await;
        assert_eq!(got, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let (got, err) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(got, 409, "{err}");
        assert!(err["error"]["message"].as_str().unwrap_or_default().contains("twin"));
        assert_eq!(stack.vm("twin").await["state"], "stopped");
        assert_eq!(stack.call("POST", "/v1/vms/twin/explode", None).await.0, 404);
        assert_eq!(stack.call("POST", "/v1/vms/twin/resume", None).await.0, 409);
    });
}

/// A create that fails half way (the VMM dies at start-up, or its binary is missing)
/// fails its operation with the reason and leaves no process, socket, directory or record.
#[test]
fn failed_creates_leave_nothing_behind() {
    in_private_netns(|| async {
        let tmp = tempfile::tempdir().expect("tempdir");
        let broken = tmp.path().join("qemu-that-crashes");
        std::fs::write(
            &broken,
            "#!/bin/sh\necho 'qemu: cannot initialise the machine' >&2\nexit 1\n",
        )
        .expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let stack = Stack::start(&["--qemu-binary", broken.to_str().expect("utf8")]).await;

        let (got, accepted) = stack.call("POST", "/v1/vms", Some(create_body("doomed", "qemu"))).await;
        assert_eq!(got, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "failed", "{op}");
        let msg = op["error"]["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains("cannot initialise the machine"),
            "the VMM's own words reach the user: {msg}"
        );
        assert_eq!(stack.call("GET", "/v1/vms/doomed", None).await.0, 404);
        assert!(stack.vm_dirs().is_empty(), "{:?}", stack.vm_dirs());
        assert!(stack.vmm_processes().is_empty());
        // The name is free again.
        let mut body = create_body("doomed", "qemu");
        body["start"] = json!(false);
        let (got, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(got, 202);
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");

        // A hypervisor that is not installed is refused before anything is recorded.
        drop(stack);
        let stack = Stack::start(&["--cloud-hypervisor-binary", "/nonexistent/cloud-hypervisor"]).await;
        let (got, err) = stack
            .call("POST", "/v1/vms", Some(create_body("nohv", "cloud-hypervisor")))
            .await;
        assert_eq!(got, 422, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains("/nonexistent/cloud-hypervisor"),
            "{err}"
        );
        // Without a hypervisor named, the default (cloud-hypervisor) falls back to QEMU.
        let (got, accepted) = stack
            .call(
                "POST",
                "/v1/vms",
                Some(json!({"name": "fallback", "image": "tiny", "start": false})),
            )
            .await;
        assert_eq!(got, 202, "{accepted}");
        assert_eq!(accepted["vm"]["hypervisor"], "qemu");
        let (_, list) = stack.call("GET", "/v1/vms", None).await;
        assert_eq!(list.as_array().map(Vec::len), Some(1));
        assert!(stack.vm_dirs().len() <= 1);
    });
}
