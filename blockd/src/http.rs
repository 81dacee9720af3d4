//! blockd's HTTP/JSON API on its Unix socket. Idempotent: `PUT` ensures, `DELETE` of a
//! missing thing succeeds, `GET` reports what exists.
//!
//! - `GET /pool`: backend and space
//! - `GET /volumes`, `GET|PUT|DELETE /volumes/{name}` (body: `VolumeSpec`; a clone is a
//!   `PUT` with `"source": {"snapshot": "volume@snapshot"}`); `PUT` answers 201 when it
//!   created the volume, 200 when it was there
//! - `POST /volumes/{name}/resize` (body: `{"size_bytes": N}`): grow only
//! - `PUT|DELETE /volumes/{name}/snapshots/{snapshot}`
//! - `GET /exports`, `PUT|DELETE /volumes/{name}/exports/{nbd|vhost-user}` (body:
//!   `ExportSpec`): serve a volume over NBD or to a VM over a vhost-user-blk socket
//! - `PUT|DELETE /remote-disks/{name}` (body: `RemoteDiskSpec`): a vhost-user-blk socket
//!   for a volume that another host exports over NBD
//! - `POST /remote-disks/{name}/resize` (body: `{"size_bytes": N}`): grow that volume
//!   through its NBD server (`NBD_CMD_RESIZE`, which blockd's writable exports offer)

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;

use crate::exports::{Export, ExportKind, ExportSpec, RemoteDiskSpec};
use crate::service::{Ensured, PoolStatus, VolumeSpec};
use crate::volume::{Snapshot, Volume};
use crate::Blockd;

type Svc = State<Arc<Blockd>>;
/// Every route of blockd's API with what it takes and answers, named once for the
/// router and its callers (`socket_http::Client::send`).
pub mod routes {
    use socket_http::route::{delete, get, post, put};
    use socket_http::Route;

    use super::Resize;
    use crate::exports::{Export, ExportSpec, RemoteDiskSpec};
    use crate::service::{PoolStatus, VolumeSpec};
    use crate::volume::{Snapshot, Volume};

    pub const POOL: Route<(), PoolStatus> = get("/pool");
    pub const VOLUMES: Route<(), Vec<Volume>> = get("/volumes");
    pub const VOLUME: Route<(), Volume> = get("/volumes/{name}");
    /// 201 when it made the volume, 200 when it was there.
    pub const PUT_VOLUME: Route<VolumeSpec, Volume> = put("/volumes/{name}");
    pub const DELETE_VOLUME: Route<(), ()> = delete("/volumes/{name}");
    pub const VOLUME_RESIZE: Route<Resize, Volume> = post("/volumes/{name}/resize");
    pub const SNAPSHOT: Route<(), Snapshot> = put("/volumes/{name}/snapshots/{snapshot}");
    pub const DELETE_SNAPSHOT: Route<(), ()> = delete("/volumes/{name}/snapshots/{snapshot}");
    /// The volume back to what the snapshot holds.
    pub const ROLLBACK: Route<(), Volume> = post("/volumes/{name}/snapshots/{snapshot}/rollback");
    pub const EXPORTS: Route<(), Vec<Export>> = get("/exports");
    /// `{kind}`: `nbd` or `vhost-user`.
    pub const EXPORT: Route<ExportSpec, Export> = put("/volumes/{name}/exports/{kind}");
    pub const UNEXPORT: Route<(), ()> = delete("/volumes/{name}/exports/{kind}");
    pub const REMOTE_DISK: Route<RemoteDiskSpec, Export> = put("/remote-disks/{name}");
    pub const DELETE_REMOTE_DISK: Route<(), ()> = delete("/remote-disks/{name}");
    pub const REMOTE_DISK_RESIZE: Route<Resize, Export> = post("/remote-disks/{name}/resize");
}

