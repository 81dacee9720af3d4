//! The middleware in front of every route: authenticates the key, works out the
//! project and the caller's role in it, refuses what the route's declared permission
//! does not allow, and audits changes.

use std::sync::Arc;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use socket_http::ApiError;

use crate::auth::keys::{binding_key, project_key, user_key, verify, Binding, Caller, Project, User, DEFAULT_PROJECT};
use crate::permissions::{Permission, RouteTable};
use crate::state::AppState;
use crate::store;

/// The project a request names (`?project=`), or `default`.
fn requested_project(req: &Request) -> Result<String, ApiError> {
    #[derive(Deserialize)]
    struct Q {
        project: Option<String>,
    }
    let q: Q = serde_urlencoded::from_str(req.uri().query().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let p = q.project.unwrap_or_else(|| DEFAULT_PROJECT.into());
    crate::model::validate_name("project", &p)?;
    Ok(p)
}

/// Middleware: authenticates the key, works out the project and the caller's role in
/// it, and refuses what the role does not allow, before any handler runs.
pub async fn require_key(
    State((state, routes)): State<(Arc<AppState>, Arc<RouteTable>)>,
    mut req: Request,
    next: Next,
) -> Response {
    match authorize(&state, &routes, &mut req).await {
        Ok(None) => next.run(req).await,
        Ok(Some(caller)) => {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            req.extensions_mut().insert(caller.clone());
            let resp = next.run(req).await;
            // Audit: every request that changes something, with who made it.
            if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
                state.events.emit(
                    "audit",
                    &caller.project,
                    serde_json::json!({
                        "key_id": caller.key_id, "key_name": caller.key_name, "user": caller.user,
                        "role": caller.role, "method": method.as_str(), "path": path,
                        "status": resp.status().as_u16(),
                    }),
                );
            }
            resp
        }
        Err(e) => {
            tracing::warn!(path = %req.uri().path(), status = e.status.as_u16(), "refused request: {}", e.message());
            state.events.emit(
                "audit",
                DEFAULT_PROJECT,
                serde_json::json!({
                    "method": req.method().as_str(), "path": req.uri().path(),
                    "status": e.status.as_u16(), "refused": e.message(),
                }),
            );
            let retry = (e.status == axum::http::StatusCode::TOO_MANY_REQUESTS)
                .then(|| e.body.details.as_ref().and_then(|d| d["retry_after_seconds"].as_u64()))
                .flatten();
            let mut resp = e.into_response();
            if let Some(s) = retry {
                if let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string()) {
                    resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
                }
            }
            resp
        }
    }
}

/// `Ok(None)`: a public route (or a console opened with a ticket, which its handler
/// checks). `Ok(Some(caller))`: allowed.
async fn authorize(state: &AppState, routes: &RouteTable, req: &mut Request) -> Result<Option<Caller>, ApiError> {
    let path = req.uri().path().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let need = routes.need(req.method(), route.as_deref());
    // Browsers cannot set headers on WebSockets: those carry a ticket, which the
    // handler checks (see crate::console).
    let ticketed = req.headers().get(axum::http::header::AUTHORIZATION).is_none()
        && matches!(route.as_deref(), Some("/v1/vms/{id}/console" | "/v1/vms/{id}/vnc"))
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("ticket=")));
    if need == Permission::Undeclared {
        return Err(ApiError::forbidden(format!(
            "{} {path} declares no permission, so it is refused to every key",
            req.method()
        )));
    }
    if need == Permission::Public || ticketed {
        return Ok(None);
    }
    let addr = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(wait) = addr.and_then(|a| state.auth_failures.blocked(a)) {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            format!("too many failed authentications from this address; retry in {wait} s"),
        )
        .with_details(serde_json::json!({"retry_after_seconds": wait})));
    }
    let fail = |e: ApiError| {
        if let Some(a) = addr {
            state.auth_failures.record(a);
        }
        e
    };
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| fail(ApiError::unauthorized("missing Authorization: Bearer <api key> header")))?;
    let key = header.strip_prefix("Bearer ").ok_or_else(|| {
        fail(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <api key>'",
        ))
    })?;
    let rec = match verify(state.store.as_ref(), key.trim()).await {
        Ok(rec) => rec,
        Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => return Err(fail(e)),
        Err(e) => return Err(e),
    };
    let user = store::get_json::<User>(state.store.as_ref(), &user_key(&rec.user))
        .await?
        .map(|(u, _)| u)
        .ok_or_else(|| {
            fail(ApiError::unauthorized(format!(
                "the user {:?} of this key no longer exists",
                rec.user
            )))
        })?;
    let project = requested_project(req)?;
    let role = if user.admin {
        Some("admin".to_string())
    } else {
        store::get_json::<Binding>(state.store.as_ref(), &binding_key(&project, &user.name))
            .await?
            .map(|(b, _)| b.role)
    };
    let caller = Caller {
        key_id: rec.id,
        key_name: rec.name,
        user: user.name.clone(),
        admin: user.admin,
        project: project.clone(),
        role: role.clone(),
    };
    match need {
        Permission::Public | Permission::SignedIn(_) | Permission::Undeclared => {}
        Permission::Admin(perm) => {
            if !user.admin {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: only hearth administrators have it, and user {} is not one",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm})));
            }
        }
        Permission::Project { name: perm, write } => {
            if user.admin
                && store::get_json::<Project>(state.store.as_ref(), &project_key(&project))
                    .await?
                    .is_none()
            {
                return Err(ApiError::not_found(format!("project {project:?} does not exist")));
            }
            let Some(role) = role else {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: user {} has no role in project {project}",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm, "project": project})));
            };
            if write && role == "viewer" {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: user {} has role viewer in project {project}, which only reads",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm, "project": project, "role": role})));
            }
        }
    }
    Ok(Some(caller))
}
