//! `/v1/volumes`: data disks that outlive VMs. blockd holds the blocks; the api records
//! each volume's name (and, for volumes on other hosts, where they are) and which VM a
//! volume is attached to. One VM at a time: the claim `volume-attachments/{name}` is
//! taken with compare-and-swap, so two attaches cannot both win.
//!
//! - `POST /v1/volumes` `{name, size_bytes | size, source?: {snapshot: "vol@snap"}, remote?: {tcp|unix, export, read_only?, tls?}}`
//! - `GET /v1/volumes`, `GET|DELETE /v1/volumes/{name}` (delete: 409 while attached,
//!   exported or holding snapshots with clones)
//! - `POST /v1/volumes/{name}/resize` `{size_bytes | size}` (grow only; a running VM
//!   the volume is attached to sees the new size at once: as a file through its
//!   hypervisor's resize, over vhost-user through blockd's config-change message). A
//!   volume on another host grows there through its NBD server (`NBD_CMD_RESIZE`)
//! - `POST /v1/volumes/{name}/snapshots` `{name}`, `DELETE /v1/volumes/{name}/snapshots/{snapshot}`
//! - `POST /v1/volumes/{name}/clone` `{name, snapshot?}` (without a snapshot, one named
//!   after the clone is taken first)
//! - `POST /v1/volumes/{name}/attach` `{vm, via?, read_only?}`, `POST /v1/volumes/{name}/detach`
//!   (hot-plugged while the VM runs)
//! - `POST /v1/volumes/{name}/export` `{read_only?}`, `DELETE /v1/volumes/{name}/export`:
//!   NBD, so another host (or qemu-img, nbdcopy) reaches it

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use blockd::exports::ExportSpec;
use serde::Deserialize;
use socket_http::ApiError;

use crate::auth::keys::Caller;
use crate::daemons::upstream;
use crate::json::JsonBody;
use crate::model::{name_in_project, validate_name, AttachVia, AttachVolume, AttachedVolume};
use crate::state::AppState;
use crate::store;
use crate::volumes::command::{
    CloneCommand, CloneRequest, CreateVolume, CreateVolumeCommand, NameRequest, ResizeCommand, SizeRequest,
    SnapshotCommand, SourceRequest,
};
use crate::volumes::error::VolumeError;
use crate::volumes::records::{attachment, blockd_error, bname, find_record, local_record, record_key, VolumeRecord};
use crate::volumes::view::{Export, Snapshot, Volume};
use crate::volumes::work::{release, remove, resize_remote};

type AppS = State<std::sync::Arc<crate::state::AppState>>;

async fn view(
    state: &AppState,
    rec: &VolumeRecord,
    exports: &[blockd::exports::Export],
) -> Result<Volume, VolumeError> {
    let attached_to = attachment(state, &rec.project, &rec.name).await?;
    let host = bname(rec);
    let mut v = Volume {
        name: rec.name.clone(),
        project: rec.project.clone(),
        location: if rec.remote.is_some() { "remote" } else { "local" }.into(),
        size_bytes: None,
        allocated_bytes: None,
        backend: None,
        format: None,
        origin: None,
        snapshots: vec![],
        attached_to,
        exports: exports
            .iter()
            .filter(|e| e.volume == host && e.remote.is_none())
            .cloned()
            .map(|e| Export::of(&rec.name, e))
            .collect(),
        remote: rec.remote.clone(),
        created_at_ms: rec.created_at_ms,
        managed_by: rec.managed_by.clone(),
    };
    if rec.remote.is_some() {
        // Attached, blockd's NBD client knows the size now; otherwise the one recorded.
        v.size_bytes = exports
            .iter()
            .find(|e| e.volume == host && e.remote.is_some())
            .and_then(|e| e.size_bytes)
            .or(rec.size_bytes);
    } else {
        let b = state.blockd.volume(&host).await.map_err(blockd_error)?;
        v.size_bytes = Some(b.size_bytes);
        v.allocated_bytes = Some(b.allocated_bytes);
        v.backend = Some(b.backend);
        v.format = Some(b.format.into());
        let own = |n: &str| name_in_project(&rec.project, n).to_string();
        v.origin = b.origin.as_deref().map(own);
        v.snapshots = b
            .snapshots
            .into_iter()
            .map(|sn| Snapshot::seen_in(&rec.project, sn))
            .collect();
    }
    Ok(v)
}

#[utoipa::path(get, path = "/v1/volumes", tag = "volumes", params(crate::openapi::ProjectParam), responses((status = 200, body = Vec<Volume>)))]
pub async fn list(State(state): AppS, Extension(caller): Extension<Caller>) -> Result<Json<Vec<Volume>>, ApiError> {
    let recs: Vec<VolumeRecord> = store::list_json(state.store.as_ref(), &format!("volumes/{}/", caller.project))
        .await?
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    let mut out = Vec::new();
    for r in &recs {
        match view(&state, r, &exports).await {
            Ok(v) => out.push(v),
            Err(e) => tracing::warn!(volume = %r.name, "volume listed but not in blockd: {e}"),
        }
    }
    Ok(Json(out))
}

