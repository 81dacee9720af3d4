//! The client for vmm-manager's Unix-socket API, used by the api.

use std::path::PathBuf;

use http::Method;
use socket_http::route::fill;
use socket_http::{ClientError, UnixClient};
use tokio::net::UnixStream;
use tokio_tungstenite::WebSocketStream;

use crate::http::routes;
use crate::spec::{VmAction, VmEvent, VmInfo, VmSpec};

/// Typed calls to vmm-manager.
#[derive(Debug, Clone)]
pub struct VmmClient {
    http: UnixClient,
}

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            http: UnixClient::new(socket),
        }
    }

    /// Rides out a restart of vmm-manager (see [`UnixClient::with_retry`]).
    pub fn with_retry(mut self, window: std::time::Duration) -> Self {
        self.http = self.http.with_retry(window);
        self
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.http.get(routes::VMS).await
    }

    /// Follows vmm-manager's state changes (`GET /events`). Subscribed once this
    /// returns: every change after that is delivered, in order per VM, until the stream
    /// ends (vmm-manager stopped, or this reader fell behind and must list again).
    pub async fn events(&self) -> Result<VmEvents, ClientError> {
        Ok(VmEvents {
            body: self.http.stream(routes::EVENTS).await?,
            buf: Vec::new(),
            idle: None,
        })
    }

    pub async fn get(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.http.get(&fill(routes::VM, &[id])).await
    }

    pub async fn ensure(&self, spec: &VmSpec) -> Result<VmInfo, ClientError> {
        self.http
            .call(Method::PUT, &fill(routes::VM, &[&spec.id]), Some(spec))
            .await
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.http
            .call::<(), serde_json::Value>(Method::DELETE, &fill(routes::VM, &[id]), None)
            .await
            .map(|_| ())
    }

    /// `action` is one of start, stop, reboot, pause, resume.
    /// Attaches a disk (hot-plugged if the VM runs).
    pub async fn attach_disk(&self, id: &str, disk: &crate::spec::DiskSpec) -> Result<VmInfo, ClientError> {
        self.http
            .call(Method::PUT, &fill(routes::VM_DISK, &[id, &disk.id]), Some(disk))
            .await
    }

    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> Result<VmInfo, ClientError> {
        self.http
            .call::<(), VmInfo>(Method::DELETE, &fill(routes::VM_DISK, &[id, disk_id]), None)
            .await
    }

    /// Tells a running VM that disk `disk_id` grew to `size_bytes`.
    pub async fn resize_disk(&self, id: &str, disk_id: &str, size_bytes: u64) -> Result<VmInfo, ClientError> {
        let body = crate::http::ResizeDisk { size_bytes };
        self.http
            .call(Method::POST, &fill(routes::VM_DISK_RESIZE, &[id, disk_id]), Some(&body))
            .await
    }

    pub async fn action(&self, id: &str, action: VmAction, force: bool) -> Result<VmInfo, ClientError> {
        let q = if force { "?force=true" } else { "" };
        let path = format!("{}{q}", fill(routes::VM_ACTION, &[id, action.as_str()]));
        if action.is_idempotent() {
            self.http.call_repeatable::<(), VmInfo>(Method::POST, &path, None).await
        } else {
            self.http.call::<(), VmInfo>(Method::POST, &path, None).await
        }
    }

    pub async fn console_log(&self, id: &str, max_bytes: usize) -> Result<bytes::Bytes, ClientError> {
        let resp = self
            .http
            .raw(
                Method::GET,
                &format!("{}?bytes={max_bytes}", fill(routes::CONSOLE_LOG, &[id])),
                None,
            )
            .await?;
        if resp.status.is_success() {
            Ok(resp.body)
        } else {
            Err(self.http.api_error(&resp))
        }
    }

    /// The host's CPUs, memory, hypervisors and vmm-manager's version.
    pub async fn host(&self) -> Result<crate::spec::HostFacts, ClientError> {
        self.http.get(routes::HOST).await
    }

    pub async fn hypervisors(&self) -> Result<Vec<crate::service::HypervisorAvailability>, ClientError> {
        self.http.get(routes::HYPERVISORS).await
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.http.get("/health").await
    }

    /// Opens the console WebSocket over the Unix socket. With `takeover`, a writer takes
    /// the keyboard from the client that has it.
    pub async fn console(
        &self,
        id: &str,
        write: bool,
        takeover: bool,
    ) -> Result<WebSocketStream<UnixStream>, ClientError> {
        self.websocket(&format!(
            "{}?write={write}&takeover={takeover}",
            fill(routes::CONSOLE, &[id])
        ))
        .await
    }

    /// Opens the VNC (RFB over WebSocket) stream of a QEMU VM with a display.
    pub async fn vnc(&self, id: &str) -> Result<WebSocketStream<UnixStream>, ClientError> {
        self.websocket(&fill(routes::VNC, &[id])).await
    }

    async fn websocket(&self, path: &str) -> Result<WebSocketStream<UnixStream>, ClientError> {
        let socket = self.http.socket().to_path_buf();
        let stream = UnixStream::connect(&socket)
            .await
            .map_err(|source| ClientError::Connect {
                socket: socket.clone(),
                source,
            })?;
        let url = format!("ws://localhost{path}");
        match tokio_tungstenite::client_async(url, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.body().clone().unwrap_or_default();
                Err(self.http.api_error(&socket_http::client::RawResponse {
                    status,
                    body: body.into(),
                }))
            }
            Err(e) => Err(ClientError::Transport {
                socket,
                message: e.to_string(),
            }),
        }
    }
}

