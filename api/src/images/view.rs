//! What `/v1/images` shows and takes: the api's own types. imaged's wire types carry
//! the store's file paths (kernels, the disk blob), which are the host's business:
//! the public view says what an image can boot, not where its files are.

use serde::{Deserialize, Serialize};

/// `POST /v1/images` body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// `name` or `name:tag`.
    pub name: String,
    /// An HTTP(S) URL of a disk image (raw or qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An absolute path on the host that stores images: a disk image, or a folder a
    /// recipe in `guest-images/` built (disk.raw, vmlinuz, vmlinux, initrd.img,
    /// cmdline, image.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Expected SHA-256 of the file, `sha256:<hex>` or `<hex>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `raw` or `qcow2`; detected from the bytes when absent. `raw` also accepts a raw
    /// disk that holds no partition table or file system yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Kernel (bzImage or PVH ELF) to boot the disk with: a URL or an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initramfs for that kernel: a URL or an absolute path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<String>,
    /// Default kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

impl From<ImportRequest> for imaged::import::ImportRequest {
    fn from(r: ImportRequest) -> Self {
        Self {
            name: r.name,
            url: r.url,
            path: r.path.map(Into::into),
            sha256: r.sha256,
            format: r.format,
            kernel: r.kernel,
            initramfs: r.initramfs,
            cmdline: r.cmdline,
        }
    }
}

/// What an image can boot with.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct BootKit {
    /// A compressed kernel (bzImage), which QEMU boots.
    pub kernel_bzimage: bool,
    /// An uncompressed ELF kernel with the PVH note, which Cloud Hypervisor boots.
    pub kernel_elf: bool,
    pub initramfs: bool,
    /// Default kernel command line.
    pub cmdline: String,
}

/// An image's root disk: VMs get copy-on-write clones of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct DiskImage {
    /// Always `raw` in the store.
    pub format: String,
    pub virtual_size: u64,
    /// What was imported: `raw` or `qcow2`.
    pub source_format: String,
    /// SHA-256 of the file as imported.
    pub source_digest: String,
}

/// An image in the cache.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Image {
    pub name: String,
    pub tag: String,
    /// Every `name[:tag]` pointing at this image.
    pub names: Vec<String>,
    /// `sha256:<hex>` of the image's manifest.
    pub digest: String,
    pub boot: BootKit,
    pub disk: Option<DiskImage>,
    /// Bytes the image's files take on disk.
    pub stored_bytes: u64,
    /// Where it came from (a URL or a path).
    pub source: String,
    pub imported_at_ms: u64,
    /// VMs using it: while any does, its last name cannot be deleted.
    pub in_use_by: Vec<String>,
    /// The recipe's own metadata (`image.json`), passed through.
    pub metadata: serde_json::Value,
    /// A recipe output in the catalog, not imported yet: the first VM (or `GET`)
    /// that asks for it imports it. It has no digest until then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalog_only: bool,
}

impl From<imaged::ImageInfo> for Image {
    fn from(i: imaged::ImageInfo) -> Self {
        Self {
            name: i.name,
            tag: i.tag,
            names: i.names,
            digest: i.digest,
            boot: BootKit {
                kernel_bzimage: i.boot.kernel_bzimage.is_some(),
                kernel_elf: i.boot.kernel_elf.is_some(),
                initramfs: i.boot.initramfs.is_some(),
                cmdline: i.boot.cmdline,
            },
            disk: i.disk.map(|d| DiskImage {
                format: d.format,
                virtual_size: d.virtual_size,
                source_format: d.source_format.to_string(),
                source_digest: d.source_digest,
            }),
            stored_bytes: i.stored_bytes,
            source: i.source,
            imported_at_ms: i.imported_at_ms,
            in_use_by: i.in_use_by,
            metadata: i.metadata,
            catalog_only: i.catalog_only,
        }
    }
}

/// What deleting an image freed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GcReport {
    /// Digests of the images removed.
    pub images: Vec<String>,
    /// Files removed.
    pub blobs: u64,
    pub freed_bytes: u64,
}

impl From<imaged::store::GcReport> for GcReport {
    fn from(r: imaged::store::GcReport) -> Self {
        Self {
            images: r.images,
            blobs: r.blobs,
            freed_bytes: r.freed_bytes,
        }
    }
}
