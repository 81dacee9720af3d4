//! Consoles: tickets, VNC over WebSocket, origins, viewers, taking the keyboard over and
//! slow clients, against a real QEMU/TCG guest and the Cloud Hypervisor fake.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{create_body, in_private_netns, Stack, LISTEN};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Opens a WebSocket to `path` with `headers`; the HTTP status when it is refused.
async fn ws(path: &str, headers: &[(&str, &str)]) -> Result<Ws, u16> {
    let mut req = format!("ws://{LISTEN}{path}").into_client_request().expect("request");
    for (name, value) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).expect("name"),
            value.parse().expect("value"),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("{path}: {e}"),
    }
}

async fn ticket(stack: &Stack, vm: &str, body: Value, key: &str) -> (u16, Value) {
    let body = body.to_string();
    stack
        .request_as(
            "POST",
            &format!("/v1/vms/{vm}/console/ticket"),
            Some(body.as_bytes()),
            Some(key),
        )
        .await
        .expect("ticket request")
}

/// `path` with the ticket of a `POST .../console/ticket` answer.
fn with_ticket(path: &str, answer: &Value) -> String {
    let token = answer["ticket"]
        .as_str()
        .unwrap_or_else(|| panic!("no ticket in {answer}"));
    format!("{path}?ticket={token}")
}

/// Reads until `needle` shows up (or panics after `within`); returns what was read.
async fn read_until(ws: &mut Ws, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    let mut seen = String::new();
    while !seen.contains(needle) {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, ws.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => seen.push_str(&String::from_utf8_lossy(&b)),
            Ok(Some(Ok(_))) => {}
            other => panic!("no {needle:?} ({other:?}); saw {:?}", tail(&seen)),
        }
    }
    seen
}

fn tail(s: &str) -> &str {
    &s[s.len().saturating_sub(400)..]
}

async fn create(stack: &Stack, body: Value) {
    let (status, accepted) = stack.call("POST", "/v1/vms", Some(body)).await;
    assert_eq!(status, 202, "{accepted}");
    assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded", "{accepted}");
}