/// The server-sent events of `GET /events`, decoded.
pub struct VmEvents {
    body: socket_http::Streaming,
    buf: Vec<u8>,
    idle: Option<std::time::Duration>,
}

impl VmEvents {
    /// Makes [`VmEvents::next`] fail when nothing at all (not even a keep-alive)
    /// arrives for `idle`.
    pub fn with_idle_timeout(mut self, idle: std::time::Duration) -> Self {
        self.idle = Some(idle);
        self
    }

    /// The next change; `None` when the stream ended, `Some(Err)` when it broke.
    pub async fn next(&mut self) -> Option<Result<VmEvent, ClientError>> {
        loop {
            if let Some(end) = self.buf.windows(2).position(|w| w == b"\n\n") {
                let message: Vec<u8> = self.buf.drain(..end + 2).collect();
                if let Some(ev) = parse_sse_message(&message) {
                    return Some(ev);
                }
                continue;
            }
            let chunk = match self.idle {
                Some(idle) => match tokio::time::timeout(idle, self.body.chunk()).await {
                    Ok(c) => c?,
                    Err(_) => {
                        return Some(Err(ClientError::Timeout {
                            socket: std::path::PathBuf::from("/events"),
                            timeout: idle,
                        }))
                    }
                },
                None => self.body.chunk().await?,
            };
            match chunk {
                Ok(chunk) => self.buf.extend_from_slice(&chunk),
                Err(e) => return Some(Err(e)),
            }
        }
    }
}

/// One SSE message: its `data:` lines joined, decoded as a [`VmEvent`]. Comments and
/// keep-alives (no data) give `None`.
fn parse_sse_message(message: &[u8]) -> Option<Result<VmEvent, ClientError>> {
    let text = String::from_utf8_lossy(message);
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .map(|d| d.strip_prefix(' ').unwrap_or(d))
        .collect();
    if data.is_empty() {
        return None;
    }
    Some(serde_json::from_str(&data.join("\n")).map_err(|e| ClientError::Decode {
        socket: std::path::PathBuf::from("/events"),
        message: e.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_messages_decode_and_keep_alives_are_skipped() {
        assert!(parse_sse_message(b":\n\n").is_none());
        let ev = parse_sse_message(
            b"event: vm\ndata: {\"vm_id\":\"a\",\"name\":\"n\",\"state\":\"running\",\"pid\":7,\"at_ms\":1,\"seq\":9}\n\n",
        )
        .expect("a message")
        .expect("decodes");
        assert_eq!((ev.vm_id.as_str(), ev.pid, ev.seq), ("a", Some(7), 9));
        assert!(matches!(parse_sse_message(b"data: {\n\n"), Some(Err(_))));
    }
}
