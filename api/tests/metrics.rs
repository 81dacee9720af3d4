//! `GET /metrics`: after a VM is created (and runs) and an import fails, the figures
//! say so: VMs by state, finished operations by kind and status with their durations,
//! every daemon up, IPAM use matching netd's, the volume pool's size. It needs a key.

mod common;

use common::{create_body, in_private_netns, Stack};
use serde_json::json;

/// The value of the sample whose name and labels are exactly `series`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[test]
fn metrics_follow_what_happened() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let (status, _) = stack.request_as("GET", "/metrics", None, None).await.expect("request");
        assert_eq!(status, 401, "metrics need a key");

        let (status, accepted) = stack.call("POST", "/v1/vms", Some(create_body("m1", "qemu"))).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr");
        let (status, accepted) = stack
            .call(
                "POST",
                "/v1/images",
                Some(json!({"name": "x", "url": format!("http://{closed}/d.raw")})),
            )
            .await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "failed");

        let (status, body) = stack.call("GET", "/metrics", None).await;
        assert_eq!(status, 200);
        let text = body.as_str().expect("text").to_string();
        let get = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in:\n{text}"));
        assert_eq!(get(r#"hearth_vms{state="running"}"#), 1.0);
        assert_eq!(get(r#"hearth_vms{state="stopped"}"#), 0.0);
        assert_eq!(
            get(r#"hearth_operations_total{kind="vm.create",status="succeeded"}"#),
            1.0
        );
        assert_eq!(
            get(r#"hearth_operations_total{kind="image.import",status="failed"}"#),
            1.0
        );
        assert_eq!(get(r#"hearth_operation_duration_seconds_count{kind="vm.create"}"#), 1.0);
        assert!(get(r#"hearth_operation_duration_seconds_sum{kind="vm.create"}"#) > 0.0);
        for d in ["vmm-manager", "netd", "blockd", "imaged"] {
            assert_eq!(get(&format!(r#"hearth_daemon_up{{daemon="{d}"}}"#)), 1.0, "{d}");
        }
        let (_, net) = stack.call("GET", "/v1/networks/default", None).await;
        let allocated = net["allocated"].as_f64().expect("allocated");
        assert!(allocated >= 1.0, "{net}");
        assert_eq!(
            get(r#"hearth_ipam_addresses{network="default",state="allocated"}"#),
            allocated
        );
        assert_eq!(get(r#"hearth_ipam_addresses{network="default",state="usable"}"#), 253.0);
        assert!(get(r#"hearth_volume_pool_bytes{state="total"}"#) > 0.0);
        assert!(
            text.contains("# TYPE hearth_operation_duration_seconds histogram"),
            "{text}"
        );
    });
}
