//! imaged: the guest image cache.
//!
//! Images live once in a content-addressed store (`store`), named by SHA-256 digest,
//! with names and tags pointing at digests. They arrive by import (`import`): from an
//! HTTP(S) URL (`fetch`, resumable, checksummed, coalesced), a local disk file, or a
//! folder a recipe in `guest-images/` built. qcow2 is converted to raw on import
//! (`format`) so storage backends can clone it copy-on-write. imaged also writes each
//! VM's cloud-init NoCloud seed (`cloudinit`).
//!
//! A catalog folder (`--catalog-dir`, one recipe output per subfolder) is imported on
//! first use: asking for `tiny` when the store has no such name imports
//! `<catalog>/tiny/`.

pub mod bootkit;
pub mod cloudinit;
pub mod fetch;
pub mod format;
pub mod import;
pub mod qcow2;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;

use crate::format::SourceFormat;
use crate::import::{ImportRequest, ImportStatus, Importer};
use crate::store::{GcReport, ImageRef, Store};

/// What a VM needs to boot directly from an image: kernels and initramfs.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BootKit {
    /// Compressed kernel (bzImage), booted by QEMU.
    pub kernel_bzimage: Option<PathBuf>,
    /// Uncompressed ELF kernel with the PVH note, booted by Cloud Hypervisor.
    pub kernel_elf: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// Default kernel command line.
    pub cmdline: String,
}

/// An image's root disk in the store: raw, never written (VMs get clones).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DiskImage {
    pub path: PathBuf,
    /// Always `raw` in the store.
    pub format: String,
    pub virtual_size: u64,
    /// What was imported: raw or qcow2.
    pub source_format: SourceFormat,
    /// SHA-256 of the file as imported.
    pub source_digest: String,
}

/// An image in the store.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    #[serde(default)]
    pub tag: String,
    /// Every `name[:tag]` pointing at this image.
    #[serde(default)]
    pub names: Vec<String>,
    /// `sha256:<hex>` of the image's manifest.
    #[serde(default)]
    pub digest: String,
    pub boot: BootKit,
    #[serde(default)]
    pub disk: Option<DiskImage>,
    /// Bytes the image's files take on disk.
    #[serde(default)]
    pub stored_bytes: u64,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub imported_at_ms: u64,
    /// VMs using it: while any does, its last name cannot be deleted.
    #[serde(default)]
    pub in_use_by: Vec<String>,
    /// The recipe's own metadata (`image.json`), passed through.
    #[serde(default)]
    pub metadata: serde_json::Value,
    /// A recipe output in the catalog, not imported yet: the first VM (or `GET`)
    /// that asks for it imports it. It has no digest until then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalog_only: bool,
}

/// Why an image operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image name {0:?} is invalid: use letters, digits, '.', '-' and '_' (and name:tag)")]
    InvalidName(String),
    #[error("image {0:?} does not exist")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    SourceMissing(String),
    #[error("not a disk image: {0}")]
    NotADisk(String),
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("checksum mismatch: expected {expected}, the file has {got}; nothing was stored")]
    ChecksumMismatch { expected: String, got: String },
    #[error("{0}")]
    Source(String),
    #[error("{0}")]
    Unreachable(String),
    #[error("image {image:?} is in use by {users:?}; delete those VMs first")]
    InUse { image: String, users: Vec<String> },
    #[error("{0}")]
    Tool(String),
    #[error("image store is damaged: {0}")]
    Corrupt(String),
    #[error("{path}: {source}", path = .0.display(), source = .1)]
    Io(PathBuf, std::io::Error),
}

impl ImageError {
    /// Says which part of an import failed.
    pub fn context(self, what: &str) -> ImageError {
        match self {
            ImageError::Source(m) => ImageError::Source(format!("{what}: {m}")),
            ImageError::Unreachable(m) => ImageError::Unreachable(format!("{what}: {m}")),
            other => other,
        }
    }
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        let msg = e.to_string();
        match e {
            ImageError::InvalidName(_) | ImageError::Invalid(_) => ApiError::unprocessable(msg),
            ImageError::NotFound(_) => ApiError::not_found(msg),
            ImageError::SourceMissing(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "source_missing", msg),
            ImageError::NotADisk(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "not_a_disk_image", msg),
            ImageError::Unsupported(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unsupported_format", msg),
            ImageError::ChecksumMismatch { .. } => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "checksum_mismatch", msg)
            }
            ImageError::Source(_) => ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "source_error", msg),
            ImageError::Unreachable(_) => ApiError::new(StatusCode::BAD_GATEWAY, "source_unreachable", msg),
            ImageError::InUse { .. } => ApiError::conflict(msg),
            ImageError::Tool(_) | ImageError::Corrupt(_) | ImageError::Io(..) => ApiError::internal(msg),
        }
    }
}

