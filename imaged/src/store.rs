//! The content-addressed image store.
//!
//! ```text
//! <root>/blobs/sha256/<hex>   immutable files (mode 0444): raw disks, kernels, initramfs
//! <root>/images/<hex>.json    manifests; an image's digest is the SHA-256 of its
//!                             canonical manifest (disk and boot blobs, command line)
//! <root>/refs/<name>/<tag>    names and tags, each holding a digest
//! <root>/leases/<hex>/<who>   what uses an image (a VM id): it cannot be deleted
//! <root>/tmp/                 downloads and conversions in progress
//! ```
//! A blob's name is the digest of the bytes imaged received for it: for a disk, the
//! file as downloaded or read (qcow2 or raw), even when the stored blob is the raw
//! conversion. The same bytes imported twice are stored once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::format::SourceFormat;
use crate::{validate_name, BootKit, DiskImage, ImageError, ImageInfo};

/// A disk in a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestDisk {
    /// The stored raw disk.
    pub blob: String,
    pub virtual_size: u64,
    pub source_format: SourceFormat,
}

/// Boot files in a manifest (blob digests).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ManifestBoot {
    pub kernel_bzimage: Option<String>,
    pub kernel_elf: Option<String>,
    pub initramfs: Option<String>,
    pub cmdline: String,
}

/// What is content-addressed: the parts of a manifest that say what the image is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestContent {
    pub disk: Option<ManifestDisk>,
    pub boot: ManifestBoot,
}

impl ManifestContent {
    /// `sha256:<hex>` of the canonical JSON.
    pub fn digest(&self) -> String {
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        format!("sha256:{}", hex(&Sha256::digest(&bytes)))
    }
}

/// A stored image.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub digest: String,
    #[serde(flatten)]
    pub content: ManifestContent,
    /// Where it came from (a URL or a path).
    pub source: String,
    #[serde(default)]
    pub metadata: serde_json::Value,
    pub imported_at_ms: u64,
}

/// SHA-256 by ring (BoringSSL's assembly, with the CPU's SHA extensions where it has
/// them): imports hash every byte, so this is on the import's critical path.
#[derive(Clone)]
pub struct Sha256(ring::digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(ring::digest::Context::new(&ring::digest::SHA256))
    }
}

impl Sha256 {
    pub fn new() -> Sha256 {
        Sha256::default()
    }
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
    pub fn finalize(self) -> Vec<u8> {
        self.0.finish().as_ref().to_vec()
    }
    pub fn digest(bytes: &[u8]) -> Vec<u8> {
        ring::digest::digest(&ring::digest::SHA256, bytes).as_ref().to_vec()
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The hex part of `sha256:<hex>` or `<hex>`, checked.
pub fn parse_digest(s: &str) -> Result<String, ImageError> {
    let h = s.strip_prefix("sha256:").unwrap_or(s).to_ascii_lowercase();
    if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(h)
    } else {
        Err(ImageError::InvalidName(format!(
            "{s:?} is not a SHA-256 digest (64 hex digits, optionally after \"sha256:\")"
        )))
    }
}

/// `name` or `name:tag` (tag `latest` when absent).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub tag: String,
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, ImageError> {
        let (name, tag) = match s.split_once(':') {
            Some((n, t)) => (n, t),
            None => (s, "latest"),
        };
        validate_name(name)?;
        validate_name(tag).map_err(|_| ImageError::InvalidName(s.to_string()))?;
        Ok(ImageRef {
            name: name.to_string(),
            tag: tag.to_string(),
        })
    }
}

impl std::fmt::Display for ImageRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.tag == "latest" {
            f.write_str(&self.name)
        } else {
            write!(f, "{}:{}", self.name, self.tag)
        }
    }
}

/// The store on disk. Writers take one lock; every file appears by rename.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    lock: Mutex<()>,
    /// Blobs an import has put in place but not yet named in a manifest, and since
    /// when: garbage collection (after another import, say) leaves them alone.
    held: Mutex<HashMap<String, Instant>>,
}

/// A blob no manifest names is kept this long after it was put in place, for the
/// import still working on its other parts; one that failed lets go of it then.
const HOLD_FOR: Duration = Duration::from_secs(3600);

