//! `GET /v1/operations` and `GET /v1/operations/{id}` (long-poll with `?wait=`).

use std::time::Duration;

use axum::extract::{Path, State};
use axum::{Extension, Json};
use serde::Deserialize;
use socket_http::ApiError;

use crate::auth::keys::Caller;
use crate::json::Query;

type AppS = State<std::sync::Arc<crate::state::AppState>>;

#[derive(Deserialize)]
pub struct WaitQuery {
    #[serde(default)]
    wait: Option<f64>,
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path), ("wait" = Option<f64>, Query, description = "Seconds to wait for the operation to finish (at most 60)")),
    responses((status = 200, body = crate::model::Operation), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn operation(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<crate::model::Operation>, ApiError> {
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=3600.0).contains(&wait) {
        return Err(ApiError::unprocessable("wait must be between 0 and 3600 seconds"));
    }
    // Long-polls are capped so proxies and clients do not time out first.
    let wait = Duration::from_secs_f64(wait.min(60.0));
    // Operations of other projects are not found.
    let op = state.ops.get(&id).await?;
    if op.project != caller.project {
        return Err(ApiError::not_found(format!("operation {id:?} does not exist")));
    }
    Ok(Json(state.ops.wait(&id, wait).await?))
}

#[utoipa::path(get, path = "/v1/operations", tag = "operations", params(crate::openapi::ProjectParam),
    responses((status = 200, description = "Operations, newest first", body = Vec<crate::model::Operation>)))]
pub async fn operations(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<crate::model::Operation>>, ApiError> {
    let mut ops = state.ops.list().await?;
    ops.retain(|o| o.project == caller.project);
    Ok(Json(ops))
}