/// Checks a user-supplied image name: no path separators, no `..`, no control characters.
pub fn validate_name(name: &str) -> Result<(), ImageError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ImageError::InvalidName(name.to_string()))
    }
}

/// Where imaged keeps things.
#[derive(Debug, Clone)]
pub struct ImagedConfig {
    /// The content-addressed store.
    pub store_dir: PathBuf,
    /// Recipe outputs imported on first use (`<dir>/<name>/image.json`).
    pub catalog_dir: Option<PathBuf>,
    /// cloud-init seeds, one FAT image per VM.
    pub seeds_dir: PathBuf,
}

impl ImagedConfig {
    /// Everything under one data directory, with an optional catalog.
    pub fn new(data_dir: &Path, catalog_dir: Option<PathBuf>) -> ImagedConfig {
        ImagedConfig {
            store_dir: data_dir.join("imaged"),
            catalog_dir,
            seeds_dir: data_dir.join("imaged/seeds"),
        }
    }
}

/// The daemon's state.
#[derive(Debug)]
pub struct Imaged {
    importer: Arc<Importer>,
    catalog_dir: Option<PathBuf>,
    seeds_dir: PathBuf,
}

impl Imaged {
    pub fn open(cfg: ImagedConfig) -> Result<Arc<Imaged>, ImageError> {
        let store = Arc::new(Store::open(&cfg.store_dir)?);
        std::fs::create_dir_all(&cfg.seeds_dir).map_err(|e| ImageError::Io(cfg.seeds_dir.clone(), e))?;
        // Leftovers of an import that died with the last run, and unused images.
        store.gc()?;
        Ok(Arc::new(Imaged {
            importer: Arc::new(Importer::new(store)),
            catalog_dir: cfg.catalog_dir,
            seeds_dir: cfg.seeds_dir,
        }))
    }

    pub fn store(&self) -> &Arc<Store> {
        self.importer.store()
    }

    pub fn importer(&self) -> &Arc<Importer> {
        &self.importer
    }

    /// Finds an image; a name the store lacks but the catalog has is imported now.
    pub async fn get(&self, what: &str) -> Result<ImageInfo, ApiError> {
        let store = self.store();
        if let Some((m, refs)) = store.resolve(what)? {
            let shown = ImageRef::parse(what).ok();
            return Ok(store.info(&m, &refs, shown.as_ref()));
        }
        let r = ImageRef::parse(what)?;
        let recipe = self
            .catalog_dir
            .as_ref()
            .map(|d| d.join(&r.name))
            .filter(|d| r.tag == "latest" && d.join("image.json").is_file());
        match recipe {
            Some(dir) => {
                tracing::info!(image = %r, dir = %dir.display(), "importing from the catalog");
                self.importer
                    .import_and_wait(ImportRequest {
                        name: r.to_string(),
                        path: Some(dir),
                        ..Default::default()
                    })
                    .await
            }
            None => Err(ImageError::NotFound(what.to_string()).into()),
        }
    }

    fn seed_path(&self, id: &str) -> Result<PathBuf, ImageError> {
        validate_name(id)?;
        Ok(self.seeds_dir.join(format!("{id}.img")))
    }
}

/// What `PUT /seeds/{id}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Seed {
    /// The FAT image to attach to the VM as a read-only raw disk.
    pub path: PathBuf,
    pub files: cloudinit::SeedFiles,
}

/// Every route of imaged's API with what it takes and answers, named once for the
/// router and its callers (`socket_http::Client::send`).
pub mod routes {
    use socket_http::route::{delete, get, post, put};
    use socket_http::Route;

    use super::{cloudinit::SeedRequest, GcReport, ImageInfo, Seed};
    use crate::import::{ImportRequest, ImportStatus};