#[utoipa::path(get, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = Volume), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    let rec = find_record(&state, &caller.project, &name).await?;
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    Ok(Json(view(&state, &rec, &exports).await?))
}

#[utoipa::path(post, path = "/v1/volumes", tag = "volumes", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateVolume,
    responses((status = 201, body = Volume), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse),
      (status = 507, description = "The pool has no room", body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateVolume>,
) -> Result<Response, ApiError> {
    let req = CreateVolumeCommand::try_from(req)?;
    let rec = create_volume(&state, &caller.project, req).await?;
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    Ok((StatusCode::CREATED, Json(view(&state, &rec, &exports).await?)).into_response())
}

#[utoipa::path(delete, path = "/v1/volumes/{name}", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 204, description = "Deleted, or did not exist"), (status = 409, description = "Attached, or has snapshots with clones", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    validate_name("volume", &name)?;
    let project = caller.project.as_str();
    if state.store.get(&record_key(project, &name)).await?.is_none() {
        return Ok(StatusCode::NO_CONTENT);
    }
    // remove() refuses an attached volume (409).
    let (st, p, n) = (state.clone(), project.to_string(), name.clone());
    crate::intents::run(
        &state,
        crate::intents::Kind::Volume,
        project,
        &name,
        "delete",
        async move { remove(&st, &p, &n).await },
    )
    .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/resize", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = SizeRequest,
    responses((status = 200, body = Volume), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, description = "A volume on another host whose NBD server does not offer resizing (or exports it read-only), or the VM it is attached to is between states: the volume grew, the VM was not told", body = crate::openapi::ErrorResponse), (status = 422, description = "Shrinking or a bad size", body = crate::openapi::ErrorResponse), (status = 502, description = "The volume grew; its running VM's hypervisor refused the new size", body = crate::openapi::ErrorResponse), (status = 507, body = crate::openapi::ErrorResponse)))]
