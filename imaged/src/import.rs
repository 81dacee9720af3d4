//! Imports: a local file or recipe folder, or an HTTP(S) URL, into the store.
//!
//! An import is a job with progress (bytes, rate, ETA) that callers poll. Imports of
//! the same source (and expected checksum) while one runs join it: one download, every
//! name they asked for. Nothing reaches the store before the bytes are verified; a
//! failed import leaves nothing but, for a broken download, the partial file the next
//! import of the same URL resumes from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use socket_http::{ApiError, ErrorBody};
use tokio::sync::watch;

use crate::fetch::{part_path, Download, Progress};
use crate::format::{self, SourceFormat};
use crate::store::{self, parse_digest, ImageRef, Manifest, ManifestBoot, ManifestContent, ManifestDisk, Store};
use crate::{bootkit, qcow2};
use crate::{ImageError, ImageInfo};

/// The body of `POST /imports`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportRequest {
    /// `name` or `name:tag`.
    pub name: String,
    /// An HTTP(S) URL of a disk image (raw or qcow2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// An absolute path on this host: a disk image, or a folder a recipe in
    /// `guest-images/` built (disk.raw, vmlinuz, vmlinux, initrd.img, cmdline, image.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
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

/// Where an import is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImportState {
    Running,
    Succeeded,
    Failed,
}

/// What `GET /imports/{id}` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImportStatus {
    pub id: String,
    pub names: Vec<String>,
    pub source: String,
    pub state: ImportState,
    /// `downloading`, `hashing`, `copying`, `converting`, `done`.
    pub phase: String,
    pub bytes_done: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_total: Option<u64>,
    pub rate_bytes_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    /// The HTTP status that error stands for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    /// How many import requests this job serves (more than one when coalesced).
    pub requests: u32,
}

struct Job {
    id: String,
    key: String,
    source: String,
    names: Mutex<Vec<ImageRef>>,
    requests: Mutex<u32>,
    progress: Progress,
    /// Set once when the job finishes.
    outcome: Mutex<Option<Result<ImageInfo, ApiError>>>,
    finished_at: Mutex<Option<std::time::Instant>>,
    done: watch::Sender<bool>,
}