    pub const IMAGES: Route<(), Vec<ImageInfo>> = get("/images");
    /// A catalog recipe not imported yet is imported first.
    pub const IMAGE: Route<(), ImageInfo> = get("/images/{image}");
    pub const DELETE_IMAGE: Route<(), GcReport> = delete("/images/{image}");
    pub const IMAGE_LEASE: Route<(), ImageInfo> = put("/images/{image}/leases/{holder}");
    pub const LEASES: Route<(), ()> = delete("/leases/{holder}");
    pub const IMPORTS: Route<(), Vec<ImportStatus>> = get("/imports");
    pub const START_IMPORT: Route<ImportRequest, ImportStatus> = post("/imports");
    /// `?wait=<seconds>` waits up to 60 s for a change.
    pub const IMPORT: Route<(), ImportStatus> = get("/imports/{id}");
    pub const GC: Route<(), GcReport> = post("/gc");
    pub const SEED: Route<SeedRequest, Seed> = put("/seeds/{id}");
    pub const DELETE_SEED: Route<(), ()> = delete("/seeds/{id}");
}

/// The HTTP routes imaged serves on its Unix socket.
pub fn router(imaged: Arc<Imaged>) -> Router {
    use routes::*;
    Router::new()
        .route(IMAGES.path, IMAGES.on(list_images))
        .route(IMAGE.path, IMAGE.on(get_image))
        .route(DELETE_IMAGE.path, DELETE_IMAGE.on(delete_image))
        .route(IMAGE_LEASE.path, IMAGE_LEASE.on(lease))
        .route(LEASES.path, LEASES.on(release))
        .route(IMPORTS.path, IMPORTS.on(list_imports))
        .route(START_IMPORT.path, START_IMPORT.on(start_import))
        .route(IMPORT.path, IMPORT.on(import_status))
        .route(GC.path, GC.on(gc))
        .route(SEED.path, SEED.on(put_seed))
        .route(DELETE_SEED.path, DELETE_SEED.on(delete_seed))
        .with_state(imaged)
        .merge(socket_http::server::health_router("imaged"))
}

type S = State<Arc<Imaged>>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("imaged task failed: {e}")))?
        .map_err(ApiError::from)
}

/// The store's images, then the catalog's recipes that are not imported yet.
async fn list_images(State(d): S) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    let store = d.store().clone();
    let mut images = blocking(move || store.list()).await?;
    if let Some(dir) = &d.catalog_dir {
        let mut pending: Vec<ImageInfo> = std::fs::read_dir(dir)
            .map(|rd| rd.flatten().collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter_map(|e| e.file_name().into_string().ok().map(|n| (n, e.path())))
            .filter(|(n, p)| validate_name(n).is_ok() && p.join("image.json").is_file())
            .filter(|(n, _)| !images.iter().any(|i| i.name == *n && i.tag == "latest"))
            .map(|(name, path)| ImageInfo {
                name,
                tag: "latest".into(),
                source: path.display().to_string(),
                metadata: std::fs::read(path.join("image.json"))
                    .ok()
                    .and_then(|b| serde_json::from_slice(&b).ok())
                    .unwrap_or_default(),
                catalog_only: true,
                ..Default::default()
            })
            .collect();
        pending.sort_by(|a, b| a.name.cmp(&b.name));
        images.extend(pending);
    }
    Ok(Json(images))
}

async fn get_image(State(d): S, UrlPath(image): UrlPath<String>) -> Result<Json<ImageInfo>, ApiError> {
    Ok(Json(d.get(&image).await?))
}

async fn delete_image(State(d): S, UrlPath(image): UrlPath<String>) -> Result<Json<GcReport>, ApiError> {
    let store = d.store().clone();
    Ok(Json(blocking(move || store.delete(&image)).await?))
}

async fn lease(State(d): S, UrlPath((image, holder)): UrlPath<(String, String)>) -> Result<Json<ImageInfo>, ApiError> {
    d.get(&image).await?;
    let store = d.store().clone();
    Ok(Json(blocking(move || store.lease(&image, &holder)).await?))
}