pub fn router(svc: Arc<Blockd>) -> Router {
    use routes::*;
    Router::new()
        .route(POOL.path, POOL.on(pool))
        .route(VOLUMES.path, VOLUMES.on(list))
        .route(VOLUME.path, VOLUME.on(show))
        .route(PUT_VOLUME.path, PUT_VOLUME.on(ensure))
        .route(DELETE_VOLUME.path, DELETE_VOLUME.on(delete))
        .route(VOLUME_RESIZE.path, VOLUME_RESIZE.on(resize))
        .route(SNAPSHOT.path, SNAPSHOT.on(snapshot))
        .route(DELETE_SNAPSHOT.path, DELETE_SNAPSHOT.on(delete_snapshot))
        .route(ROLLBACK.path, ROLLBACK.on(rollback))
        .route(EXPORTS.path, EXPORTS.on(exports))
        .route(EXPORT.path, EXPORT.on(export))
        .route(UNEXPORT.path, UNEXPORT.on(unexport))
        .route(REMOTE_DISK.path, REMOTE_DISK.on(remote_disk))
        .route(DELETE_REMOTE_DISK.path, DELETE_REMOTE_DISK.on(delete_remote_disk))
        .route(REMOTE_DISK_RESIZE.path, REMOTE_DISK_RESIZE.on(resize_remote_disk))
        .with_state(svc)
        .merge(socket_http::server::health_router("blockd"))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let body = if body.is_empty() { b"{}".as_slice() } else { body };
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable(format!("invalid request: {e}")),
        _ => ApiError::bad_request(format!("malformed JSON: {e}")),
    })
}

fn created<T>(made: bool, body: T) -> (StatusCode, Json<T>) {
    (if made { StatusCode::CREATED } else { StatusCode::OK }, Json(body))
}

async fn pool(State(svc): Svc) -> Result<Json<PoolStatus>, ApiError> {
    Ok(Json(svc.volumes.pool().await?))
}

async fn list(State(svc): Svc) -> Result<Json<Vec<Volume>>, ApiError> {
    Ok(Json(svc.volumes.list().await?))
}

async fn show(State(svc): Svc, Path(name): Path<String>) -> Result<Json<Volume>, ApiError> {
    Ok(Json(svc.volumes.get(&name).await?))
}

async fn ensure(
    State(svc): Svc,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Volume>), ApiError> {
    let spec: VolumeSpec = parse(&body)?;
    let (v, how) = svc.volumes.ensure_reporting(&name, spec).await?;
    if how == Ensured::Grown {
        // A larger size given again grows the volume: exports follow, as after a resize.
        svc.exports.resized(&svc.volumes, &name).await;
    }
    Ok(created(how == Ensured::Created, v))
}

