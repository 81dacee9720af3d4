//! vmm-manager's HTTP/JSON API on its Unix socket. Handlers only parse and map; the
//! work is in [`VmService`].
//!
//! - `GET /vms`, `GET /vms/{id}`, `PUT /vms/{id}` (ensure, body = `VmSpec`),
//!   `DELETE /vms/{id}` (also succeeds when missing)
//! - `POST /vms/{id}/{start|stop|reboot|pause|resume}` (`stop?force=true` skips the
//!   power button)
//! - `GET /vms/{id}/console/log?bytes=N`: scrollback as raw bytes
//! - `GET /vms/{id}/vnc`: WebSocket carrying RFB to and from QEMU's VNC socket
//! - `GET /vms/{id}/console?write=true[&takeover=true]`: WebSocket; first the ring buffer, then live
//!   output as binary frames; with `write=true` (one writer at a time) frames from the
//!   client are typed into the guest
//! - `PUT /vms/{id}/disks/{disk}` (body = `DiskSpec`), `DELETE /vms/{id}/disks/{disk}`:
//!   attach and detach, hot-plugged while the VM runs
//! - `POST /vms/{id}/disks/{disk}/resize` (body `{"size_bytes": N}`): the disk's file
//!   or device grew; a running guest is told its new capacity
//! - `GET /events`: server-sent events of VM state changes
//! - `GET /hypervisors`: which hypervisors can run VMs on this host
//! - `GET /host`: this host's CPUs, memory (total and available), hypervisors, version
//! - `POST /host/kvm` (body `{"kernel": PATH}`): whether KVM runs a stock Linux guest
//!   here, learned by booting that kernel once (or the operator's `--accel`)

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use futures_util::{SinkExt, Stream, StreamExt};
use serde::Deserialize;
use socket_http::ApiError;
use tokio::sync::broadcast::error::RecvError;

use crate::console::{ConsoleWriter, SerialConsole};
use crate::service::VmService;
use crate::spec::{Resize, VmAction, VmInfo, VmSpec};

type Svc = State<Arc<VmService>>;

/// Every route of vmm-manager's API, named once for the router and the client.
pub mod routes {
    use socket_http::route::{delete, get, post, put};
    use socket_http::Route;

    use super::{KvmProbe, ResizeDisk};
    use crate::hypervisor::qemu::KvmVerdict;
    use crate::service::{HypervisorAvailability, SavedState};
    use crate::spec::{DiskSpec, HostFacts, Resize, VmInfo, VmSpec};

    pub const VMS: Route<(), Vec<VmInfo>> = get("/vms");
    pub const VM: Route<(), VmInfo> = get("/vms/{id}");
    pub const PUT_VM: Route<VmSpec, VmInfo> = put("/vms/{id}");
    pub const DELETE_VM: Route<(), ()> = delete("/vms/{id}");
    /// `{action}` is a [`crate::spec::VmAction`]; `?force=true` stops at once.
    pub const VM_ACTION: Route<(), VmInfo> = post("/vms/{id}/{action}");
    pub const VM_DISK: Route<DiskSpec, VmInfo> = put("/vms/{id}/disks/{disk}");
    pub const DELETE_VM_DISK: Route<(), VmInfo> = delete("/vms/{id}/disks/{disk}");
    pub const VM_DISK_RESIZE: Route<ResizeDisk, VmInfo> = post("/vms/{id}/disks/{disk}/resize");
    /// vCPUs and memory: hot-plugged into a running VM, or for the next start.
    pub const VM_RESIZE: Route<Resize, VmInfo> = post("/vms/{id}/resize");
    /// Saved states (memory and devices) of a paused VM.
    pub const STATES: Route<(), Vec<SavedState>> = get("/vms/{id}/states");
    pub const SAVE_STATE: Route<(), SavedState> = put("/vms/{id}/states/{name}");
    pub const DELETE_STATE: Route<(), ()> = delete("/vms/{id}/states/{name}");
    pub const RESTORE_STATE: Route<(), VmInfo> = post("/vms/{id}/states/{name}/restore");
    /// The serial log's last bytes (`?bytes=N`), as bytes, not JSON.
    pub const CONSOLE_LOG: Route<(), ()> = get("/vms/{id}/console/log");
    /// A WebSocket: the serial console.
    pub const CONSOLE: Route<(), ()> = get("/vms/{id}/console");
    /// A WebSocket: the VNC screen (RFB).
    pub const VNC: Route<(), ()> = get("/vms/{id}/vnc");
    /// Server-sent events, each a [`crate::spec::VmEvent`].
    pub const EVENTS: Route<(), ()> = get("/events");
    pub const HYPERVISORS: Route<(), Vec<HypervisorAvailability>> = get("/hypervisors");
    pub const HOST: Route<(), HostFacts> = get("/host");
    /// Whether KVM runs a stock Linux guest here (one probe boot of the kernel given,
    /// made once; or the operator's `--accel`).
    pub const KVM: Route<KvmProbe, KvmVerdict> = post("/host/kvm");
    /// One request to the VM's guest agent; the agent's answer (`?timeout_s=`, default 60).
    pub const AGENT: Route<serde_json::Value, serde_json::Value> = post("/vms/{id}/agent");
}

