//! The `/v1/images` routes: parse, call, map errors; an import's operation follows
//! imaged's job.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use socket_http::ApiError;

use crate::daemons::upstream;
use crate::json::JsonBody;
use crate::model::Operation;
use crate::state::AppState;

use super::error::ImageError;
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
fn valid_reference(name: &str) -> Result<(), ImageError> {
    imaged::validate_name(name).map_err(|e| ImageError::Invalid(e.to_string()))
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
    let (op, import_id) = super::import::begin(&state, &caller.project, req.into()).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(ImportAccepted {
            operation: op,
            import_id,
        }),
    )
        .into_response())
}
