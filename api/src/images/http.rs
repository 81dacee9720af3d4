//! The `/v1/images` routes: parse, call, map errors; an import's operation follows
//! imaged's job.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use imaged::import::ImportState;
use serde::Serialize;
use socket_http::ApiError;

use crate::daemons::upstream;
use crate::json::JsonBody;
use crate::model::{Operation, ProgressDetail};
use crate::state::AppState;

use super::view::{GcReport, Image, ImportRequest};

type AppS = State<Arc<AppState>>;

/// What `POST /v1/images` answers.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ImportAccepted {
    pub operation: Operation,
    /// imaged's job id (several imports of one source share it).
    pub import_id: String,
}

/// A name, `name:tag` or digest that imaged could hold; anything else is 422.
fn valid_reference(name: &str) -> Result<(), ApiError> {
    imaged::validate_name(name).map_err(|e| ApiError::unprocessable(e.to_string()))
}

#[utoipa::path(get, path = "/v1/images", tag = "images", responses((status = 200, body = Vec<Image>)))]
pub async fn list(State(state): AppS) -> Result<Json<Vec<Image>>, ApiError> {
    let images = state.images.list().await.map_err(upstream)?;
    Ok(Json(images.into_iter().map(Image::from).collect()))
}

#[utoipa::path(get, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path, description = "name, name:tag or sha256 digest")),
    responses((status = 200, body = Image), (status = 404, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn show(State(state): AppS, Path(name): Path<String>) -> Result<Json<Image>, ApiError> {
    valid_reference(&name)?;
    Ok(Json(state.images.get(&name).await.map_err(upstream)?.into()))
}

/// Deletes a name (or, by digest, the image). Refused (409) while VMs use the image.
#[utoipa::path(delete, path = "/v1/images/{name}", tag = "images", params(("name" = String, Path, description = "name, name:tag or sha256 digest")),
    responses((status = 200, description = "What garbage collection freed", body = GcReport), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, description = "VMs use the image", body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn delete(State(state): AppS, Path(name): Path<String>) -> Result<Json<GcReport>, ApiError> {
    valid_reference(&name)?;
    let report = state.images.delete(&name).await.map_err(upstream)?;
    remove_image_bases(&state, &report.images).await;
    Ok(Json(report.into()))
}

/// Pools that clone a snapshot of one base volume per image (LVM, memory) keep that
/// base until the image goes: removed here when garbage collection took the image,
/// and by the reconciler for images collected otherwise (a name moved by an import).
pub async fn remove_image_bases(state: &AppState, digests: &[String]) {
    for d in digests {
        let base = blockd::volume::image_base_name(d);
        match state.blockd.delete_volume(&base).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(volume = %base, "cannot remove the base volume of a deleted image: {e}"),
        }
    }
}

#[utoipa::path(post, path = "/v1/images", tag = "images", params(crate::openapi::IdempotencyKey), request_body = ImportRequest,
    responses((status = 202, description = "Accepted: the import operation", body = ImportAccepted), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn import(
    State(state): AppS,
    axum::Extension(caller): axum::Extension<crate::auth::keys::Caller>,
    JsonBody(req): JsonBody<ImportRequest>,
) -> Result<Response, ApiError> {
    // imaged checks the request at once: a bad name, URL or path is a 422 here.
    let job = state.images.import(&req.clone().into()).await.map_err(upstream)?;
    let op = state
        .ops
        .start(&caller.project, "image.import", "image", &req.name)
        .await?;
    let (task_state, op_id, job_id) = (state.clone(), op.id.clone(), job.id.clone());
    tokio::spawn(async move { follow(task_state, op_id, job_id).await });
    Ok((
        StatusCode::ACCEPTED,
        Json(ImportAccepted {
            operation: op,
            import_id: job.id,
        }),
    )
        .into_response())
}

/// Mirrors imaged's job into the operation until it ends.
async fn follow(state: Arc<AppState>, op_id: String, job_id: String) {
    let mut failures = 0;
    loop {
        match state.images.import_status(&job_id, 1.0).await {
            Ok(st) => {
                failures = 0;
                match st.state {
                    ImportState::Running => {
                        let detail = ProgressDetail {
                            bytes_done: st.bytes_done,
                            bytes_total: st.bytes_total,
                            rate_bytes_per_second: st.rate_bytes_per_second,
                            eta_seconds: st.eta_seconds,
                        };
                        state.ops.progress_detail(&op_id, &st.phase, detail).await;
                    }
                    ImportState::Succeeded => {
                        state.ops.succeed(&op_id).await;
                        return;
                    }
                    ImportState::Failed => {
                        let body = st.error.unwrap_or_else(|| ApiError::internal("the import failed").body);
                        let status = st
                            .error_status
                            .and_then(|s| StatusCode::from_u16(s).ok())
                            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                        state.ops.fail(&op_id, &ApiError { status, body }).await;
                        return;
                    }
                }
            }
            Err(e) => {
                failures += 1;
                if failures >= 5 {
                    state
                        .ops
                        .fail(
                            &op_id,
                            &ApiError::unavailable(format!("lost track of the import in imaged: {e}")),
                        )
                        .await;
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