pub fn router(svc: Arc<VmService>) -> Router {
    use routes::*;
    Router::new()
        .route(VMS.path, VMS.on(list))
        .route(VM.path, VM.on(show))
        .route(PUT_VM.path, PUT_VM.on(ensure))
        .route(DELETE_VM.path, DELETE_VM.on(remove))
        .route(VM_ACTION.path, VM_ACTION.on(action))
        .route(VM_DISK.path, VM_DISK.on(attach_disk))
        .route(DELETE_VM_DISK.path, DELETE_VM_DISK.on(detach_disk))
        .route(VM_DISK_RESIZE.path, VM_DISK_RESIZE.on(resize_disk))
        .route(VM_RESIZE.path, VM_RESIZE.on(resize))
        .route(STATES.path, STATES.on(states))
        .route(SAVE_STATE.path, SAVE_STATE.on(save_state))
        .route(DELETE_STATE.path, DELETE_STATE.on(delete_state))
        .route(RESTORE_STATE.path, RESTORE_STATE.on(restore_state))
        .route(CONSOLE_LOG.path, CONSOLE_LOG.on(console_log))
        .route(CONSOLE.path, CONSOLE.on(console))
        .route(VNC.path, VNC.on(vnc))
        .route(EVENTS.path, EVENTS.on(events))
        .route(HYPERVISORS.path, HYPERVISORS.on(hypervisors))
        .route(HOST.path, HOST.on(host))
        .route(KVM.path, KVM.on(kvm))
        .route(AGENT.path, AGENT.on(agent))
        .with_state(svc)
        .merge(socket_http::server::health_router("vmm-manager"))
}

#[derive(serde::Deserialize)]
struct AgentQuery {
    timeout_s: Option<u64>,
}

async fn agent(
    State(svc): Svc,
    Path(id): Path<String>,
    Query(q): Query<AgentQuery>,
    Json(request): Json<serde_json::Value>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if !request.is_object() {
        return Err(ApiError::unprocessable("a guest agent request is a JSON object"));
    }
    let timeout = std::time::Duration::from_secs(q.timeout_s.unwrap_or(60).clamp(1, 900));
    Ok(Json(svc.agent(&id, request, timeout).await?))
}

/// The body of `POST /host/kvm`: a Linux kernel to probe KVM with.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct KvmProbe {
    pub kernel: std::path::PathBuf,
}

async fn kvm(
    State(svc): Svc,
    Json(probe): Json<KvmProbe>,
) -> Result<Json<crate::hypervisor::qemu::KvmVerdict>, ApiError> {
    Ok(Json(svc.kvm(&probe.kernel).await?))
}

async fn host(State(svc): Svc) -> Json<crate::spec::HostFacts> {
    Json(svc.host())
}

async fn hypervisors(State(svc): Svc) -> Json<Vec<crate::service::HypervisorAvailability>> {
    Json(svc.hypervisors())
}

