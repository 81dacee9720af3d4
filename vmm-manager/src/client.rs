//! vmm-manager's client: typed calls and its streams, over any endpoint.

use std::path::PathBuf;

use socket_http::client::Io;
use socket_http::{Client, ClientError};
use tokio_tungstenite::WebSocketStream;

use crate::http::routes;
use crate::spec::{DiskSpec, VmAction, VmEvent, VmInfo, VmSpec};

/// vmm-manager's callers' view of it: the one client (`socket_http::Client`, any
/// endpoint, Unix socket or TLS) and vmm-manager's typed routes; these are shorthands
/// for the calls made most, and the streams (events, console, VNC) JSON calls cannot
/// carry.
#[derive(Debug, Clone)]
pub struct VmmClient(pub Client);

impl VmmClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self(Client::new(socket))
    }

    /// Rides out a restart of vmm-manager (see [`Client::with_retry`]).
    pub fn with_retry(self, window: std::time::Duration) -> Self {
        Self(self.0.with_retry(window))
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ClientError> {
        self.0.send(&routes::VMS, &[], None).await
    }

    /// Follows vmm-manager's state changes (`GET /events`). Subscribed once this
    /// returns: every change after that is delivered, in order per VM, until the stream
    /// ends (vmm-manager stopped, or this reader fell behind and must list again).
    pub async fn events(&self) -> Result<VmEvents, ClientError> {
        Ok(VmEvents {
            body: self.0.stream(routes::EVENTS.path).await?,
            buf: Vec::new(),
            idle: None,
        })
    }

    pub async fn get(&self, id: &str) -> Result<VmInfo, ClientError> {
        self.0.send(&routes::VM, &[id], None).await
    }

    pub async fn ensure(&self, spec: &VmSpec) -> Result<VmInfo, ClientError> {
        self.0.send(&routes::PUT_VM, &[&spec.id], Some(spec)).await
    }

    pub async fn delete(&self, id: &str) -> Result<(), ClientError> {
        self.0.send(&routes::DELETE_VM, &[id], None).await
    }

    /// Attaches a disk (hot-plugged if the VM runs).
    pub async fn attach_disk(&self, id: &str, disk: &DiskSpec) -> Result<VmInfo, ClientError> {
        self.0.send(&routes::VM_DISK, &[id, &disk.id], Some(disk)).await
    }

    pub async fn detach_disk(&self, id: &str, disk_id: &str) -> Result<VmInfo, ClientError> {
        self.0.send(&routes::DELETE_VM_DISK, &[id, disk_id], None).await
    }

    /// Tells a running VM that disk `disk_id` grew to `size_bytes`.
    pub async fn resize_disk(&self, id: &str, disk_id: &str, size_bytes: u64) -> Result<VmInfo, ClientError> {
        let body = crate::http::ResizeDisk { size_bytes };
        self.0.send(&routes::VM_DISK_RESIZE, &[id, disk_id], Some(&body)).await
    }

    /// Gives a VM `vcpus` and `memory_mib`: hot-plugged while it runs, else at its next start.
    pub async fn resize(&self, id: &str, vcpus: u32, memory_mib: u64) -> Result<VmInfo, ClientError> {
        let body = crate::spec::Resize { vcpus, memory_mib };
        self.0.send(&routes::VM_RESIZE, &[id], Some(&body)).await
    }

    /// Saves the paused VM's memory and devices as `name` (again: the same state).
    pub async fn save_state(&self, id: &str, name: &str) -> Result<crate::service::SavedState, ClientError> {
        self.0.send(&routes::SAVE_STATE, &[id, name], None).await
    }

    pub async fn states(&self, id: &str) -> Result<Vec<crate::service::SavedState>, ClientError> {
        self.0.send(&routes::STATES, &[id], None).await
    }

    pub async fn delete_state(&self, id: &str, name: &str) -> Result<(), ClientError> {
        self.0.send(&routes::DELETE_STATE, &[id, name], None).await
    }

    /// Takes the VM back to saved state `name` in a fresh VMM; it runs on from there.
    pub async fn restore_state(&self, id: &str, name: &str) -> Result<VmInfo, ClientError> {
        self.0.send(&routes::RESTORE_STATE, &[id, name], None).await
    }

    /// Start and stop may be sent again when vmm-manager died before answering.
    pub async fn action(&self, id: &str, action: VmAction, force: bool) -> Result<VmInfo, ClientError> {
        let route = &routes::VM_ACTION;
        let q = if force { "?force=true" } else { "" };
        let path = format!("{}{q}", route.at(&[id, action.as_str()]));
        if action.is_idempotent() {
            self.0
                .call_repeatable::<(), VmInfo>(route.method.clone(), &path, None)
                .await
        } else {
            self.0.call::<(), VmInfo>(route.method.clone(), &path, None).await
        }
    }

    pub async fn console_log(&self, id: &str, max_bytes: usize) -> Result<bytes::Bytes, ClientError> {
        let route = &routes::CONSOLE_LOG;
        let path = format!("{}?bytes={max_bytes}", route.at(&[id]));
        let resp = self.0.raw(route.method.clone(), &path, None).await?;
        if resp.status.is_success() {
            Ok(resp.body)
        } else {
            Err(self.0.api_error(&resp))
        }
    }

    /// One request to a VM's guest agent, and its answer.
    pub async fn agent(
        &self,
        id: &str,
        request: &serde_json::Value,
        timeout: std::time::Duration,
    ) -> Result<serde_json::Value, ClientError> {
        let path = format!("{}?timeout_s={}", routes::AGENT.at(&[id]), timeout.as_secs().max(1));
        self.0.call(routes::AGENT.method.clone(), &path, Some(request)).await
    }

    /// The host's CPUs, memory, hypervisors and vmm-manager's version.
    pub async fn host(&self) -> Result<crate::spec::HostFacts, ClientError> {
        self.0.send(&routes::HOST, &[], None).await
    }

    /// Whether KVM runs a stock Linux guest on the host (see [`routes::KVM`]).
    pub async fn kvm(&self, kernel: &std::path::Path) -> Result<crate::hypervisor::qemu::KvmVerdict, ClientError> {
        let body = crate::http::KvmProbe {
            kernel: kernel.to_path_buf(),
        };
        self.0.send_repeatable(&routes::KVM, &[], Some(&body)).await
    }

    pub async fn hypervisors(&self) -> Result<Vec<crate::service::HypervisorAvailability>, ClientError> {
        self.0.send(&routes::HYPERVISORS, &[], None).await
    }

    pub async fn health(&self) -> Result<serde_json::Value, ClientError> {
        self.0.get("/health").await
    }

    /// Opens the console WebSocket. With `takeover`, a writer takes the keyboard from
    /// the client that has it.
    pub async fn console(
        &self,
        id: &str,
        write: bool,
        takeover: bool,
    ) -> Result<WebSocketStream<Box<dyn Io>>, ClientError> {
        self.websocket(&format!(
            "{}?write={write}&takeover={takeover}",
            routes::CONSOLE.at(&[id])
        ))
        .await
    }

    /// Opens the VNC (RFB over WebSocket) stream of a QEMU VM with a display.
    pub async fn vnc(&self, id: &str) -> Result<WebSocketStream<Box<dyn Io>>, ClientError> {
        self.websocket(&routes::VNC.at(&[id])).await
    }

    async fn websocket(&self, path: &str) -> Result<WebSocketStream<Box<dyn Io>>, ClientError> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let stream = self.0.connect().await?;
        let endpoint = self.0.endpoint().to_string();
        let transport = |message: String| ClientError::Transport {
            endpoint: endpoint.clone(),
            message,
        };
        let mut request = format!("ws://localhost{path}")
            .into_client_request()
            .map_err(|e| transport(e.to_string()))?;
        if let Some(auth) = self.0.authorization() {
            let value = auth
                .parse()
                .map_err(|e: http::header::InvalidHeaderValue| transport(e.to_string()))?;
            request.headers_mut().insert(http::header::AUTHORIZATION, value);
        }
        match tokio_tungstenite::client_async(request, stream).await {
            Ok((ws, _)) => Ok(ws),
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = resp.status();
                let body = resp.body().clone().unwrap_or_default();
                Err(self.0.api_error(&socket_http::client::RawResponse {
                    status,
                    body: body.into(),
                }))
            }
            Err(e) => Err(transport(e.to_string())),
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
                            endpoint: "/events".into(),
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
        endpoint: "/events".into(),
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