async fn delete(State(svc): Svc, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    svc.volumes.delete(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The body of the resize routes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resize {
    pub size_bytes: u64,
}

async fn resize(State(svc): Svc, Path(name): Path<String>, body: axum::body::Bytes) -> Result<Json<Volume>, ApiError> {
    let r: Resize = parse(&body)?;
    let v = svc.volumes.resize(&name, r.size_bytes).await?;
    svc.exports.resized(&svc.volumes, &name).await;
    Ok(Json(v))
}

async fn snapshot(
    State(svc): Svc,
    Path((name, snap)): Path<(String, String)>,
) -> Result<(StatusCode, Json<Snapshot>), ApiError> {
    let (s, made) = svc.volumes.snapshot(&name, &snap).await?;
    Ok(created(made, s))
}

async fn rollback(State(svc): Svc, Path((name, snap)): Path<(String, String)>) -> Result<Json<Volume>, ApiError> {
    Ok(Json(svc.volumes.rollback(&name, &snap).await?))
}

async fn delete_snapshot(State(svc): Svc, Path((name, snap)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    svc.volumes.delete_snapshot(&name, &snap).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn exports(State(svc): Svc) -> Json<Vec<Export>> {
    Json(svc.exports.list().await)
}

fn kind(s: &str) -> Result<ExportKind, ApiError> {
    match s {
        "nbd" => Ok(ExportKind::Nbd),
        "vhost-user" => Ok(ExportKind::VhostUser),
        _ => Err(ApiError::not_found(format!(
            "no export kind {s:?}; use nbd or vhost-user"
        ))),
    }
}

async fn export(
    State(svc): Svc,
    Path((name, k)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Export>), ApiError> {
    let spec: ExportSpec = parse(&body)?;
    let (e, made) = svc.exports.export(&svc.volumes, &name, kind(&k)?, spec).await?;
    Ok(created(made, e))
}

async fn unexport(State(svc): Svc, Path((name, k)): Path<(String, String)>) -> Result<StatusCode, ApiError> {
    svc.exports.unexport(&name, kind(&k)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn remote_disk(
    State(svc): Svc,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Export>), ApiError> {
    let spec: RemoteDiskSpec = parse(&body)?;
    let (e, made) = svc.exports.remote_disk(&name, spec).await?;
    Ok(created(made, e))
}

async fn resize_remote_disk(
    State(svc): Svc,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<Export>, ApiError> {
    let r: Resize = parse(&body)?;
    Ok(Json(svc.exports.resize_remote_disk(&name, r.size_bytes).await?))
}

async fn delete_remote_disk(State(svc): Svc, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    svc.exports.delete_remote_disk(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// blockd's callers' view of it: the one client (`socket_http::Client`) and blockd's
/// typed routes; these are shorthands for the calls made most.
pub mod client {
    use socket_http::{Client, ClientError};

    use super::{routes, Resize};
    use crate::exports::{Export, ExportSpec, RemoteDiskSpec};
    use crate::service::{PoolStatus, VolumeSpec};
    use crate::volume::{Snapshot, Volume};

    /// blockd's client: any endpoint, Unix socket or TLS.
    #[derive(Debug, Clone)]
    pub struct BlockdClient(pub Client);

    impl BlockdClient {
        pub fn new(socket: impl Into<std::path::PathBuf>) -> Self {
            Self(Client::new(socket).with_timeout(std::time::Duration::from_secs(600)))
        }
        /// Rides out a restart of the daemon (see [`Client::with_retry`]).
        pub fn with_retry(self, window: std::time::Duration) -> Self {
            Self(self.0.with_retry(window))
        }
        pub async fn pool(&self) -> Result<PoolStatus, ClientError> {
            self.0.send(&routes::POOL, &[], None).await
        }
        pub async fn volumes(&self) -> Result<Vec<Volume>, ClientError> {
            self.0.send(&routes::VOLUMES, &[], None).await
        }
        pub async fn volume(&self, name: &str) -> Result<Volume, ClientError> {
            self.0.send(&routes::VOLUME, &[name], None).await
        }
        pub async fn ensure_volume(&self, name: &str, spec: &VolumeSpec) -> Result<Volume, ClientError> {
            self.0.send(&routes::PUT_VOLUME, &[name], Some(spec)).await
        }
        pub async fn delete_volume(&self, name: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_VOLUME, &[name], None).await
        }
        pub async fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume, ClientError> {
            self.0
                .send(&routes::VOLUME_RESIZE, &[name], Some(&Resize { size_bytes }))
                .await
        }
        pub async fn snapshot(&self, name: &str, snapshot: &str) -> Result<Snapshot, ClientError> {
            self.0.send(&routes::SNAPSHOT, &[name, snapshot], None).await
        }
        pub async fn rollback(&self, name: &str, snapshot: &str) -> Result<Volume, ClientError> {
            self.0.send(&routes::ROLLBACK, &[name, snapshot], None).await
        }
        pub async fn delete_snapshot(&self, name: &str, snapshot: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_SNAPSHOT, &[name, snapshot], None).await
        }
        pub async fn exports(&self) -> Result<Vec<Export>, ClientError> {
            self.0.send(&routes::EXPORTS, &[], None).await
        }
        /// `kind` is `nbd` or `vhost-user`.
        pub async fn export(&self, name: &str, kind: &str, spec: &ExportSpec) -> Result<Export, ClientError> {
            self.0.send(&routes::EXPORT, &[name, kind], Some(spec)).await
        }
        pub async fn unexport(&self, name: &str, kind: &str) -> Result<(), ClientError> {
            self.0.send(&routes::UNEXPORT, &[name, kind], None).await
        }
        pub async fn remote_disk(&self, name: &str, spec: &RemoteDiskSpec) -> Result<Export, ClientError> {
            self.0.send(&routes::REMOTE_DISK, &[name], Some(spec)).await
        }
        /// Grows the volume behind a remote disk through its NBD server.
        pub async fn resize_remote_disk(&self, name: &str, size_bytes: u64) -> Result<Export, ClientError> {
            self.0
                .send(&routes::REMOTE_DISK_RESIZE, &[name], Some(&Resize { size_bytes }))
                .await
        }
        pub async fn delete_remote_disk(&self, name: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_REMOTE_DISK, &[name], None).await
        }
    }
}