/// Partial downloads older than this are collected.
const STALE_TMP: Duration = Duration::from_secs(24 * 3600);

fn io_err(p: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |e| ImageError::Io(p.to_path_buf(), e)
}

impl Store {
    pub fn open(root: impl Into<PathBuf>) -> Result<Store, ImageError> {
        let root = root.into();
        for d in ["blobs/sha256", "images", "refs", "leases", "tmp"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(Store {
            root,
            lock: Mutex::new(()),
            held: Mutex::new(HashMap::new()),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh temporary path in the store's file system (renames stay atomic).
    pub fn tmp_path(&self, what: &str) -> PathBuf {
        self.tmp_dir().join(format!("{what}-{}", uuid::Uuid::new_v4()))
    }

    fn guard(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn blob_path(&self, hex: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(hex)
    }

    fn manifest_path(&self, hex: &str) -> PathBuf {
        self.root.join("images").join(format!("{hex}.json"))
    }

    fn ref_path(&self, r: &ImageRef) -> PathBuf {
        self.root.join("refs").join(&r.name).join(&r.tag)
    }

    /// Moves a finished temporary file into the store as blob `hex`. If the blob exists
    /// already (the same bytes were imported before), the temporary file is dropped.
    pub fn adopt_blob(&self, tmp: &Path, hex: &str) -> Result<PathBuf, ImageError> {
        if !self.blob_path(hex).exists() {
            File::open(tmp).and_then(|f| f.sync_all()).map_err(io_err(tmp))?;
        }
        self.adopt_synced_blob(tmp, hex)
    }

    /// [`Store::adopt_blob`] for a file the caller has already flushed to disk.
    pub fn adopt_synced_blob(&self, tmp: &Path, hex: &str) -> Result<PathBuf, ImageError> {
        self.hold(hex);
        let dst = self.blob_path(hex);
        if dst.exists() {
            let _ = fs::remove_file(tmp);
            return Ok(dst);
        }
        fs::set_permissions(tmp, fs::Permissions::from_mode(0o444)).map_err(io_err(tmp))?;
        fs::rename(tmp, &dst).map_err(io_err(&dst))?;
        Ok(dst)
    }

    fn hold(&self, hex: &str) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.insert(hex.to_string(), Instant::now());
    }

    /// Stores `bytes` as a blob; returns its digest (hex).
    pub fn put_blob(&self, bytes: &[u8]) -> Result<String, ImageError> {
        let hex = hex(&Sha256::digest(bytes));
        self.hold(&hex);
        if !self.blob_path(&hex).exists() {
            let tmp = self.tmp_path("blob");
            let written = File::create(&tmp)
                .and_then(|mut f| f.write_all(bytes).and_then(|_| f.sync_all()))
                .map_err(io_err(&tmp));
            if let Err(e) = written.and_then(|_| self.adopt_synced_blob(&tmp, &hex)) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
        }
        Ok(hex)
    }

    /// Copies a local file into the store, hashing it on the way and leaving zero
    /// blocks as holes. Returns the blob's digest (hex).
    pub fn import_file(&self, src: &Path, progress: &dyn Fn(u64)) -> Result<String, ImageError> {
        let tmp = self.tmp_path("blob");
        let done = copy_hashing(src, &tmp, progress).and_then(|hex| self.adopt_blob(&tmp, &hex).map(|_| hex));
        if done.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        done
    }

    /// Records a manifest and points `refs` at it.
    pub fn commit(&self, manifest: &Manifest, refs: &[ImageRef]) -> Result<(), ImageError> {
        let hex = parse_digest(&manifest.digest)?;
        let _g = self.guard();
        let path = self.manifest_path(&hex);
        if !path.exists() {
            let bytes = serde_json::to_vec_pretty(manifest).map_err(|e| ImageError::Corrupt(e.to_string()))?;
            write_atomic(&path, &bytes)?;
        }
        for r in refs {
            let p = self.ref_path(r);
            if let Some(dir) = p.parent() {
                fs::create_dir_all(dir).map_err(io_err(dir))?;
            }
            write_atomic(&p, manifest.digest.as_bytes())?;
        }
        // Named by a manifest now: garbage collection sees them through it.
        let c = &manifest.content;
        let blobs = [&c.boot.kernel_bzimage, &c.boot.kernel_elf, &c.boot.initramfs]
            .into_iter()
            .flatten()
            .chain(c.disk.as_ref().map(|d| &d.blob));
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        for b in blobs {
            held.remove(b);
        }
        Ok(())
    }

    fn read_manifest(&self, hex: &str) -> Result<Option<Manifest>, ImageError> {
        match fs::read(self.manifest_path(hex)) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| ImageError::Corrupt(format!("manifest {hex}: {e}"))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ImageError::Io(self.manifest_path(hex), e)),
        }
    }

    fn read_ref(&self, r: &ImageRef) -> Option<String> {
        fs::read_to_string(self.ref_path(r))
            .ok()
            .and_then(|s| parse_digest(s.trim()).ok())
    }

    /// Every ref, with the digest (hex) it points at.
    fn all_refs(&self) -> Vec<(ImageRef, String)> {
        let mut out = Vec::new();
        let Ok(names) = fs::read_dir(self.root.join("refs")) else {
            return out;
        };
        for n in names.flatten() {
            let Ok(tags) = fs::read_dir(n.path()) else { continue };
            for t in tags.flatten() {
                let r = ImageRef {
                    name: n.file_name().to_string_lossy().into_owned(),
                    tag: t.file_name().to_string_lossy().into_owned(),
                };
                if let Some(d) = self.read_ref(&r) {
                    out.push((r, d));
                }
            }
        }
        out.sort();
        out
    }

    fn leases(&self, hex: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.root.join("leases").join(hex))
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Finds an image by `name[:tag]` or by digest.
    pub fn resolve(&self, what: &str) -> Result<Option<(Manifest, Vec<ImageRef>)>, ImageError> {
        let hex = if let Ok(h) = parse_digest(what) {
            h
        } else {
            let r = ImageRef::parse(what)?;
            match self.read_ref(&r) {
                Some(h) => h,
                None => return Ok(None),
            }
        };
        let Some(m) = self.read_manifest(&hex)? else {
            return Ok(None);
        };
        let refs = self
            .all_refs()
            .into_iter()
            .filter(|(_, d)| *d == hex)
            .map(|(r, _)| r)
            .collect();
        Ok(Some((m, refs)))
    }

    /// Describes an image for the API, as the ref `shown` (or its first name).
    pub fn info(&self, m: &Manifest, refs: &[ImageRef], shown: Option<&ImageRef>) -> ImageInfo {
        let blob = |h: &Option<String>| h.as_ref().map(|h| self.blob_path(h));
        let hex = parse_digest(&m.digest).unwrap_or_default();
        let mut blobs: BTreeSet<&String> = BTreeSet::new();
        blobs.extend(m.content.disk.as_ref().map(|d| &d.blob));
        blobs.extend(m.content.boot.kernel_bzimage.iter());
        blobs.extend(m.content.boot.kernel_elf.iter());
        blobs.extend(m.content.boot.initramfs.iter());
        let stored_bytes = blobs
            .iter()
            .filter_map(|h| fs::metadata(self.blob_path(h)).ok())
            .map(|md| std::os::unix::fs::MetadataExt::blocks(&md) * 512)
            .sum();
        let name = shown.or(refs.first());
        ImageInfo {
            name: name.map(|r| r.name.clone()).unwrap_or_default(),
            tag: name.map(|r| r.tag.clone()).unwrap_or_default(),
            names: refs.iter().map(|r| r.to_string()).collect(),
            digest: m.digest.clone(),
            boot: BootKit {
                kernel_bzimage: blob(&m.content.boot.kernel_bzimage),
                kernel_elf: blob(&m.content.boot.kernel_elf),
                initramfs: blob(&m.content.boot.initramfs),
                cmdline: m.content.boot.cmdline.clone(),
            },
            disk: m.content.disk.as_ref().map(|d| DiskImage {
                path: self.blob_path(&d.blob),
                format: "raw".into(),
                virtual_size: d.virtual_size,
                source_format: d.source_format,
                source_digest: format!("sha256:{}", d.blob),
            }),
            stored_bytes,
            source: m.source.clone(),
            imported_at_ms: m.imported_at_ms,
            in_use_by: self.leases(&hex),
            metadata: m.metadata.clone(),
            catalog_only: false,
        }
    }

    /// Every named image, once per name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, ImageError> {
        let refs = self.all_refs();
        let mut by_digest: BTreeMap<String, Vec<ImageRef>> = BTreeMap::new();
        for (r, d) in &refs {
            by_digest.entry(d.clone()).or_default().push(r.clone());
        }
        let mut out = Vec::new();
        for (r, d) in &refs {
            if let Some(m) = self.read_manifest(d)? {
                out.push(self.info(&m, &by_digest[d], Some(r)));
            }
        }
        Ok(out)
    }

    /// Marks an image as used by `holder` (a VM id). Idempotent.
    pub fn lease(&self, what: &str, holder: &str) -> Result<ImageInfo, ImageError> {
        validate_name(holder)?;
        let _g = self.guard();
        let (m, refs) = self
            .resolve(what)?
            .ok_or_else(|| ImageError::NotFound(what.to_string()))?;
        let hex = parse_digest(&m.digest)?;
        let dir = self.root.join("leases").join(&hex);
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let p = dir.join(holder);
        File::create(&p).map_err(io_err(&p))?;
        Ok(self.info(&m, &refs, None))
    }

    /// Drops every lease `holder` has. Idempotent.
    pub fn release(&self, holder: &str) -> Result<(), ImageError> {
        validate_name(holder)?;
        let _g = self.guard();
        let leases = self.root.join("leases");
        for d in fs::read_dir(&leases).map_err(io_err(&leases))?.flatten() {
            let p = d.path().join(holder);
            if p.exists() {
                fs::remove_file(&p).map_err(io_err(&p))?;
            }
            let _ = fs::remove_dir(d.path()); // only when empty
        }
        Ok(())
    }

    /// Removes a name (or, given a digest, every name of that image). Refused while the
    /// image is in use and this is its last name. Then collects garbage.
    pub fn delete(&self, what: &str) -> Result<GcReport, ImageError> {
        {
            let _g = self.guard();
            let Some((m, refs)) = self.resolve(what)? else {
                return Err(ImageError::NotFound(what.to_string()));
            };
            let hex = parse_digest(&m.digest)?;
            let removing: Vec<ImageRef> = match parse_digest(what) {
                Ok(_) => refs.clone(),
                Err(_) => vec![ImageRef::parse(what)?],
            };
            let users = self.leases(&hex);
            if removing.len() >= refs.len() && !users.is_empty() {
                return Err(ImageError::InUse {
                    image: what.to_string(),
                    users,
                });
            }
            for r in &removing {
                let p = self.ref_path(r);
                fs::remove_file(&p).map_err(io_err(&p))?;
                let _ = fs::remove_dir(p.parent().unwrap_or(&p));
            }
        }
        self.gc()
    }

    /// Removes manifests nothing names or uses, blobs no manifest holds, and partial
    /// files older than a day.
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _g = self.guard();
        let mut report = GcReport::default();
        let mut keep: BTreeSet<String> = self.all_refs().into_iter().map(|(_, d)| d).collect();
        if let Ok(l) = fs::read_dir(self.root.join("leases")) {
            keep.extend(
                l.flatten()
                    .filter(|d| fs::read_dir(d.path()).map(|mut i| i.next().is_some()).unwrap_or(false))
                    .map(|d| d.file_name().to_string_lossy().into_owned()),
            );
        }
        let mut live_blobs = BTreeSet::new();
        let images = self.root.join("images");
        for e in fs::read_dir(&images).map_err(io_err(&images))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(hex) = name.strip_suffix(".json") else {
                continue;
            };
            if keep.contains(hex) {
                if let Some(m) = self.read_manifest(hex)? {
                    live_blobs.extend(m.content.disk.map(|d| d.blob));
                    live_blobs.extend(m.content.boot.kernel_bzimage);
                    live_blobs.extend(m.content.boot.kernel_elf);
                    live_blobs.extend(m.content.boot.initramfs);
                }
            } else {
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                report.images.push(format!("sha256:{hex}"));
            }
        }
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, since| since.elapsed() < HOLD_FOR);
        let blobs = self.root.join("blobs/sha256");
        for e in fs::read_dir(&blobs).map_err(io_err(&blobs))?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // Held blobs are checked, and the rest removed, under the lock `hold` takes
            // before a blob is put in place: one put there meanwhile is never removed.
            let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            if !live_blobs.contains(&name) && !held.contains_key(&name) {
                let md = e.metadata().map_err(io_err(&e.path()))?;
                report.freed_bytes += std::os::unix::fs::MetadataExt::blocks(&md) * 512;
                fs::remove_file(e.path()).map_err(io_err(&e.path()))?;
                report.blobs += 1;
            }
        }
        let tmp = self.tmp_dir();
        for e in fs::read_dir(&tmp).map_err(io_err(&tmp))?.flatten() {
            let old = e
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .is_some_and(|age| age > STALE_TMP);
            if old {
                let _ = fs::remove_file(e.path());
            }
        }
        Ok(report)
    }
}

