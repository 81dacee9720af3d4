//! The api driving all four daemons the way it drives another host's: each daemon as
//! its own process serving over TCP with TLS and a token (`--listen-tls`), its Unix
//! socket moved where the api does not look, and the api given only
//! `--daemon NAME=https://…`, the CA and the token. A VM is made, boots, talks on its
//! serial console (a WebSocket through the api to vmm-manager over TLS) and is removed
//! with a network and a volume; a daemon refuses a caller without the token.

mod common;

use std::time::Duration;

use common::{create_body, in_private_netns, Stack, DAEMONS};
use serde_json::json;

#[test]
fn the_api_drives_every_daemon_over_tls_with_a_token() {
    in_private_netns(|| async {
        let stack = Stack::start_separate_tls(&[], &DAEMONS).await;
        for name in DAEMONS {
            assert!(
                !stack.data_dir().join(format!("run/{name}.sock")).exists(),
                "{name}'s socket is not where the api could find it"
            );
        }
        let (status, ready) = stack.call("GET", "/health/ready", None).await;
        assert_eq!(status, 200, "every daemon answers the api over TLS: {ready}");

        // netd: a network.
        let (status, net) = stack
            .call(
                "POST",
                "/v1/networks",
                Some(json!({"name": "lab", "subnet": "10.61.0.0/24"})),
            )
            .await;
        assert_eq!(status, 201, "{net}");
        assert_eq!(net["spec"]["name"], "lab");

        // blockd: a volume.
        let (status, vol) = stack
            .call("POST", "/v1/volumes", Some(json!({"name": "data", "size": "8M"})))
            .await;
        assert_eq!(status, 201, "{vol}");
        assert_eq!(vol["size_bytes"], 8 << 20);

        // imaged (the catalog's tiny image), netd (its port), blockd, vmm-manager.
        let mut body = create_body("edge", "qemu");
        body["nics"] = json!([{"network": "lab"}]);
        body["volumes"] = json!(["data"]);
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());
        stack
            .wait_console("edge", "HEARTH-GUEST-READY", 1, Duration::from_secs(180))
            .await;
        let said = stack.console_exchange("edge", "echo T$((6*7))\n", "T42").await;
        assert!(said.contains("T42"), "the console WebSocket rides TLS: {said}");
        let vm = stack.vm("edge").await;
        assert_eq!(vm["state"], "running", "{vm}");
        assert!(
            vm["nics"][0]["ip"]
                .as_str()
                .is_some_and(|ip| ip.starts_with("10.61.0.")),
            "{vm}"
        );

        // Everything goes again, through the same endpoints.
        let (status, accepted) = stack.call("DELETE", "/v1/vms/edge", None).await;
        assert_eq!(status, 202, "{accepted}");
        let op = stack.wait_op(&accepted).await;
        assert_eq!(op["status"], "succeeded", "{op}");
        for (path, want) in [("/v1/volumes/data", 204), ("/v1/networks/lab", 204)] {
            let (status, body) = stack.call("DELETE", path, None).await;
            assert_eq!(status, want, "{path}: {body}");
        }
        assert!(stack.vmm_processes().is_empty(), "no VMM left");

        // A caller without the token gets nothing from a daemon.
        let daemons = stack.daemons.as_ref().expect("separate daemons");
        for name in DAEMONS {
            let port = daemons.tls_port(name).expect("served over TLS");
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "--cacert"])
                .arg(stack.data_dir().join("pki/ca.pem"))
                .args(["-o", "/dev/null", "-w", "%{http_code}"])
                .arg(format!("https://127.0.0.1:{port}/health"))
                .output()
                .await
                .expect("curl");
            assert_eq!(
                String::from_utf8_lossy(&out.stdout),
                "401",
                "{name} without the token: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    });
}