impl Job {
    fn status(&self) -> ImportStatus {
        let (phase, done, total, rate, eta) = self.progress.snapshot();
        let outcome = self.outcome.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (state, image, error, error_status) = match outcome {
            None => (ImportState::Running, None, None, None),
            Some(Ok(img)) => (ImportState::Succeeded, Some(img), None, None),
            Some(Err(e)) => (ImportState::Failed, None, Some(e.body), Some(e.status.as_u16())),
        };
        ImportStatus {
            id: self.id.clone(),
            names: lock(&self.names).iter().map(|r| r.to_string()).collect(),
            source: self.source.clone(),
            state,
            phase: if state == ImportState::Running {
                phase
            } else {
                "done".into()
            },
            bytes_done: done,
            bytes_total: total,
            rate_bytes_per_second: rate,
            eta_seconds: if state == ImportState::Running { eta } else { None },
            image,
            error,
            error_status,
            requests: *lock(&self.requests),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Finished jobs are kept this long for callers to read their outcome.
const KEEP_FINISHED: Duration = Duration::from_secs(3600);

/// Runs imports.
pub struct Importer {
    store: Arc<Store>,
    http: reqwest::Client,
    jobs: Mutex<HashMap<String, Arc<Job>>>,
    running: Mutex<HashMap<String, Arc<Job>>>,
}

impl std::fmt::Debug for Importer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Importer")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// A validated source.
#[derive(Debug, Clone)]
enum Source {
    Url(String),
    File(PathBuf),
    Recipe(PathBuf),
}

fn parse_location(s: &str, what: &str) -> Result<Source, ImageError> {
    if s.starts_with("http://") || s.starts_with("https://") {
        let u =
            reqwest::Url::parse(s).map_err(|e| ImageError::Invalid(format!("{what} {s:?} is not a valid URL: {e}")))?;
        if u.host_str().is_none() {
            return Err(ImageError::Invalid(format!("{what} {s:?} has no host")));
        }
        return Ok(Source::Url(u.to_string()));
    }
    if s.contains("://") {
        return Err(ImageError::Invalid(format!(
            "{what} {s:?}: only http:// and https:// URLs and absolute paths are supported"
        )));
    }
    let p = PathBuf::from(s);
    if !p.is_absolute() {
        return Err(ImageError::Invalid(format!("{what} path {s:?} must be absolute")));
    }
    match std::fs::metadata(&p) {
        Ok(m) if m.is_dir() => Ok(Source::Recipe(p)),
        Ok(m) if m.is_file() => Ok(Source::File(p)),
        Ok(_) => Err(ImageError::Invalid(format!(
            "{what} {s:?} is neither a file nor a folder"
        ))),
        Err(_) => Err(ImageError::SourceMissing(format!(
            "{what} {s:?} does not exist on this host"
        ))),
    }
}

impl Importer {
    pub fn new(store: Arc<Store>) -> Importer {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("hearth-imaged/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Importer {
            store,
            http,
            jobs: Mutex::new(HashMap::new()),
            running: Mutex::new(HashMap::new()),
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// Checks a request and starts (or joins) its job.
    pub fn start(self: &Arc<Self>, req: ImportRequest) -> Result<ImportStatus, ImageError> {
        let name = ImageRef::parse(&req.name)?;
        let source = match (&req.url, &req.path) {
            (Some(u), None) => match parse_location(u, "url")? {
                s @ Source::Url(_) => s,
                _ => return Err(ImageError::Invalid(format!("url {u:?} is not an http(s) URL"))),
            },
            (None, Some(p)) => parse_location(&p.to_string_lossy(), "path")?,
            _ => return Err(ImageError::Invalid("give exactly one of url and path".into())),
        };
        let expected = req.sha256.as_deref().map(parse_digest).transpose()?;
        let format = req.format.as_deref().map(str::parse::<SourceFormat>).transpose()?;
        let kernel = req.kernel.as_deref().map(|k| parse_location(k, "kernel")).transpose()?;
        let initramfs = req
            .initramfs
            .as_deref()
            .map(|k| parse_location(k, "initramfs"))
            .transpose()?;
        for s in [&kernel, &initramfs].into_iter().flatten() {
            if matches!(s, Source::Recipe(_)) {
                return Err(ImageError::Invalid("kernel and initramfs must be files or URLs".into()));
            }
        }
        if let Some(c) = &req.cmdline {
            if c.len() > 2048 || c.chars().any(|c| c.is_control()) {
                return Err(ImageError::Invalid(
                    "cmdline must be at most 2048 printable characters".into(),
                ));
            }
        }
        if matches!(source, Source::Recipe(_))
            && (req.kernel.is_some() || req.initramfs.is_some() || req.sha256.is_some() || format.is_some())
        {
            return Err(ImageError::Invalid(
                "a recipe folder brings its own kernel, initramfs and disk: give only name and path".into(),
            ));
        }
        let source_text = match &source {
            Source::Url(u) => u.clone(),
            Source::File(p) | Source::Recipe(p) => p.display().to_string(),
        };
        let key = format!(
            "{source_text}|{}|{:?}|{:?}|{:?}|{:?}",
            expected.as_deref().unwrap_or(""),
            format,
            req.kernel,
            req.initramfs,
            req.cmdline
        );
        let mut running = lock(&self.running);
        if let Some(job) = running.get(&key) {
            let mut names = lock(&job.names);
            if !names.contains(&name) {
                names.push(name);
            }
            drop(names);
            *lock(&job.requests) += 1;
            return Ok(job.status());
        }
        let job = Arc::new(Job {
            id: uuid::Uuid::new_v4().to_string(),
            key: key.clone(),
            source: source_text,
            names: Mutex::new(vec![name]),
            requests: Mutex::new(1),
            progress: Progress::default(),
            outcome: Mutex::new(None),
            finished_at: Mutex::new(None),
            done: watch::channel(false).0,
        });
        running.insert(key, job.clone());
        drop(running);
        self.prune();
        lock(&self.jobs).insert(job.id.clone(), job.clone());
        let this = self.clone();
        let plan = Plan {
            source,
            expected,
            format,
            kernel,
            initramfs,
            cmdline: req.cmdline,
        };
        let status = job.status();
        tokio::spawn(async move {
            let result = this.run(&job, plan).await;
            let outcome = result.map_err(ApiError::from);
            if let Err(e) = &outcome {
                tracing::warn!(import = %job.id, source = %job.source, "import failed: {}", e.body.message);
            }
            *lock(&job.outcome) = Some(outcome);
            *lock(&job.finished_at) = Some(std::time::Instant::now());
            lock(&this.running).remove(&job.key);
            job.done.send_replace(true);
        });
        Ok(status)
    }

    fn prune(&self) {
        lock(&self.jobs).retain(|_, j| lock(&j.finished_at).is_none_or(|t| t.elapsed() < KEEP_FINISHED));
    }

    /// The job's status, once it has finished or after `wait`.
    pub async fn status(&self, id: &str, wait: Duration) -> Result<ImportStatus, ImageError> {
        let job = lock(&self.jobs)
            .get(id)
            .cloned()
            .ok_or_else(|| ImageError::NotFound(format!("import {id}")))?;
        let mut rx = job.done.subscribe();
        let _ = tokio::time::timeout(wait, rx.wait_for(|d| *d)).await;
        Ok(job.status())
    }

    pub fn list(&self) -> Vec<ImportStatus> {
        lock(&self.jobs).values().map(|j| j.status()).collect()
    }

    /// Imports and waits: for callers inside imaged (recipes found in the catalog).
    pub async fn import_and_wait(self: &Arc<Self>, req: ImportRequest) -> Result<ImageInfo, ApiError> {
        let st = self.start(req)?;
        let job = lock(&self.jobs)
            .get(&st.id)
            .cloned()
            .ok_or_else(|| ApiError::internal("the import vanished"))?;
        let mut rx = job.done.subscribe();
        let _ = rx.wait_for(|d| *d).await;
        let outcome = lock(&job.outcome).clone();
        outcome.unwrap_or_else(|| Err(ApiError::internal("import finished without an outcome")))
    }

    async fn run(&self, job: &Arc<Job>, plan: Plan) -> Result<ImageInfo, ImageError> {
        let (content, metadata) = match &plan.source {
            Source::Recipe(dir) => self.recipe(job, dir).await?,
            _ => {
                let disk = self.disk(job, &plan).await?;
                let boot = if plan.kernel.is_none() && plan.initramfs.is_none() {
                    self.boot_kit_from_disk(job, &disk).await
                } else {
                    None
                };
                let boot = match boot {
                    Some(mut boot) => {
                        if let Some(c) = &plan.cmdline {
                            boot.cmdline = c.clone();
                        }
                        boot
                    }
                    None => self.boot_kit(job, &plan).await?,
                };
                (ManifestContent { disk: Some(disk), boot }, serde_json::Value::Null)
            }
        };
        let manifest = Manifest {
            digest: content.digest(),
            content,
            source: job.source.clone(),
            metadata,
            imported_at_ms: now_ms(),
        };
        let names = lock(&job.names).clone();
        let store = self.store.clone();
        let m = manifest.clone();
        blocking(move || {
            store.commit(&m, &names)?;
            // An image a name pointed at before may now be unreferenced.
            store.gc().map(|_| ())
        })
        .await?;
        let names = lock(&job.names).clone();
        let (m, refs) = self
            .store
            .resolve(&manifest.digest)?
            .ok_or_else(|| ImageError::Corrupt("the image vanished after commit".into()))?;
        Ok(self.store.info(&m, &refs, names.first()))
    }

    /// The boot kit the import names (kernel and initramfs from paths or URLs).
    async fn boot_kit(&self, job: &Job, plan: &Plan) -> Result<ManifestBoot, ImageError> {
        let kernel = match &plan.kernel {
            Some(k) => Some(self.small_blob(job, k, "kernel").await?),
            None => None,
        };
        let initramfs = match &plan.initramfs {
            Some(k) => Some(self.small_blob(job, k, "initramfs").await?),
            None => None,
        };
        // A bzImage starts its setup header with "HdrS" at 0x202; a PVH ELF with 0x7f ELF.
        let (bz, elf) = match kernel {
            Some((hex, is_elf)) if is_elf => (None, Some(hex)),
            Some((hex, _)) => (Some(hex), None),
            None => (None, None),
        };
        Ok(ManifestBoot {
            kernel_bzimage: bz,
            kernel_elf: elf,
            initramfs: initramfs.map(|(h, _)| h),
            cmdline: plan
                .cmdline
                .clone()
                .unwrap_or_else(|| "console=ttyS0 root=/dev/vda rw".into()),
        })
    }

    /// The kernel, initramfs and command line installed in the image's own disk (see
    /// [`bootkit`]), stored as blobs. `None` when there is none or it cannot be read:
    /// the image is still imported, and booting it needs a kernel given at import.
    async fn boot_kit_from_disk(&self, job: &Arc<Job>, disk: &ManifestDisk) -> Option<ManifestBoot> {
        job.progress.phase("finding the kernel", 0);
        let store = self.store.clone();
        let path = store.blob_path(&disk.blob);
        let found = blocking(move || {
            let Some(found) = bootkit::find(&path)? else {
                return Ok(None);
            };
            let elf = match &found.vmlinux {
                Ok(v) => Some(store.put_blob(v)?),
                Err(why) => {
                    tracing::info!("no kernel for Cloud Hypervisor from {}: {why}", found.source);
                    None
                }
            };
            let boot = ManifestBoot {
                kernel_bzimage: Some(store.put_blob(&found.kernel)?),
                kernel_elf: elf,
                initramfs: found.initramfs.as_deref().map(|b| store.put_blob(b)).transpose()?,
                cmdline: found.cmdline.clone(),
            };
            tracing::info!(cmdline = %boot.cmdline, "boot kit found in the disk at {}", found.source);
            Ok(Some(boot))
        })
        .await;
        found.unwrap_or_else(|e| {
            tracing::warn!("could not look for a kernel in the image's disk: {e}");
            None
        })
    }

    /// The disk of a URL or file import, stored raw. Returns its manifest entry.
    async fn disk(&self, job: &Arc<Job>, plan: &Plan) -> Result<ManifestDisk, ImageError> {
        match &plan.source {
            Source::Url(url) => {
                let dl = Download {
                    client: &self.http,
                    url,
                    part: part_path(&self.store.tmp_dir(), &job.key),
                    progress: &job.progress,
                };
                let hex = dl.run().await?;
                let result = async {
                    check_expected(plan.expected.as_deref(), &hex)?;
                    self.store_disk(job, &dl.part, &hex, plan.format).await
                }
                .await;
                dl.discard();
                result
            }
            Source::File(path) => {
                let fmt = detect_with(path, plan.format)?;
                let len = std::fs::metadata(path)
                    .map_err(|e| ImageError::Io(path.clone(), e))?
                    .len();
                match fmt {
                    SourceFormat::Raw => {
                        job.progress.phase("copying", len);
                        let tmp = self.store.tmp_path("disk");
                        let (src, dst) = (path.clone(), tmp.clone());
                        let hex = with_progress(job, move |p| store::copy_hashing(&src, &dst, &|n| p.set(n))).await;
                        let r = match hex {
                            Ok(hex) => check_expected(plan.expected.as_deref(), &hex).map(|_| hex),
                            Err(e) => Err(e),
                        };
                        let r = r.and_then(|hex| {
                            let virtual_size = len;
                            self.store.adopt_blob(&tmp, &hex).map(|_| ManifestDisk {
                                blob: hex,
                                virtual_size,
                                source_format: SourceFormat::Raw,
                            })
                        });
                        if r.is_err() {
                            let _ = std::fs::remove_file(&tmp);
                        }
                        r
                    }
                    SourceFormat::Qcow2 => {
                        job.progress.phase("converting", len);
                        let (tmp, virtual_size, hex) = self.convert(job, path, true).await?;
                        let r = async {
                            let hex = hex.ok_or_else(|| ImageError::Corrupt("the conversion gave no digest".into()))?;
                            check_expected(plan.expected.as_deref(), &hex)?;
                            let (store, t, h) = (self.store.clone(), tmp.clone(), hex.clone());
                            blocking(move || store.adopt_blob(&t, &h)).await?;
                            Ok(ManifestDisk {
                                blob: hex,
                                virtual_size,
                                source_format: SourceFormat::Qcow2,
                            })
                        }
                        .await;
                        if r.is_err() {
                            let _ = std::fs::remove_file(&tmp);
                        }
                        r
                    }
                }
            }
            Source::Recipe(_) => Err(ImageError::Invalid("a recipe is not a disk".into())),
        }
    }

    /// Stores a downloaded disk (`part`, whose bytes hash to `hex`) as raw.
    async fn store_disk(
        &self,
        job: &Arc<Job>,
        part: &Path,
        hex: &str,
        forced: Option<SourceFormat>,
    ) -> Result<ManifestDisk, ImageError> {
        let fmt = detect_with(part, forced)?;
        let len = std::fs::metadata(part)
            .map_err(|e| ImageError::Io(part.to_path_buf(), e))?
            .len();
        match fmt {
            SourceFormat::Raw => {
                // Written sparse as it arrived: the partial file becomes the blob.
                self.store.adopt_blob(part, hex)?;
                Ok(ManifestDisk {
                    blob: hex.to_string(),
                    virtual_size: len,
                    source_format: SourceFormat::Raw,
                })
            }
            SourceFormat::Qcow2 => {
                job.progress.phase("converting", len);
                let (tmp, virtual_size, _) = self.convert(job, part, false).await?;
                if let Err(e) = self.store.adopt_blob(&tmp, hex) {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(e);
                }
                Ok(ManifestDisk {
                    blob: hex.to_string(),
                    virtual_size,
                    source_format: SourceFormat::Qcow2,
                })
            }
        }
    }

    /// qcow2 → a raw temporary file. Returns it, the virtual size and, when `hash` is
    /// set, the digest of the qcow2 file. hearth's own reader does it in one pass
    /// (`qcow2::to_raw`); images it leaves to qemu-img are hashed beside the conversion.
    async fn convert(
        &self,
        job: &Arc<Job>,
        src: &Path,
        hash: bool,
    ) -> Result<(PathBuf, u64, Option<String>), ImageError> {
        let tmp = self.store.tmp_path("convert");
        let (from, to) = (src.to_path_buf(), tmp.clone());
        let native = with_progress(job, move |p| qcow2::to_raw(&from, &to, hash, &|n| p.set(n))).await;
        let r = match native {
            Ok(Some((virtual_size, hex))) => Ok((virtual_size, hex)),
            Ok(None) => self.convert_with_qemu_img(job, src, &tmp, hash).await,
            Err(e) => Err(e),
        };
        match r {
            Ok((virtual_size, hex)) => Ok((tmp, virtual_size, hex)),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        }
    }

    async fn convert_with_qemu_img(
        &self,
        job: &Job,
        src: &Path,
        tmp: &Path,
        hash: bool,
    ) -> Result<(u64, Option<String>), ImageError> {
        let from = src.to_path_buf();
        let hashing = hash.then(|| tokio::task::spawn_blocking(move || store::hash_file(&from, &|_| {})));
        let virtual_size = format::qcow2_info(src).await?;
        let progress = &job.progress;
        format::qcow2_to_raw(src, tmp, |p| {
            let total = progress.total.load(std::sync::atomic::Ordering::Relaxed);
            progress.set((p * total as f64) as u64);
        })
        .await?;
        let hex = match hashing {
            Some(t) => Some(t.await.map_err(|e| ImageError::Corrupt(format!("hash task: {e}")))??),
            None => None,
        };
        Ok((virtual_size, hex))
    }

    /// A kernel or initramfs from a path or URL. Returns (digest, is ELF).
    async fn small_blob(&self, job: &Job, src: &Source, what: &str) -> Result<(String, bool), ImageError> {
        let hex = match src {
            Source::Url(url) => {
                let dl = Download {
                    client: &self.http,
                    url,
                    part: part_path(&self.store.tmp_dir(), &format!("{}|{what}|{url}", job.key)),
                    progress: &job.progress,
                };
                let hex = dl.run().await.map_err(|e| e.context(what))?;
                let r = self.store.adopt_blob(&dl.part, &hex);
                dl.discard();
                r?;
                hex
            }
            Source::File(p) => {
                job.progress.phase(&format!("copying the {what}"), 0);
                let store = self.store.clone();
                let p = p.clone();
                blocking(move || store.import_file(&p, &|_| {})).await?
            }
            Source::Recipe(_) => return Err(ImageError::Invalid(format!("{what} must be a file"))),
        };
        let mut head = [0u8; 4];
        let path = self.store.blob_path(&hex);
        let _ = std::fs::File::open(&path).and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut head, 0));
        Ok((hex, head == *b"\x7fELF"))
    }

    /// A folder a recipe in `guest-images/` built.
    async fn recipe(&self, job: &Arc<Job>, dir: &Path) -> Result<(ManifestContent, serde_json::Value), ImageError> {
        let meta_path = dir.join("image.json");
        let metadata: serde_json::Value = std::fs::read(&meta_path)
            .map_err(|_| {
                ImageError::Invalid(format!(
                    "{} has no image.json: it is not a recipe's output",
                    dir.display()
                ))
            })
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| ImageError::Invalid(format!("{}: {e}", meta_path.display())))
            })?;
        let cmdline = std::fs::read_to_string(dir.join("cmdline"))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "console=ttyS0".to_string());
        let files: Vec<(&str, PathBuf)> = ["vmlinuz", "vmlinux", "initrd.img"]
            .into_iter()
            .map(|f| (f, dir.join(f)))
            .filter(|(_, p)| p.is_file())
            .collect();
        if !files.iter().any(|(f, _)| *f != "initrd.img") {
            return Err(ImageError::Invalid(format!(
                "{} has no kernel (vmlinuz or vmlinux)",
                dir.display()
            )));
        }
        let total: u64 = files
            .iter()
            .filter_map(|(_, p)| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        job.progress.phase("copying the boot files", total);
        let mut boot = ManifestBoot {
            cmdline,
            ..Default::default()
        };
        let mut base = 0;
        for (f, p) in files {
            let store = self.store.clone();
            let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
            let hex = with_progress(job, move |prog| store.import_file(&p, &|n| prog.set(base + n))).await?;
            base += len;
            match f {
                "vmlinuz" => boot.kernel_bzimage = Some(hex),
                "vmlinux" => boot.kernel_elf = Some(hex),
                _ => boot.initramfs = Some(hex),
            }
        }
        let disk = ["disk.raw", "disk.qcow2"]
            .into_iter()
            .map(|f| dir.join(f))
            .find(|p| p.is_file());
        let disk = match disk {
            Some(p) => Some(
                self.disk(
                    job,
                    &Plan {
                        source: Source::File(p),
                        expected: None,
                        format: None,
                        kernel: None,
                        initramfs: None,
                        cmdline: None,
                    },
                )
                .await?,
            ),
            None => None,
        };
        Ok((ManifestContent { disk, boot }, metadata))
    }
}

