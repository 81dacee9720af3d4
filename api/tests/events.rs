//! `GET /v1/events`: a client connected while a VM is created sees the audit entry of
//! the request (with the key that made it), the operation going from running to
//! succeeded, and the VM's `created` event; a refused key shows up in the audit; a
//! client asking only for `vm` events gets nothing else.

mod common;

use std::time::{Duration, Instant};

use common::{create_body, in_private_netns, Stack, LISTEN};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An SSE connection read by hand: events are the JSON after `data: `.
struct Subscription {
    conn: TcpStream,
    buf: String,
}

impl Subscription {
    async fn open(key: &str, query: &str) -> Subscription {
        let mut conn = TcpStream::connect(LISTEN).await.expect("connect");
        let req = format!(
            "GET /v1/events{query} HTTP/1.1\r\nHost: {LISTEN}\r\nAuthorization: Bearer {key}\r\nAccept: text/event-stream\r\n\r\n"
        );
        conn.write_all(req.as_bytes()).await.expect("write");
        let mut sub = Subscription {
            conn,
            buf: String::new(),
        };
        sub.fill_until(|b| b.contains("\r\n\r\n"), Duration::from_secs(5)).await;
        let head = sub.buf.split("\r\n\r\n").next().unwrap_or("").to_string();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase().contains("content-type: text/event-stream"),
            "{head}"
        );
        sub
    }

    async fn fill_until(&mut self, done: impl Fn(&str) -> bool, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 8192];
        while !done(&self.buf) {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.conn.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.push_str(&String::from_utf8_lossy(&chunk[..n])),
                _ => return,
            }
        }
    }

    fn events(&self) -> Vec<Value> {
        self.buf
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }

    /// Reads until an event matches, or panics with what came.
    async fn expect(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(ev) = self.events().into_iter().find(|e| pred(e)) {
                return ev;
            }
            assert!(Instant::now() < deadline, "no {what} event; got {:?}", self.events());
            self.fill_until(|_| false, Duration::from_millis(200)).await;
        }
    }
}

#[test]
fn events_show_operations_lifecycle_and_audit() {
    in_private_netns(|| async {
        let stack = Stack::start(&[]).await;
        let (status, e) = stack.call("GET", "/v1/events?kinds=bogus", None).await;
        assert_eq!(status, 422, "{e}");
        let mut all = Subscription::open(&stack.key, "").await;
        let mut vm_only = Subscription::open(&stack.key, "?kinds=vm").await;

        let mut body = create_body("ev1", "qemu");
        body["nics"] = json!([]);
        let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
        assert_eq!(status, 202, "{accepted}");
        let vm_id = accepted["vm"]["id"].as_str().expect("id").to_string();
        let op_id = accepted["operation"]["id"].as_str().expect("op").to_string();
        assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");

        let audit = all
            .expect("audit of POST /v1/vms", |e| {
                e["kind"] == "audit" && e["data"]["path"] == "/v1/vms" && e["data"]["method"] == "POST"
            })
            .await;
        assert_eq!(audit["data"]["status"], 202);
        assert_eq!(audit["data"]["key_name"], "admin", "{audit}");
        assert_eq!(audit["project"], "default");
        let running = all
            .expect("operation running", |e| {
                e["kind"] == "operation" && e["data"]["id"] == op_id.as_str()
            })
            .await;
        assert_eq!(running["data"]["status"], "running");
        all.expect("operation succeeded", |e| {
            e["kind"] == "operation" && e["data"]["id"] == op_id.as_str() && e["data"]["status"] == "succeeded"
        })
        .await;
        let created = all
            .expect("vm created", |e| e["kind"] == "vm" && e["data"]["id"] == vm_id.as_str())
            .await;
        assert_eq!(created["data"]["change"], "created");
        // Sequence numbers increase.
        let seqs: Vec<u64> = all.events().iter().filter_map(|e| e["seq"].as_u64()).collect();
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");

        // A refused key is audited.
        let refused = stack
            .request_as("GET", "/v1/vms", None, Some("hth_not_a_real_key"))
            .await
            .expect("request");
        assert_eq!(refused.0, 401);
        let denied = all
            .expect("refused key", |e| {
                e["kind"] == "audit" && e["data"]["refused"].is_string()
            })
            .await;
        assert_eq!(denied["data"]["status"], 401);

        stack.act("ev1", "stop").await;
        let stopped = vm_only
            .expect("vm stopped", |e| {
                e["data"]["change"] == "stopped" && e["data"]["id"] == vm_id.as_str()
            })
            .await;
        assert_eq!(stopped["kind"], "vm");
        assert!(
            vm_only.events().iter().all(|e| e["kind"] == "vm"),
            "kinds=vm gets only vm events: {:?}",
            vm_only.events()
        );
    });
}