async fn release(State(d): S, UrlPath(holder): UrlPath<String>) -> Result<StatusCode, ApiError> {
    let store = d.store().clone();
    blocking(move || store.release(&holder)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn start_import(State(d): S, Json(req): Json<ImportRequest>) -> Result<impl IntoResponse, ApiError> {
    let st = d.importer.start(req)?;
    Ok((StatusCode::ACCEPTED, Json(st)))
}

async fn list_imports(State(d): S) -> Json<Vec<ImportStatus>> {
    Json(d.importer.list())
}

#[derive(Deserialize)]
struct WaitQuery {
    #[serde(default)]
    wait: Option<f64>,
}

async fn import_status(
    State(d): S,
    UrlPath(id): UrlPath<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<ImportStatus>, ApiError> {
    let wait = Duration::from_secs_f64(q.wait.unwrap_or(0.0).clamp(0.0, 60.0));
    Ok(Json(d.importer.status(&id, wait).await?))
}

async fn gc(State(d): S) -> Result<Json<GcReport>, ApiError> {
    let store = d.store().clone();
    Ok(Json(blocking(move || store.gc()).await?))
}

async fn put_seed(
    State(d): S,
    UrlPath(id): UrlPath<String>,
    Json(req): Json<cloudinit::SeedRequest>,
) -> Result<Json<Seed>, ApiError> {
    let path = d.seed_path(&id)?;
    let files = cloudinit::compose(&req)?;
    let (p, f) = (path.clone(), files.clone());
    blocking(move || cloudinit::write_seed(&f, &p)).await?;
    Ok(Json(Seed { path, files }))
}

async fn delete_seed(State(d): S, UrlPath(id): UrlPath<String>) -> Result<StatusCode, ApiError> {
    let path = d.seed_path(&id)?;
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(StatusCode::NO_CONTENT),
        Err(e) => Err(ImageError::Io(path, e).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_with_paths_or_control_characters_are_refused() {
        for bad in ["", "../etc", "a/b", ".hidden", "a\nb", "x y", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} should be refused");
        }
        for good in ["tiny", "debian-12", "pg_15.4"] {
            assert!(validate_name(good).is_ok(), "{good:?} should be accepted");
        }
    }
}

/// imaged's callers' view of it: the one client (`socket_http::Client`) and imaged's
/// typed routes; these are shorthands for the calls made most.
pub mod client {
    use std::time::Duration;

    use socket_http::{Client, ClientError};

    use super::{cloudinit::SeedRequest, routes, GcReport, ImageInfo, Seed};
    use crate::import::{ImportRequest, ImportStatus};

    /// imaged's client: any endpoint, Unix socket or TLS.
    #[derive(Debug, Clone)]
    pub struct ImagedClient(pub Client);

    impl ImagedClient {
        pub fn new(socket: impl Into<std::path::PathBuf>) -> Self {
            Self(Client::new(socket))
        }

        /// Rides out a restart of the daemon (see [`Client::with_retry`]).
        pub fn with_retry(self, window: std::time::Duration) -> Self {
            Self(self.0.with_retry(window))
        }

        /// Up to 10 minutes: an image a catalog recipe makes is imported first.
        fn patient(&self) -> Client {
            self.0.clone().with_timeout(Duration::from_secs(600))
        }

        /// Looks an image up (a catalog recipe is imported first, which takes a while).
        pub async fn get(&self, name: &str) -> Result<ImageInfo, ClientError> {
            self.patient().send(&routes::IMAGE, &[name], None).await
        }

        pub async fn list(&self) -> Result<Vec<ImageInfo>, ClientError> {
            self.0.send(&routes::IMAGES, &[], None).await
        }

        pub async fn delete(&self, name: &str) -> Result<GcReport, ClientError> {
            self.0.send(&routes::DELETE_IMAGE, &[name], None).await
        }

        pub async fn lease(&self, name: &str, holder: &str) -> Result<ImageInfo, ClientError> {
            self.patient().send(&routes::IMAGE_LEASE, &[name, holder], None).await
        }

        pub async fn release(&self, holder: &str) -> Result<(), ClientError> {
            self.0.send(&routes::LEASES, &[holder], None).await
        }

        pub async fn import(&self, req: &ImportRequest) -> Result<ImportStatus, ClientError> {
            self.0.send(&routes::START_IMPORT, &[], Some(req)).await
        }

        /// The import's status once it changed, or after `wait_secs`.
        pub async fn import_status(&self, id: &str, wait_secs: f64) -> Result<ImportStatus, ClientError> {
            let route = &routes::IMPORT;
            self.0
                .clone()
                .with_timeout(Duration::from_secs_f64(wait_secs + 30.0))
                .call::<(), _>(
                    route.method.clone(),
                    &format!("{}?wait={wait_secs}", route.at(&[id])),
                    None,
                )
                .await
        }

        pub async fn seed(&self, id: &str, req: &SeedRequest) -> Result<Seed, ClientError> {
            self.0.send(&routes::SEED, &[id], Some(req)).await
        }

        pub async fn delete_seed(&self, id: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_SEED, &[id], None).await
        }
    }
}