struct Plan {
    source: Source,
    expected: Option<String>,
    format: Option<SourceFormat>,
    kernel: Option<Source>,
    initramfs: Option<Source>,
    cmdline: Option<String>,
}

fn detect_with(path: &Path, forced: Option<SourceFormat>) -> Result<SourceFormat, ImageError> {
    match (format::detect(path), forced) {
        (Ok(f), None) => Ok(f),
        (Ok(f), Some(want)) if f == want => Ok(f),
        (Ok(f), Some(want)) => Err(ImageError::Unsupported(format!("the file is {f}, not {want}"))),
        // A raw disk without a file system yet, when the caller says it is raw.
        (Err(ImageError::NotADisk(_)), Some(SourceFormat::Raw)) => {
            let len = std::fs::metadata(path)
                .map_err(|e| ImageError::Io(path.to_path_buf(), e))?
                .len();
            if len % 512 == 0 && len > 0 {
                Ok(SourceFormat::Raw)
            } else {
                Err(ImageError::NotADisk(format!(
                    "a raw disk is a whole number of 512-byte sectors; this file has {len} bytes"
                )))
            }
        }
        (Err(e), _) => Err(e),
    }
}

fn check_expected(expected: Option<&str>, got: &str) -> Result<(), ImageError> {
    match expected {
        Some(want) if want != got => Err(ImageError::ChecksumMismatch {
            expected: format!("sha256:{want}"),
            got: format!("sha256:{got}"),
        }),
        _ => Ok(()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ImageError::Corrupt(format!("import task failed: {e}")))?
}

/// Runs blocking file work on the blocking pool, reporting to the job's progress.
async fn with_progress<T: Send + 'static>(
    job: &Arc<Job>,
    f: impl FnOnce(&Progress) -> Result<T, ImageError> + Send + 'static,
) -> Result<T, ImageError> {
    let job = job.clone();
    blocking(move || f(&job.progress)).await
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