/// What a garbage collection removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GcReport {
    pub images: Vec<String>,
    pub blobs: u64,
    pub freed_bytes: u64,
}

/// Writes a file by temporary name and rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ImageError> {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    let r = fs::write(&tmp, bytes).and_then(|_| fs::rename(&tmp, path));
    if r.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    r.map_err(io_err(path))
}

const CHUNK: usize = 1 << 20;

/// Copies `src` to the new file `dst`, returning the SHA-256 (hex) of the bytes.
/// Holes in `src` (found with SEEK_DATA/SEEK_HOLE) are hashed as zeros without being
/// read, and zero chunks are not written, so they stay holes.
pub fn copy_hashing(src: &Path, dst: &Path, progress: &dyn Fn(u64)) -> Result<String, ImageError> {
    let from = File::open(src).map_err(io_err(src))?;
    let len = from.metadata().map_err(io_err(src))?.len();
    let to = File::create(dst).map_err(io_err(dst))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let mut off = 0u64;
    while off < len {
        let (data_start, data_end) = next_data(&from, off, len).map_err(io_err(src))?;
        // The hole before the data: zeros, hashed without reading.
        while off < data_start {
            let n = (data_start - off).min(CHUNK as u64) as usize;
            hasher.update(&zeros[..n]);
            off += n as u64;
            progress(off);
        }
        while off < data_end {
            let n = (data_end - off).min(CHUNK as u64) as usize;
            from.read_exact_at(&mut buf[..n], off).map_err(io_err(src))?;
            hasher.update(&buf[..n]);
            if buf[..n].iter().any(|&b| b != 0) {
                to.write_all_at(&buf[..n], off).map_err(io_err(dst))?;
            }
            off += n as u64;
            progress(off);
        }
    }
    to.set_len(len).map_err(io_err(dst))?;
    Ok(hex(&hasher.finalize()))
}