async fn list(State(svc): Svc) -> Json<Vec<VmInfo>> {
    Json(svc.list())
}

async fn show(State(svc): Svc, Path(id): Path<String>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(svc.get(&id)?))
}

async fn ensure(State(svc): Svc, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let spec: VmSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid VM spec: {e}")))?;
    if spec.id != id {
        return Err(ApiError::unprocessable(format!(
            "spec id {:?} does not match the URL's {id:?}",
            spec.id
        )));
    }
    let (info, created) = svc.create(spec).await?;
    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(info)).into_response())
}

async fn remove(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    svc.delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct ActionQuery {
    #[serde(default)]
    force: bool,
}

async fn action(
    State(svc): Svc,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> Result<Json<VmInfo>, ApiError> {
    let action: VmAction = action.parse().map_err(ApiError::not_found)?;
    let info = match action {
        VmAction::Start => svc.start(&id).await?,
        VmAction::Stop => svc.stop(&id, q.force).await?,
        VmAction::Reboot => svc.reboot(&id).await?,
        VmAction::Pause => svc.pause(&id).await?,
        VmAction::Resume => svc.resume(&id).await?,
    };
    Ok(Json(info))
}

#[derive(Deserialize)]
struct LogQuery {
    bytes: Option<usize>,
}

async fn attach_disk(
    State(svc): Svc,
    Path((id, disk)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<VmInfo>, ApiError> {
    let spec: crate::spec::DiskSpec =
        serde_json::from_slice(&body).map_err(|e| ApiError::unprocessable(format!("invalid disk: {e}")))?;
    if spec.id != disk {
        return Err(ApiError::unprocessable(format!(
            "body names disk {:?}, the URL {disk:?}",
            spec.id
        )));
    }
    Ok(Json(svc.attach_disk(&id, spec).await?))
}

async fn detach_disk(State(svc): Svc, Path((id, disk)): Path<(String, String)>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(svc.detach_disk(&id, &disk).await?))
}

/// The body of `POST /vms/{id}/disks/{disk}/resize`.
#[derive(serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResizeDisk {
    pub size_bytes: u64,
}

async fn resize_disk(
    State(svc): Svc,
    Path((id, disk)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<Json<VmInfo>, ApiError> {
    let r: ResizeDisk =
        serde_json::from_slice(&body).map_err(|e| ApiError::unprocessable(format!("invalid resize: {e}")))?;
    Ok(Json(svc.resize_disk(&id, &disk, r.size_bytes).await?))
}

async fn resize(State(svc): Svc, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<VmInfo>, ApiError> {
    let r: Resize =
        serde_json::from_slice(&body).map_err(|e| ApiError::unprocessable(format!("invalid resize: {e}")))?;
    Ok(Json(svc.resize(&id, r).await?))
}

async fn states(State(svc): Svc, Path(id): Path<String>) -> Result<Json<Vec<crate::service::SavedState>>, ApiError> {
    Ok(Json(svc.saved_states(&id)?))
}

async fn save_state(
    State(svc): Svc,
    Path((id, name)): Path<(String, String)>,
) -> Result<Json<crate::service::SavedState>, ApiError> {
    Ok(Json(svc.save_state(&id, &name).await?))
}

async fn delete_state(State(svc): Svc, Path((id, name)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    svc.delete_state(&id, &name)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restore_state(State(svc): Svc, Path((id, name)): Path<(String, String)>) -> Result<Json<VmInfo>, ApiError> {
    Ok(Json(svc.restore_state(&id, &name).await?))
}

async fn console_log(State(svc): Svc, Path(id): Path<String>, Query(q): Query<LogQuery>) -> Result<Response, ApiError> {
    let bytes = svc.console_log(&id, q.bytes.unwrap_or(256 * 1024).min(64 * 1024 * 1024))?;
    Ok(([(axum::http::header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
}

#[derive(Deserialize)]
struct ConsoleQuery {
    #[serde(default)]
    write: bool,
    /// With `write`: take the keyboard from the client that has it.
    #[serde(default)]
    takeover: bool,
}

async fn console(
    State(svc): Svc,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let console = svc.console(&id)?;
    let writer = match (q.write, q.takeover) {
        (false, _) => None,
        (true, false) => console.try_writer(),
        (true, true) => console.take_writer(std::time::Duration::from_secs(5)).await,
    };
    if q.write && writer.is_none() {
        return Err(crate::service::ServiceError::WriterBusy(id.clone()).into());
    }
    Ok(ws.on_upgrade(move |socket| serve_console(socket, console, writer)))
}

/// Moves bytes between one WebSocket client and the console until either side goes.
pub async fn serve_console(socket: WebSocket, console: Arc<SerialConsole>, mut writer: Option<ConsoleWriter>) {
    let sub = console.subscribe();
    drop(console);
    let (mut tx, mut rx) = socket.split();
    let mut live = sub.live;
    if tx.send(Message::Binary(sub.scrollback)).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            out = live.recv() => match out {
                Ok(chunk) => if tx.send(Message::Binary(chunk)).await.is_err() { return },
                // A slow client loses output rather than holding anyone up.
                Err(RecvError::Lagged(n)) => tracing::debug!("console reader lagged by {n} chunks"),
                Err(RecvError::Closed) => {
                    let _ = tx.send(Message::Close(Some(axum::extract::ws::CloseFrame { code: 1000, reason: "the VM stopped".into() }))).await;
                    return;
                }
            },
            () = async { match writer.as_mut() { Some(w) => w.taken_over().await, None => std::future::pending().await } } => {
                writer = None;
                let notice = "\r\n[hearth: another client took the keyboard; this one only watches now]\r\n";
                if tx.send(Message::Binary(bytes::Bytes::from_static(notice.as_bytes()))).await.is_err() { return }
            },
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => if let Some(w) = &writer { if w.write(b).await.is_err() { return } },
                Some(Ok(Message::Text(t))) => if let Some(w) = &writer { if w.write(bytes::Bytes::from(t.as_str().to_owned())).await.is_err() { return } },
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => {}
            },
        }
    }
}

/// `GET /vms/{id}/vnc`: a WebSocket carrying the VM's RFB stream (binary frames both ways),
/// connected to QEMU's VNC Unix socket.
async fn vnc(State(svc): Svc, Path(id): Path<String>, ws: WebSocketUpgrade) -> Result<Response, ApiError> {
    let socket = svc.vnc_socket(&id)?;
    // Connect before upgrading, so that a refusal has a proper status.
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| ApiError::conflict(format!("the VNC server of VM {id} does not answer: {e}")))?;
    Ok(ws.on_upgrade(move |socket| serve_vnc(socket, stream)))
}

/// Moves RFB bytes between a WebSocket client and the VNC server until either side goes.
/// Back-pressure is end to end: a client that stops reading stalls only its own stream.
async fn serve_vnc(socket: WebSocket, stream: tokio::net::UnixStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut tx, mut rx) = socket.split();
    let (mut vnc_rx, mut vnc_tx) = stream.into_split();
    let down = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match vnc_rx.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx
                        .send(Message::Binary(bytes::Bytes::copy_from_slice(&buf[..n])))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = tx.close().await;
    };
    let up = async {
        while let Some(Ok(msg)) = rx.next().await {
            let data = match msg {
                Message::Binary(b) => b,
                Message::Close(_) => break,
                _ => continue,
            };
            if vnc_tx.write_all(&data).await.is_err() {
                break;
            }
        }
        let _ = vnc_tx.shutdown().await;
    };
    tokio::select! {
        () = down => {},
        () = up => {},
    }
}

async fn events(State(svc): Svc) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = svc.subscribe();
    let closed = svc.closed();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        // A subscriber that fell behind has lost changes: the stream ends, so it
        // reconnects and reads the list again instead of keeping a stale view.
        let ev = rx.recv().await.ok()?;
        let data = serde_json::to_string(&ev).unwrap_or_default();
        Some((Ok(Event::default().event("vm").data(data)), rx))
    })
    .take_until(closed);
    Sse::new(stream).keep_alive(axum::response::sse::KeepAlive::default())
}
