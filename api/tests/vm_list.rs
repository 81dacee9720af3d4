//! `GET /v1/vms` is served from a cache (api/src/vms/list.rs). What a user must never
//! notice: a listing that is stale. The cache follows vmm-manager's events, so a change
//! nobody asked the api for (a VMM killed behind its back) shows in the listing without
//! anyone asking for that VM alone; conditional requests and gzip give the same content.

mod common;

use std::io::Read;
use std::time::{Duration, Instant};

use common::{create_body, in_private_netns, Stack};
use serde_json::{json, Value};

async fn get_list(stack: &Stack, headers: &[(&str, &str)]) -> (u16, http::HeaderMap, Value) {
    stack
        .request_with("GET", "/v1/vms", None, Some(&stack.key), headers)
        .await
        .expect("GET /v1/vms")
}

#[test]
fn the_listing_follows_changes_nobody_asked_the_api_for() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        for name in ["a", "b"] {
            let (status, accepted) = stack
                .call("POST", "/v1/vms", Some(create_body(name, "cloud-hypervisor")))
                .await;
            assert_eq!(status, 202, "{accepted}");
            // At once, before the operation ends, the new VM is listed.
            assert!(
                ["creating", "stopped", "starting", "running"]
                    .contains(&stack.listed(name).await["state"].as_str().unwrap_or("")),
                "{}",
                stack.listed(name).await
            );
            let op = stack.wait_op(&accepted).await;
            assert_eq!(op["status"], "succeeded", "{op}\n{}", stack.log());
        }

        // ETag and If-None-Match: the same listing is not sent twice.
        let (status, headers, list) = get_list(&stack, &[]).await;
        assert_eq!(status, 200);
        assert_eq!(list.as_array().map(Vec::len), Some(2), "{list}");
        let etag = headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .expect("an ETag")
            .to_string();
        let (status, _, body) = get_list(&stack, &[("if-none-match", &etag)]).await;
        assert_eq!(status, 304, "{body}");

        // gzip, when asked for, carries the same JSON.
        let (status, headers, _) = get_list(&stack, &[("accept-encoding", "gzip")]).await;
        assert_eq!(status, 200);
        assert_eq!(
            headers.get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..])
        );
        let raw = raw_gzip_list(&stack).await;
        let mut plain = String::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_string(&mut plain)
            .expect("valid gzip");
        assert_eq!(serde_json::from_str::<Value>(&plain).expect("JSON"), list);

        // Kill a's VMM behind the api's back: only the listing is asked, and it shows.
        let a = stack.listed("a").await;
        assert_eq!(a["state"], "running", "{a}");
        let pid = a["pid"].as_u64().expect("pid") as i32;
        // SAFETY: the VMM process this test's stack started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let started = Instant::now();
        let seen = loop {
            let now = stack.listed("a").await;
            if now["state"] != "running" {
                break now;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the listing still says running 10 s after the VMM died: {now}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        eprintln!("listing showed {} after {:?}", seen["state"], started.elapsed());
        assert_eq!(seen["pid"], Value::Null, "{seen}");
        let (status, _, _) = get_list(&stack, &[("if-none-match", &etag)]).await;
        assert_eq!(status, 200, "a changed listing is sent again");
        assert_eq!(stack.listed("b").await["state"], "running", "b is untouched");
        assert_eq!(
            stack.vm("a").await["state"],
            seen["state"],
            "the VM alone says the same"
        );

        // A deleted VM leaves the listing when its operation ends.
        let (status, accepted) = stack.call("DELETE", "/v1/vms/a", None).await;
        assert_eq!(status, 202, "{accepted}");
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        let (_, list) = stack.call("GET", "/v1/vms", None).await;
        let names: Vec<&str> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v["name"].as_str())
            .collect();
        assert_eq!(names, ["b"]);

        // Another project's listing is its own.
        let key = stack.key_for("lin", "other", "member").await;
        let (status, other) = stack
            .request_as("GET", "/v1/vms?project=other", None, Some(&key))
            .await
            .expect("list");
        assert_eq!((status, other), (200, json!([])));
    });
}

/// The body of a gzip listing, undecoded.
async fn raw_gzip_list(stack: &Stack) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = stack.url().trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let req = format!(
        "GET /v1/vms HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n",
        stack.key
    );
    conn.write_all(req.as_bytes()).await.expect("send");
    let mut resp = Vec::new();
    conn.read_to_end(&mut resp).await.expect("read");
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").expect("head") + 4;
    let head = String::from_utf8_lossy(&resp[..split]).to_ascii_lowercase();
    assert!(head.contains("content-encoding: gzip"), "{head}");
    assert!(!head.contains("transfer-encoding: chunked"), "{head}");
    resp[split..].to_vec()
}
