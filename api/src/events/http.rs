//! `GET /v1/events`: the bus as server-sent events, filtered by kind and project.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::events::bus::Event;
use crate::json::Query;
use crate::state::AppState;

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// Comma-separated kinds to receive (default: all).
    #[serde(default)]
    kinds: Option<String>,
    #[serde(default)]
    project: Option<String>,
}

#[utoipa::path(get, path = "/v1/events", tag = "events",
    params(("kinds" = Option<String>, Query, description = "Comma-separated: operation, vm, database, audit"), ("project" = Option<String>, Query)),
    responses((status = 200, description = "Server-sent events, one JSON Event per message", content_type = "text/event-stream", body = Event), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn stream(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<crate::auth::keys::Caller>,
    Query(q): Query<EventsQuery>,
) -> Result<Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>>, socket_http::ApiError> {
    let kinds: Option<Vec<String>> = q.kinds.map(|k| {
        k.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    });
    if let Some(k) = &kinds {
        if let Some(bad) = k
            .iter()
            .find(|k| !matches!(k.as_str(), "operation" | "vm" | "database" | "audit"))
        {
            return Err(socket_http::ApiError::unprocessable(format!(
                "unknown event kind {bad:?}: use operation, vm, database or audit"
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