/// The next range of data at or after `off`: (start, end). Where the file system
/// cannot say, everything is data.
fn next_data(f: &File, off: u64, len: u64) -> io::Result<(u64, u64)> {
    use std::os::fd::AsRawFd;
    let fd = f.as_raw_fd();
    // SAFETY: lseek on a file descriptor this function borrows; no memory is involved.
    let start = unsafe { libc::lseek(fd, off as libc::off_t, libc::SEEK_DATA) };
    if start < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data after `off`: the rest is a hole.
            Some(libc::ENXIO) => Ok((len, len)),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok((off, len)),
            _ => Err(e),
        };
    }
    // SAFETY: as above.
    let end = unsafe { libc::lseek(fd, start, libc::SEEK_HOLE) };
    if end < 0 {
        return Ok((start as u64, len));
    }
    Ok((start as u64, (end as u64).min(len)))
}

/// SHA-256 (hex) of a file.
pub fn hash_file(path: &Path, progress: &dyn Fn(u64)) -> Result<String, ImageError> {
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    hash_into(&mut f, &mut hasher, progress).map_err(io_err(path))?;
    Ok(hex(&hasher.finalize()))
}

/// Feeds the rest of `f` into `hasher`; returns how many bytes that was.
pub fn hash_into(f: &mut File, hasher: &mut Sha256, progress: &dyn Fn(u64)) -> io::Result<u64> {
    // SAFETY: advice on a descriptor the caller holds open; failure only loses read-ahead.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(f), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
    let mut buf = vec![0u8; 4 * CHUNK];
    let mut off = 0u64;
    loop {
        let n = read_full(f, &mut buf)?;
        if n == 0 {
            return Ok(off);
        }
        hasher.update(&buf[..n]);
        off += n as u64;
        progress(off);
    }
}

fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..]) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boot_only(store: &Store, kernel: &[u8]) -> Manifest {
        let dir = tempfile::tempdir().expect("tmp");
        let k = dir.path().join("k");
        fs::write(&k, kernel).expect("write");
        let hex = store.import_file(&k, &|_| {}).expect("import");
        let content = ManifestContent {
            disk: None,
            boot: ManifestBoot {
                kernel_bzimage: Some(hex),
                cmdline: "console=ttyS0".into(),
                ..Default::default()
            },
        };
        Manifest {
            digest: content.digest(),
            content,
            source: "test".into(),
            metadata: serde_json::Value::Null,
            imported_at_ms: 0,
        }
    }

    #[test]
    fn refs_leases_and_garbage_collection() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        let m = boot_only(&store, b"kernel one");
        let r = ImageRef::parse("tiny").expect("ref");
        let r12 = ImageRef::parse("tiny:12").expect("ref");
        store.commit(&m, &[r.clone(), r12.clone()]).expect("commit");
        let (found, refs) = store.resolve("tiny").expect("resolve").expect("found");
        assert_eq!(found.digest, m.digest);
        assert_eq!(refs, vec![r12.clone(), r.clone()], "sorted by name and tag");
        assert!(store.resolve(&m.digest).expect("by digest").is_some());
        assert_eq!(store.list().expect("list").len(), 2, "one entry per name");

        // In use: the last name cannot go; another name can.
        store.lease("tiny", "vm-1").expect("lease");
        store.delete("tiny:12").expect("one of two names");
        assert!(matches!(store.delete("tiny"), Err(ImageError::InUse { .. })));
        assert!(
            store.resolve("tiny").expect("resolve").is_some(),
            "refused delete changes nothing"
        );
        store.release("vm-1").expect("release");
        let report = store.delete("tiny").expect("delete");
        assert_eq!(report.images, vec![m.digest.clone()]);
        assert_eq!(report.blobs, 1);
        assert!(store.resolve(&m.digest).expect("resolve").is_none());
        assert_eq!(fs::read_dir(dir.path().join("blobs/sha256")).expect("dir").count(), 0);
        assert!(matches!(store.delete("tiny"), Err(ImageError::NotFound(_))));
    }

    #[test]
    fn same_bytes_are_stored_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = Store::open(dir.path()).expect("open");
        let a = boot_only(&store, b"same kernel");
        let b = boot_only(&store, b"same kernel");
        assert_eq!(a.digest, b.digest);
        assert_eq!(fs::read_dir(dir.path().join("blobs/sha256")).expect("dir").count(), 1);
        assert_eq!(fs::read_dir(dir.path().join("tmp")).expect("dir").count(), 0);
    }

    #[test]
    fn copies_keep_holes_and_hash_every_byte() {
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src");
        let f = File::create(&src).expect("create");
        f.set_len(64 << 20).expect("len");
        f.write_all_at(b"data", 32 << 20).expect("write");
        let dst = dir.path().join("dst");
        let hex = copy_hashing(&src, &dst, &|_| {}).expect("copy");
        assert_eq!(hex, hash_file(&src, &|_| {}).expect("hash"));
        let md = fs::metadata(&dst).expect("md");
        assert_eq!(md.len(), 64 << 20);
        assert!(
            std::os::unix::fs::MetadataExt::blocks(&md) * 512 <= 2 << 20,
            "zero chunks stay holes"
        );
    }

    #[test]
    fn refs_and_digests_parse() {
        assert!(ImageRef::parse("../x").is_err());
        assert!(ImageRef::parse("a/b").is_err());
        assert!(ImageRef::parse("debian:").is_err());
        assert_eq!(ImageRef::parse("debian:12").expect("ok").tag, "12");
        assert!(parse_digest("sha256:abc").is_err());
        assert!(parse_digest(&"a".repeat(64)).is_ok());
    }
}