pub async fn resize(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<SizeRequest>,
) -> Result<Json<Volume>, ApiError> {
    let rec = find_record(&state, &caller.project, &name).await?;
    let size = ResizeCommand::try_from(req)?.size_bytes;
    refuse_managed(&state, &caller.project, &name).await?;
    if let Some(remote) = &rec.remote {
        resize_remote(&state, &rec, remote, size).await?;
        let rec = find_record(&state, &caller.project, &name).await?;
        let exports = state.blockd.exports().await.map_err(blockd_error)?;
        return Ok(Json(view(&state, &rec, &exports).await?));
    }
    crate::volumes::work::resize_local(&state, &caller.project, &rec, size).await?;
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    Ok(Json(view(&state, &rec, &exports).await?))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/snapshots", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = NameRequest,
    responses((status = 201, body = Snapshot), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn snapshot(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<NameRequest>,
) -> Result<Response, ApiError> {
    let rec = local_record(&state, &caller.project, &name).await?;
    let req = SnapshotCommand::try_from(req)?;
    let snap = state
        .blockd
        .snapshot(&bname(&rec), &req.name)
        .await
        .map_err(blockd_error)?;
    let mut snap = Snapshot::seen_in(&rec.project, snap);
    snap.volume = name;
    Ok((StatusCode::CREATED, Json(snap)).into_response())
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/snapshots/{snapshot}", tag = "volumes", params(("name" = String, Path), ("snapshot" = String, Path), crate::openapi::ProjectParam),
    responses((status = 204, description = "Deleted, or did not exist"), (status = 409, description = "Clones depend on it", body = crate::openapi::ErrorResponse)))]
pub async fn delete_snapshot(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((name, snap)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let rec = local_record(&state, &caller.project, &name).await?;
    validate_name("snapshot", &snap)?;
    state
        .blockd
        .delete_snapshot(&bname(&rec), &snap)
        .await
        .map_err(blockd_error)?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/volumes/{name}/clone", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = CloneRequest,
    responses((status = 201, body = Volume), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn clone(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<CloneRequest>,
) -> Result<Response, ApiError> {
    let rec = local_record(&state, &caller.project, &name).await?;
    let req = CloneCommand::try_from(req)?;
    let snap = match req.snapshot {
        Some(s) => s,
        None => {
            let s = format!("clone-{}", req.name);
            state.blockd.snapshot(&bname(&rec), &s).await.map_err(blockd_error)?;
            s
        }
    };
    let create = CreateVolume {
        name: req.name,
        size_bytes: None,
        size: None,
        source: Some(SourceRequest::Snapshot(format!("{name}@{snap}"))),
        remote: None,
    };
    self::create(State(state), Extension(caller), JsonBody(create)).await
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub vm: String,
    #[serde(default)]
    pub via: Option<AttachVia>,
    #[serde(default)]
    pub read_only: bool,
}

#[utoipa::path(post, path = "/v1/volumes/{name}/attach", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam), request_body = AttachRequest,
    responses((status = 200, body = Volume), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, description = "Attached elsewhere", body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn attach(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<AttachRequest>,
) -> Result<Json<Volume>, ApiError> {
    let project = caller.project.as_str();
    find_record(&state, project, &name).await?;
    let (vm, rev) = crate::vms::records::resolve(&state, project, &req.vm).await?;
    if vm.phase != crate::model::Phase::Ready {
        return Err(VolumeError::VmNotReady(vm.name).into());
    }
    if let Some(a) = attachment(&state, project, &name).await? {
        if a.vm == vm.id {
            let rec = find_record(&state, project, &name).await?;
            let exports = state.blockd.exports().await.map_err(blockd_error)?;
            return Ok(Json(view(&state, &rec, &exports).await?));
        }
    }
    let request = AttachVolume {
        volume: name.clone(),
        via: req.via,
        read_only: req.read_only,
    };
    crate::volumes::attach::attach(&state, vm, rev, request).await?;
    let rec = find_record(&state, project, &name).await?;
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    Ok(Json(view(&state, &rec, &exports).await?))
}

#[utoipa::path(post, path = "/v1/volumes/{name}/detach", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 200, body = Volume), (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn detach(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<Json<Volume>, ApiError> {
    let project = caller.project.as_str();
    let rec = find_record(&state, project, &name).await?;
    if let Some(a) = attachment(&state, project, &name).await? {
        match crate::vms::records::resolve(&state, project, &a.vm).await {
            Ok((vm, _)) if vm.managed_by.is_some() => {
                return Err(VolumeError::Managed {
                    name,
                    by: vm.managed_by.unwrap_or_default(),
                }
                .into());
            }
            Ok((mut vm, rev)) => {
                state.vmm.detach_disk(&vm.id, &a.disk).await.map_err(upstream)?;
                let att = vm.volumes.iter().find(|v| v.volume == name).cloned();
                vm.volumes.retain(|v| v.volume != name);
                state
                    .store
                    .compare_and_swap(&format!("vms/{}", vm.id), Some(rev), store::encode(&vm))
                    .await?;
                let att = att.unwrap_or(AttachedVolume {
                    volume: name.clone(),
                    disk: a.disk,
                    via: a.via,
                    read_only: a.read_only,
                });
                release(&state, project, &att).await;
            }
            // The VM is gone: only the claim is left.
            Err(_) => {
                let att = AttachedVolume {
                    volume: name.clone(),
                    disk: a.disk,
                    via: a.via,
                    read_only: a.read_only,
                };
                release(&state, project, &att).await;
            }
        }
    }
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    Ok(Json(view(&state, &rec, &exports).await?))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    #[serde(default)]
    pub read_only: bool,
}

#[utoipa::path(post, path = "/v1/volumes/{name}/export", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam), request_body(content = Option<ExportRequest>),
    responses((status = 200, description = "The NBD export (idempotent)", body = Export), (status = 404, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn export(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Export>, ApiError> {
    let rec = local_record(&state, &caller.project, &name).await?;
    let req: ExportRequest = if body.iter().all(u8::is_ascii_whitespace) {
        ExportRequest::default()
    } else {
        crate::json::parse(&body)?
    };
    let e = state
        .blockd
        .export(
            &bname(&rec),
            "nbd",
            &ExportSpec {
                read_only: req.read_only,
            },
        )
        .await
        .map_err(blockd_error)?;
    Ok(Json(Export::of(&name, e)))
}

#[utoipa::path(delete, path = "/v1/volumes/{name}/export", tag = "volumes", params(("name" = String, Path), crate::openapi::ProjectParam),
    responses((status = 204, description = "No longer exported"), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn unexport(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let rec = local_record(&state, &caller.project, &name).await?;
    state.blockd.unexport(&bname(&rec), "nbd").await.map_err(blockd_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// [`create_now`] as an intent: it runs to its end even if the caller goes away.
async fn create_volume(
    state: &std::sync::Arc<AppState>,
    project: &str,
    req: crate::volumes::command::CreateVolumeCommand,
) -> Result<VolumeRecord, socket_http::ApiError> {
    if state.store.get(&record_key(project, &req.name)).await?.is_some() {
        return Err(VolumeError::AlreadyExists(req.name.clone()).into());
    }
    let (st, p, name) = (state.clone(), project.to_string(), req.name.clone());
    crate::intents::run(
        state,
        crate::intents::Kind::Volume,
        project,
        &name,
        "create",
        async move { crate::volumes::work::create_now(&st, &p, req, None).await },
    )
    .await
}

/// A managed service's volume (a database's data) is changed through that service only.
async fn refuse_managed(state: &AppState, project: &str, name: &str) -> Result<(), VolumeError> {
    if let Some(a) = attachment(state, project, name).await? {
        if let Ok((vm, _)) = crate::vms::records::resolve(state, project, &a.vm).await {
            if let Some(by) = vm.managed_by {
                return Err(VolumeError::Managed {
                    name: name.to_string(),
                    by,
                });
            }
        }
    }
    Ok(())
}
