//! `GET /v1/events`: server-sent events. Three kinds:
//! - `operation`: an operation started, made progress, succeeded or failed;
//! - `vm`: a VM was created, deleted, started, stopped, rebooted, paused or resumed
//!   (when the operation doing it succeeds);
//! - `audit`: a request that changes something (POST, PUT, PATCH, DELETE) with who made
//!   it and its status, and every refused authentication.
//!
//! `?kinds=vm,operation` and `?project=NAME` filter. Events are not stored: a client
//! sees what happens while it is connected (a slow one is told how many it missed).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;

use crate::json::Query;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::server::AppState;

/// One event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Event {
    /// Increases by one per event of this api process.
    pub seq: u64,
    pub at_ms: u64,
    /// `operation`, `vm` or `audit`.
    pub kind: String,
    pub project: String,
    pub data: serde_json::Value,
}

/// The api's event bus.
pub struct Events {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(4096).0,
            seq: AtomicU64::new(0),
        }
    }
}

impl Events {
    pub fn emit(&self, kind: &str, project: &str, data: serde_json::Value) {
        let ev = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: vmm_manager::spec::now_ms(),
            kind: kind.to_string(),
            project: project.to_string(),
            data,
        };
        // No subscriber is fine: events are for whoever listens now.
        let _ = self.tx.send(ev);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Comma-separated kinds to receive (default: all).
    #[serde(default)]
    kinds: Option<String>,
    #[serde(default)]
    project: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("kinds" = Option<String>, Query, description = "Comma-separated: operation, vm, audit"), ("project" = Option<String>, Query)),
    responses((status = 200, description = "Server-sent events, one JSON Event per message", content_type = "text/event-stream", body = Event), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::Caller>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, socket_http::ApiError> {
    let kinds: Option<Vec<String>> = q.kinds.map(|k| {
        k.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if let Some(k) = &kinds {
        if let Some(bad) = k.iter().find(|k| !matches!(k.as_str(), "operation" | "vm" | "audit")) {
            return Err(socket_http::ApiError::unprocessable(format!(
                "unknown event kind {bad:?}: use operation, vm or audit"
            )));
        }
    }
    let rx = state.events.subscribe();
    // A project's events only, except for administrators who name no project.
    let project = if caller.admin && q.project.is_none() {
        None
    } else {
        Some(caller.project.clone())
    };
    let stream = futures_util::stream::unfold(rx, move |mut rx| {
        let kinds = kinds.clone();
        let project = project.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        let wanted = kinds.as_ref().is_none_or(|k| k.contains(&ev.kind))
                            && project.as_ref().is_none_or(|p| *p == ev.project);
                        if wanted {
                            let sse = SseEvent::default()
                                .event(ev.kind.clone())
                                .id(ev.seq.to_string())
                                .json_data(&ev)
                                .unwrap_or_else(|_| SseEvent::default().comment("unencodable event"));
                            return Some((Ok(sse), rx));
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let sse = SseEvent::default().event("lagged").data(format!("{{\"missed\": {n}}}"));
                        return Some((Ok(sse), rx));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