#[test]
fn tickets_vnc_origins_viewers_takeover_and_slow_clients() {
    in_private_netns(|| async {
        std::env::set_var("HEARTH_CONSOLE_TICKET_TTL_MS", "2000");
        let stack = Stack::start(&[]).await;
        let admin = stack.key.clone();
        let mut gui = create_body("gui", "qemu");
        gui["vnc"] = json!(true);
        gui["nics"] = json!([]);
        create(&stack, gui).await;
        let mut serial_only = create_body("headless", "cloud-hypervisor");
        serial_only["nics"] = json!([]);
        create(&stack, serial_only).await;
        stack
            .wait_console("gui", "HEARTH-GUEST-READY", 1, Duration::from_secs(120))
            .await;

        // A ticket opens the console once, without a key.
        let (status, t) = ticket(&stack, "gui", json!({"kind": "serial"}), &admin).await;
        assert_eq!(status, 201, "{t}");
        let path = with_ticket("/v1/vms/gui/console", &t);
        let mut console = ws(&path, &[]).await.expect("the ticket opens the console");
        console
            .send(Message::Binary(Bytes::from_static(b"echo T$((6*7))\n")))
            .await
            .expect("type");
        read_until(&mut console, "T42", Duration::from_secs(30)).await;
        assert_eq!(ws(&path, &[]).await.err(), Some(401), "a ticket works once");
        drop(console);

        // Bound to its VM and its kind; short-lived; never from another origin.
        let (_, t) = ticket(&stack, "gui", json!({}), &admin).await;
        let other_vm = with_ticket("/v1/vms/headless/console", &t);
        assert_eq!(ws(&other_vm, &[]).await.err(), Some(403), "a ticket for another VM");
        let (_, t) = ticket(&stack, "gui", json!({"kind": "serial"}), &admin).await;
        let wrong_kind = with_ticket("/v1/vms/gui/vnc", &t);
        assert_eq!(ws(&wrong_kind, &[]).await.err(), Some(403), "a serial ticket for VNC");
        let (_, t) = ticket(&stack, "gui", json!({}), &admin).await;
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let expired = with_ticket("/v1/vms/gui/console", &t);
        assert_eq!(ws(&expired, &[]).await.err(), Some(401), "an expired ticket");
        assert_eq!(
            ws("/v1/vms/gui/console?ticket=made-up", &[]).await.err(),
            Some(401),
            "an unknown ticket"
        );
        let (_, t) = ticket(&stack, "gui", json!({}), &admin).await;
        let path = with_ticket("/v1/vms/gui/console", &t);
        assert_eq!(
            ws(&path, &[("origin", "http://evil.example")]).await.err(),
            Some(403),
            "another site's page"
        );
        let own_origin = format!("http://{LISTEN}");
        let (_, t) = ticket(&stack, "gui", json!({}), &admin).await;
        let path = with_ticket("/v1/vms/gui/console", &t);
        assert!(
            ws(&path, &[("origin", own_origin.as_str())]).await.is_ok(),
            "our own page"
        );

        // VNC: RFB through the WebSocket; a VM without a display is refused with the reason.
        let (status, t) = ticket(&stack, "gui", json!({"kind": "vnc"}), &admin).await;
        assert_eq!(status, 201, "{t}");
        let mut vnc = ws(&with_ticket("/v1/vms/gui/vnc", &t), &[]).await.expect("vnc");
        match tokio::time::timeout(Duration::from_secs(10), vnc.next()).await {
            Ok(Some(Ok(Message::Binary(b)))) => assert!(b.starts_with(b"RFB 003."), "{b:?}"),
            other => panic!("no RFB greeting: {other:?}"),
        }
        drop(vnc);
        let (status, err) = ticket(&stack, "headless", json!({"kind": "vnc"}), &admin).await;
        assert_eq!(status, 409, "{err}");
        assert!(
            err["error"]["message"]
                .as_str()
                .expect("message")
                .contains("no framebuffer"),
            "{err}"
        );
        let bearer = format!("Bearer {admin}");
        assert_eq!(
            ws("/v1/vms/headless/vnc", &[("authorization", bearer.as_str())])
                .await
                .err(),
            Some(409)
        );

        // A viewer watches but cannot type.
        let viewer_key = stack.key_for("watcher", "default", "viewer").await;
        let (status, err) = ticket(&stack, "gui", json!({"write": true}), &viewer_key).await;
        assert_eq!(status, 403, "{err}");
        assert!(
            err["error"]["message"].as_str().expect("m").contains("consoles.write"),
            "{err}"
        );
        let viewer_bearer = format!("Bearer {viewer_key}");
        assert_eq!(
            ws("/v1/vms/gui/console", &[("authorization", viewer_bearer.as_str())])
                .await
                .err(),
            Some(403),
            "write=true is the default and a viewer may not"
        );
        let (status, t) = ticket(&stack, "gui", json!({"write": false}), &viewer_key).await;
        assert_eq!(status, 201, "{t}");
        let mut watcher = ws(&with_ticket("/v1/vms/gui/console", &t), &[])
            .await
            .expect("a viewer may watch");
        watcher
            .send(Message::Binary(Bytes::from_static(b"echo VIEWER$((1+1))\n")))
            .await
            .expect("send");
        let out = stack.console_run("gui", "echo ADMIN$((2+2))").await;
        assert!(out.contains("ADMIN4"), "{out}");
        let seen = read_until(&mut watcher, "ADMIN4", Duration::from_secs(30)).await;
        assert!(
            !seen.contains("VIEWER2"),
            "the viewer's keystrokes reached the guest: {seen:?}"
        );

        // One writer at a time; taking over is explicit and the old writer is told.
        // The console_run writer above may take a moment to be let go upstream.
        let mut first = {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                match ws("/v1/vms/gui/console", &[("authorization", bearer.as_str())]).await {
                    Ok(w) => break w,
                    Err(409) if std::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(status) => panic!("first writer: {status}"),
                }
            }
        };
        assert_eq!(
            ws("/v1/vms/gui/console", &[("authorization", bearer.as_str())])
                .await
                .err(),
            Some(409),
            "a second writer without takeover"
        );
        let mut second = ws(
            "/v1/vms/gui/console?takeover=true",
            &[("authorization", bearer.as_str())],
        )
        .await
        .expect("taking over");
        read_until(&mut first, "took the keyboard", Duration::from_secs(10)).await;
        second
            .send(Message::Binary(Bytes::from_static(b"echo SECOND$((5+5))\n")))
            .await
            .expect("send");
        read_until(&mut second, "SECOND10", Duration::from_secs(30)).await;
        drop(first);
        drop(second);

        // A client that stops reading holds up neither the guest nor anyone else.
        let stalled = ws("/v1/vms/gui/console?write=false", &[("authorization", bearer.as_str())])
            .await
            .expect("stalled reader");
        let started = Instant::now();
        let out = stack.console_run("gui", "seq 1 60000; echo FLOOD-$((3*5))").await;
        assert!(out.contains("FLOOD-15"), "{}", tail(&out));
        let out = stack.console_run("gui", "echo AFTER$((7*6))").await;
        assert!(out.contains("AFTER42"), "{out}");
        eprintln!("flood of 60000 lines with a stalled reader: {:?}", started.elapsed());
        drop(stalled);

        for vm in ["gui", "headless"] {
            let (_, accepted) = stack.call("DELETE", &format!("/v1/vms/{vm}"), None).await;
            assert_eq!(stack.wait_op(&accepted).await["status"], "succeeded");
        }
    });
}
