//! `Idempotency-Key` on POST: a client that did not see the answer (a timeout, a
//! dropped connection, a crash on its side) sends the same request with the same key
//! again and gets the first answer back (with `Idempotent-Replayed: true`) instead of
//! a second VM or a 409.
//!
//! The first request records its key in the store *before* the handler runs
//! (compare-and-swap, so of two concurrent requests exactly one runs), together with a
//! fingerprint of method, path and body; the answer replaces the record when it is
//! known. Keys are per API key and live 24 hours. A repeat while the first still runs
//! is 409; the same key with a different request is 422. Answers of 500 and above are
//! not kept, so a retry after an outage does the work.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket_http::ApiError;

use crate::auth::keys::Caller;
use crate::state::AppState;
use crate::store;

pub const HEADER: &str = "idempotency-key";
pub const REPLAYED: &str = "idempotent-replayed";
/// How long a key is remembered.
pub const TTL_MS: u64 = 24 * 3600 * 1000;
/// Bodies larger than this are not accepted with a key (no POST body comes close).
const MAX_BODY: usize = 4 << 20;

#[derive(Debug, Serialize, Deserialize)]
struct Entry {
    fingerprint: String,
    created_at_ms: u64,
    /// `None` while the first request runs.
    response: Option<Stored>,
    /// The api process running it ([`AppState::instance`]). A claim without an answer
    /// from a process that is gone was cut short by a crash; a retry runs the request
    /// afresh. For VM, network and volume creates and deletes the reconciler undid or
    /// finished what it had begun; an attach cut short may have claimed its volume, and
    /// the retry then finds the volume attached.
    #[serde(default)]
    instance: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    status: u16,
    content_type: Option<String>,
    body_base64: String,
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// Middleware for every route; does nothing unless the request is a POST carrying the
/// header (after authentication, which put the caller's key into the extensions).
pub async fn layer(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Result<Response, ApiError> {
    let Some(raw) = req.headers().get(HEADER) else {
        return Ok(next.run(req).await);
    };
    if req.method() != Method::POST {
        return Ok(next.run(req).await);
    }
    let Some(caller) = req.extensions().get::<Caller>().map(|c| c.key_id.clone()) else {
        // Unauthenticated routes (none take POST today) run as they are.
        return Ok(next.run(req).await);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| (0x21..0x7f).contains(&b)))
        .ok_or_else(|| ApiError::bad_request("Idempotency-Key must be 1 to 255 visible ASCII characters"))?
        .to_string();

    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_BODY)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
    let mut h = Sha256::new();
    h.update(parts.method.as_str().as_bytes());
    h.update([0]);
    h.update(parts.uri.to_string().as_bytes());
    h.update([0]);
    h.update(&bytes);
    let fingerprint = hex(&h.finalize());
    let record = format!("idempotency/{caller}/{}", hex(&Sha256::digest(key.as_bytes())));
    let now = vmm_manager::spec::now_ms();

    let fresh = Entry {
        fingerprint: fingerprint.clone(),
        created_at_ms: now,
        response: None,
        instance: Some(state.instance.clone()),
    };
    let expected = match store::get_json::<Entry>(state.store.as_ref(), &record).await? {
        None => None,
        // Expired: the key may be used afresh.
        Some((old, rev)) if now.saturating_sub(old.created_at_ms) > TTL_MS => Some(rev),
        // Cut short by a crash of the api that took it (one api per store).
        Some((old, rev))
            if old.response.is_none()
                && old.fingerprint == fingerprint
                && old.instance.as_deref() != Some(state.instance.as_str()) =>
        {
            tracing::info!("an Idempotency-Key claimed by an api process that is gone is run afresh");
            Some(rev)
        }
        Some((old, _)) => return Ok(answer_repeat(&old, &fingerprint)),
    };
    let revision = match state
        .store
        .compare_and_swap(&record, expected, store::encode(&fresh))
        .await
    {
        Ok(r) => r,
        // Another request with this key got there first.
        Err(store::StoreError::Conflict { .. }) => {
            return match store::get_json::<Entry>(state.store.as_ref(), &record).await? {
                Some((old, _)) => Ok(answer_repeat(&old, &fingerprint)),
                None => Err(ApiError::conflict(
                    "a request with this Idempotency-Key is still being processed",
                )),
            };
        }
        Err(e) => return Err(e.into()),
    };

    let resp = next.run(Request::from_parts(parts, Body::from(bytes))).await;
    let (rparts, rbody) = resp.into_parts();
    let rbytes = match axum::body::to_bytes(rbody, MAX_BODY).await {
        Ok(b) => b,
        Err(e) => {
            let _ = state.store.delete(&record).await;
            return Err(ApiError::internal(format!("cannot buffer the response: {e}")));
        }
    };
    if rparts.status.is_server_error() {
        let _ = state.store.delete(&record).await;
    } else {
        let done = Entry {
            instance: Some(state.instance.clone()),
            fingerprint,
            created_at_ms: now,
            response: Some(Stored {
                status: rparts.status.as_u16(),
                content_type: rparts
                    .headers
                    .get(axum::http::header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .map(String::from),
                body_base64: base64::engine::general_purpose::STANDARD.encode(&rbytes),
            }),
        };
        if let Err(e) = state
            .store
            .compare_and_swap(&record, Some(revision), store::encode(&done))
            .await
        {
            tracing::warn!("cannot record the answer for an Idempotency-Key: {e}");
        }
    }
    Ok(Response::from_parts(rparts, Body::from(rbytes)))
}

/// The answer to a request whose key was seen before.
fn answer_repeat(old: &Entry, fingerprint: &str) -> Response {
    if old.fingerprint != fingerprint {
        return ApiError::unprocessable(
            "this Idempotency-Key was used for a different request (method, path or body); use a new key",
        )
        .into_response();
    }
    let Some(stored) = &old.response else {
        return ApiError::conflict("a request with this Idempotency-Key is still being processed; retry shortly")
            .into_response();
    };
    let body = base64::engine::general_purpose::STANDARD
        .decode(&stored.body_base64)
        .unwrap_or_default();
    let mut resp = Response::new(Body::from(body));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    if let Some(ct) = stored
        .content_type
        .as_deref()
        .and_then(|c| HeaderValue::from_str(c).ok())
    {
        resp.headers_mut().insert(axum::http::header::CONTENT_TYPE, ct);
    }
    resp.headers_mut().insert(REPLAYED, HeaderValue::from_static("true"));
    resp
}
