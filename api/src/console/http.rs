//! The console routes: tickets, the serial console and VNC, proxied to vmm-manager.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::{Extension, Json};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;
use tokio_tungstenite::tungstenite::Message as UpMessage;

use crate::auth::keys::Caller;
use crate::console::tickets::{Ticket, TicketKind};
use crate::daemons::upstream;
use crate::json::Query;
use crate::model::VmRecord;
use crate::state::AppState;
use crate::vms::records::resolve;

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TicketRequest {
    #[serde(default)]
    kind: TicketKind,
    #[serde(default = "yes")]
    write: bool,
}

/// What `POST /v1/vms/{id}/console/ticket` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct TicketIssued {
    /// Pass as `?ticket=` when opening the WebSocket; valid once, for seconds.
    pub ticket: String,
    pub kind: TicketKind,
    pub vm: String,
    pub write: bool,
    pub expires_at_ms: u64,
}

/// `POST /v1/vms/{id}/console/ticket`.
#[utoipa::path(post, path = "/v1/vms/{id}/console/ticket", tag = "consoles", params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam), request_body(content = Option<TicketRequest>),
    responses((status = 201, description = "A single-use ticket for a console WebSocket (for browsers, which cannot send headers)", body = TicketIssued), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn ticket(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Extension(caller): Extension<Caller>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<TicketIssued>), ApiError> {
    let req: TicketRequest = if body.is_empty() {
        TicketRequest {
            kind: TicketKind::Serial,
            write: true,
        }
    } else {
        crate::json::parse(&body)?
    };
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    if req.write && req.kind == TicketKind::Serial {
        may_type(&caller)?;
    }
    if req.kind == TicketKind::Vnc {
        has_display(&rec)?;
    }
    let ttl = state.tickets.ttl;
    let token = state.tickets.issue(Ticket {
        vm: rec.id.clone(),
        kind: req.kind,
        write: req.write,
        key_id: caller.key_id.clone(),
        project: caller.project.clone(),
        expires: Instant::now() + ttl,
    });
    Ok((
        StatusCode::CREATED,
        Json(TicketIssued {
            ticket: token,
            kind: req.kind,
            vm: rec.id,
            write: req.write,
            expires_at_ms: vmm_manager::spec::now_ms() + ttl.as_millis() as u64,
        }),
    ))
}

fn may_type(caller: &Caller) -> Result<(), ApiError> {
    if !caller.may_write() {
        return Err(ApiError::forbidden(format!(
            "permission consoles.write denied: user {} has role {} in project {}, which may watch consoles but not type; connect with write=false",
            caller.user,
            caller.role.as_deref().unwrap_or("none"),
            caller.project
        ))
        .with_details(serde_json::json!({"permission": "consoles.write"})));
    }
    Ok(())
}

fn has_display(rec: &VmRecord) -> Result<(), ApiError> {
    if rec.hypervisor != crate::model::HypervisorKind::Qemu {
        return Err(ApiError::conflict(format!(
            "VM {} runs on Cloud Hypervisor, which has no framebuffer: use its serial console",
            rec.name
        )));
    }
    if !rec.vnc {
        return Err(ApiError::conflict(format!(
            "VM {} was created without a display (vnc: false): use its serial console",
            rec.name
        )));
    }
    Ok(())
}

/// Refuses a WebSocket upgrade whose `Origin` is not this server.
fn check_origin(headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(origin) = headers.get(axum::http::header::ORIGIN) else {
        return Ok(()); // Not a browser: the CLI and scripts send none.
    };
    let origin = origin.to_str().unwrap_or_default();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let origin_host = origin.split_once("://").map(|(_, rest)| rest).unwrap_or_default();
    if host.is_empty() || !origin_host.eq_ignore_ascii_case(host) {
        tracing::warn!(origin, host, "refused a console WebSocket from another origin");
        return Err(ApiError::forbidden(format!(
            "WebSocket origin {origin:?} is not this server ({host}); open the console from hearth's own web console"
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
pub struct ConsoleQuery {
    #[serde(default = "yes")]
    write: bool,
    #[serde(default)]
    takeover: bool,
    #[serde(default)]
    ticket: Option<String>,
}

#[derive(Deserialize)]
pub struct VncQuery {
    #[serde(default)]
    ticket: Option<String>,
}

fn yes() -> bool {
    true
}

/// Who may open `kind` on VM `id`: the bearer key, or a ticket. Returns the VM and
/// whether typing is allowed.
async fn admit(
    state: &AppState,
    headers: &HeaderMap,
    id: &str,
    key: Option<Caller>,
    ticket: Option<&str>,
    kind: TicketKind,
    write: bool,
) -> Result<(VmRecord, bool), ApiError> {
    check_origin(headers)?;
    match (key, ticket) {
        (Some(key), _) => {
            let (rec, _) = resolve(state, &key.project, id).await?;
            if write && kind == TicketKind::Serial {
                may_type(&key)?;
            }
            Ok((rec, write))
        }
        (None, Some(token)) => {
            let t = state
                .tickets
                .redeem(token)
                .ok_or_else(|| ApiError::unauthorized("unknown console ticket, or one that was used already"))?;
            if t.expires <= Instant::now() {
                return Err(ApiError::unauthorized("the console ticket expired: ask for a new one"));
            }
            let (rec, _) = resolve(state, &t.project, id).await?;
            if rec.id != t.vm {
                return Err(ApiError::forbidden(format!(
                    "this ticket is for another VM, not {}",
                    rec.name
                )));
            }
            if t.kind != kind {
                return Err(ApiError::forbidden(format!(
                    "this ticket opens the {:?} console, not this one",
                    t.kind
                )));
            }
            tracing::debug!(key = %t.key_id, vm = %rec.id, "console ticket redeemed");
            Ok((rec, write && t.write))
        }
        (None, None) => Err(ApiError::unauthorized(
            "missing Authorization: Bearer <api key> header or console ticket",
        )),
    }
}

#[utoipa::path(get, path = "/v1/vms/{id}/console", tag = "consoles",
    params(("id" = String, Path, description = "VM id or name"), ("write" = Option<bool>, Query, description = "Type as well as watch (default true)"), ("takeover" = Option<bool>, Query, description = "Take the keyboard from another writer"), ("ticket" = Option<String>, Query, description = "A ticket instead of the Authorization header"), crate::openapi::ProjectParam),
    responses((status = 101, description = "WebSocket: the serial console (binary frames, xterm.js compatible)"), (status = 400, description = "Not a WebSocket upgrade"), (status = 403, body = crate::openapi::ErrorResponse), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn console(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
    key: Option<Extension<Caller>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (rec, write) = admit(
        &state,
        &headers,
        &id,
        key.map(|k| k.0),
        q.ticket.as_deref(),
        TicketKind::Serial,
        q.write,
    )
    .await?;
    // Connect upstream before upgrading, so a stopped VM or a busy writer is refused
    // with a proper status instead of a WebSocket that closes at once.
    let d = crate::hosts::daemons::of_vm(&state, &rec).await?;
    let upstream_ws = d
        .vmm
        .console(&rec.id, write, write && q.takeover)
        .await
        .map_err(upstream)?;
    Ok(ws.on_upgrade(move |client| proxy(client, upstream_ws)))
}

#[utoipa::path(get, path = "/v1/vms/{id}/vnc", tag = "consoles",
    params(("id" = String, Path, description = "VM id or name"), ("ticket" = Option<String>, Query), crate::openapi::ProjectParam),
    responses((status = 101, description = "WebSocket: the VM's screen over RFB (noVNC)"), (status = 400, description = "Not a WebSocket upgrade"), (status = 403, body = crate::openapi::ErrorResponse), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn vnc(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<VncQuery>,
    key: Option<Extension<Caller>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (rec, _) = admit(
        &state,
        &headers,
        &id,
        key.map(|k| k.0),
        q.ticket.as_deref(),
        TicketKind::Vnc,
        false,
    )
    .await?;
    has_display(&rec)?;
    let d = crate::hosts::daemons::of_vm(&state, &rec).await?;
    let upstream_ws = d.vmm.vnc(&rec.id).await.map_err(upstream)?;
    // noVNC asks for the "binary" subprotocol.
    Ok(ws
        .protocols(["binary"])
        .on_upgrade(move |client| proxy(client, upstream_ws)))
}

async fn proxy(client: WebSocket, upstream: tokio_tungstenite::WebSocketStream<Box<dyn socket_http::client::Io>>) {
    let (mut c_tx, mut c_rx) = client.split();
    let (mut u_tx, mut u_rx) = upstream.split();
    let down = async {
        while let Some(Ok(msg)) = u_rx.next().await {
            let out = match msg {
                UpMessage::Binary(b) => Message::Binary(b),
                UpMessage::Text(t) => Message::Text(t.as_str().into()),
                UpMessage::Close(frame) => {
                    let reason = frame.map(|f| f.reason.as_str().to_string()).unwrap_or_default();
                    let _ = c_tx
                        .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                            code: 1000,
                            reason: reason.into(),
                        })))
                        .await;
                    break;
                }
                _ => continue,
            };
            if c_tx.send(out).await.is_err() {
                break;
            }
        }
    };
    let up = async {
        while let Some(Ok(msg)) = c_rx.next().await {
            let out = match msg {
                Message::Binary(b) => UpMessage::Binary(b),
                Message::Text(t) => UpMessage::Binary(bytes::Bytes::from(t.as_str().to_owned())),
                Message::Close(_) => break,
                _ => continue,
            };
            if u_tx.send(out).await.is_err() {
                break;
            }
        }
        let _ = u_tx.close().await;
    };
    tokio::select! {
        _ = down => {}
        _ = up => {}
    }
}
