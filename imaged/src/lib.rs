//! imaged: the guest image catalog.
//!
//! This first cut serves the images found in one catalog directory, one folder per
//! image (`<images dir>/<name>/`), as the recipes in `guest-images/` produce them:
//! `vmlinuz` (bzImage, for QEMU), `vmlinux` (uncompressed PVH ELF, for Cloud
//! Hypervisor), `initrd.img`, `cmdline` (the default kernel command line) and
//! `image.json` (metadata). The content-addressed store and imports come later.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use socket_http::ApiError;

/// What a VM needs to boot directly from an image: kernels and initramfs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BootKit {
    /// Compressed kernel (bzImage), booted by QEMU.
    pub kernel_bzimage: Option<PathBuf>,
    /// Uncompressed ELF kernel with the PVH note, booted by Cloud Hypervisor.
    pub kernel_elf: Option<PathBuf>,
    pub initramfs: Option<PathBuf>,
    /// Default kernel command line.
    pub cmdline: String,
}

/// An image in the catalog.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageInfo {
    pub name: String,
    pub boot: BootKit,
    /// The recipe's own metadata (`image.json`), passed through.
    #[serde(default)]
    pub metadata: serde_json::Value,
}

/// Why an image lookup failed.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("image name {0:?} is invalid: use letters, digits, '.', '-' and '_' only")]
    InvalidName(String),
    #[error("image {0:?} does not exist in {1}")]
    NotFound(String, PathBuf),
    #[error("image {name:?} is incomplete: {reason}")]
    Incomplete { name: String, reason: String },
    #[error("cannot read image catalog {0}: {1}")]
    Io(PathBuf, std::io::Error),
}

impl From<ImageError> for ApiError {
    fn from(e: ImageError) -> Self {
        match e {
            ImageError::InvalidName(_) => ApiError::unprocessable(e.to_string()),
            ImageError::NotFound(..) => ApiError::not_found(e.to_string()),
            ImageError::Incomplete { .. } | ImageError::Io(..) => ApiError::internal(e.to_string()),
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

/// The catalog: a directory of image folders.
#[derive(Debug, Clone)]
pub struct ImageCatalog {
    dir: PathBuf,
}

impl ImageCatalog {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Looks an image up by name.
    pub fn get(&self, name: &str) -> Result<ImageInfo, ImageError> {
        validate_name(name)?;
        let dir = self.dir.join(name);
        if !dir.join("image.json").is_file() {
            return Err(ImageError::NotFound(name.to_string(), self.dir.clone()));
        }
        let metadata = std::fs::read(dir.join("image.json"))
            .map_err(|e| ImageError::Io(dir.clone(), e))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| ImageError::Incomplete {
                    name: name.to_string(),
                    reason: format!("image.json: {e}"),
                })
            })?;
        let file = |f: &str| {
            let p = dir.join(f);
            p.is_file().then_some(p)
        };
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "console=ttyS0".to_string());
        let boot = BootKit {
            kernel_bzimage: file("vmlinuz"),
            kernel_elf: file("vmlinux"),
            initramfs: file("initrd.img"),
            cmdline,
        };
        if boot.kernel_bzimage.is_none() && boot.kernel_elf.is_none() {
            return Err(ImageError::Incomplete {
                name: name.to_string(),
                reason: "it has no kernel (vmlinuz or vmlinux)".into(),
            });
        }
        Ok(ImageInfo {
            name: name.to_string(),
            boot,
            metadata,
        })
    }

    /// Every complete image in the catalog, by name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(ImageError::Io(self.dir.clone(), e)),
        };
        let mut images: Vec<ImageInfo> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter_map(|name| self.get(&name).ok())
            .collect();
        images.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(images)
    }
}

/// The HTTP routes imaged serves on its Unix socket.
pub fn router(catalog: ImageCatalog) -> Router {
    let catalog = Arc::new(catalog);
    Router::new()
        .route("/images", get(list_images))
        .route("/images/{name}", get(get_image))
        .with_state(catalog)
        .merge(socket_http::server::health_router("imaged"))
}

async fn list_images(State(c): State<Arc<ImageCatalog>>) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    Ok(Json(c.list()?))
}

async fn get_image(
    State(c): State<Arc<ImageCatalog>>,
    UrlPath(name): UrlPath<String>,
) -> Result<Json<ImageInfo>, ApiError> {
    Ok(Json(c.get(&name)?))
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

    #[test]
    fn catalog_finds_complete_images_only() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let tiny = dir.path().join("tiny");
        std::fs::create_dir_all(&tiny)?;
        std::fs::write(tiny.join("image.json"), r#"{"name":"tiny"}"#)?;
        std::fs::write(tiny.join("vmlinuz"), b"k")?;
        std::fs::write(tiny.join("initrd.img"), b"i")?;
        std::fs::write(tiny.join("cmdline"), "console=ttyS0 quiet\n")?;
        // A folder without a kernel is not an image.
        std::fs::create_dir_all(dir.path().join("broken"))?;
        std::fs::write(dir.path().join("broken/image.json"), "{}")?;

        let catalog = ImageCatalog::new(dir.path());
        let img = catalog.get("tiny")?;
        assert_eq!(img.boot.cmdline, "console=ttyS0 quiet");
        assert_eq!(img.boot.kernel_bzimage, Some(tiny.join("vmlinuz")));
        assert_eq!(img.boot.kernel_elf, None);
        assert!(matches!(catalog.get("nope"), Err(ImageError::NotFound(..))));
        assert!(matches!(catalog.get("broken"), Err(ImageError::Incomplete { .. })));
        let names: Vec<_> = catalog.list()?.into_iter().map(|i| i.name).collect();
        assert_eq!(names, vec!["tiny"]);
        Ok(())
    }
}

/// The client for imaged's Unix-socket API, used by the api.
pub mod client {
    use super::ImageInfo;
    use socket_http::{ClientError, UnixClient};

    #[derive(Debug, Clone)]
    pub struct ImagedClient {
        http: UnixClient,
    }

    impl ImagedClient {
        pub fn new(socket: impl Into<std::path::PathBuf>) -> Self {
            Self {
                http: UnixClient::new(socket),
            }
        }

        pub async fn get(&self, name: &str) -> Result<ImageInfo, ClientError> {
            self.http.get(&format!("/images/{name}")).await
        }

        pub async fn list(&self) -> Result<Vec<ImageInfo>, ClientError> {
            self.http.get("/images").await
        }
    }
}
