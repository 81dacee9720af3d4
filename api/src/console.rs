//! `GET /v1/vms/{id}/console`: the serial console as a WebSocket (binary frames both
//! ways, xterm.js-compatible), proxied to vmm-manager's console WebSocket. The first
//! frame carries the scrollback, then live output follows; with `write=true` (the
//! default) the client's frames are typed into the guest, one writer at a time.

use std::sync::Arc;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::response::Response;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use socket_http::ApiError;
use tokio_tungstenite::tungstenite::Message as UpMessage;

use crate::server::AppState;
use crate::vms::{resolve, upstream};

#[derive(Deserialize)]
pub struct ConsoleQuery {
    #[serde(default = "yes")]
    write: bool,
}

fn yes() -> bool {
    true
}

pub async fn console(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<ConsoleQuery>,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let (rec, _) = resolve(&state, &id).await?;
    // Connect upstream before upgrading, so a stopped VM or a busy writer is refused
    // with a proper status instead of a WebSocket that closes at once.
    let upstream_ws = state.vmm.console(&rec.id, q.write).await.map_err(upstream)?;
    Ok(ws.on_upgrade(move |client| proxy(client, upstream_ws)))
}

async fn proxy(client: WebSocket, upstream: tokio_tungstenite::WebSocketStream<tokio::net::UnixStream>) {
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
