//! Downloads: HTTP(S) with reqwest, hashed as the bytes arrive, written sparse, and
//! resumed with a `Range` request when the connection breaks (the validator, ETag or
//! Last-Modified, is kept next to the partial file so a changed file is not spliced).

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, LAST_MODIFIED, RANGE};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};

use crate::store::{hex, Sha256};
use crate::ImageError;

/// How many times a broken download is resumed before the import fails.
pub const ATTEMPTS: u32 = 5;

/// Progress of one import, read by status requests while the work runs.
#[derive(Debug)]
pub struct Progress {
    pub done: AtomicU64,
    /// 0 while unknown.
    pub total: AtomicU64,
    phase: Mutex<(String, Instant, u64)>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            done: AtomicU64::new(0),
            total: AtomicU64::new(0),
            phase: Mutex::new(("queued".into(), Instant::now(), 0)),
        }
    }
}

impl Progress {
    /// Starts a phase (`downloading`, `converting`, …) over `total` bytes.
    pub fn phase(&self, name: &str, total: u64) {
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = (name.to_string(), Instant::now(), 0);
    }

    /// Marks where a resumed phase starts, so the rate counts only new bytes.
    pub fn resume_from(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        p.1 = Instant::now();
        p.2 = done;
    }

    pub fn set(&self, done: u64) {
        self.done.store(done, Ordering::Relaxed);
    }

    /// (phase, done, total, bytes per second, seconds left).
    pub fn snapshot(&self) -> (String, u64, Option<u64>, f64, Option<f64>) {
        let (name, started, base) = self.phase.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let done = self.done.load(Ordering::Relaxed);
        let total = Some(self.total.load(Ordering::Relaxed)).filter(|t| *t > 0);
        let secs = started.elapsed().as_secs_f64();
        let rate = done.saturating_sub(base) as f64 / secs.max(0.001);
        let eta = total
            .filter(|_| rate > 0.0)
            .map(|t| t.saturating_sub(done) as f64 / rate);
        (name, done, total, rate, eta)
    }
}

/// What was learnt about the remote file, kept beside the partial download.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PartInfo {
    url: String,
    validator: Option<String>,
}

enum Failure {
    /// Worth resuming.
    Retry(String),
    Fatal(ImageError),
}

/// A download into `part` (kept across attempts and restarts until it completes).
pub struct Download<'a> {
    pub client: &'a reqwest::Client,
    pub url: &'a str,
    pub part: PathBuf,
    pub progress: &'a Progress,
}

impl Download<'_> {
    fn info_path(&self) -> PathBuf {
        self.part.with_extension("part.json")
    }

    /// Removes the partial file and its info.
    pub fn discard(&self) {
        let _ = fs::remove_file(&self.part);
        let _ = fs::remove_file(self.info_path());
    }

    /// Downloads the whole file and returns the SHA-256 (hex) of its bytes.
    pub async fn run(&self) -> Result<String, ImageError> {
        let mut info: PartInfo = fs::read(self.info_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .filter(|i: &PartInfo| i.url == self.url)
            .unwrap_or_else(|| PartInfo {
                url: self.url.to_string(),
                validator: None,
            });
        // A partial file from an earlier run: hash what is there, then go on from it.
        let mut hasher = Sha256::new();
        let mut have = 0u64;
        if info.validator.is_some() {
            if let Ok(mut f) = File::open(&self.part) {
                have = crate::store::hash_into(&mut f, &mut hasher, &|_| {})
                    .map_err(|e| ImageError::Io(self.part.clone(), e))?;
            }
        }
        if have == 0 {
            info.validator = None;
            let _ = fs::remove_file(&self.part);
        }
        self.progress.phase("downloading", 0);
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.attempt(&mut info, &mut hasher, &mut have).await {
                Ok(()) => return Ok(hex(&hasher.finalize())),
                Err(Failure::Fatal(e)) => {
                    self.discard();
                    return Err(e);
                }
                Err(Failure::Retry(why)) if attempt < ATTEMPTS => {
                    let wait = Duration::from_millis(250 << attempt.min(5));
                    tracing::warn!(
                        url = self.url,
                        have,
                        attempt,
                        "download interrupted ({why}); resuming in {wait:?}"
                    );
                    tokio::time::sleep(wait).await;
                }
                Err(Failure::Retry(why)) => {
                    // Kept for a later import of the same URL to resume.
                    return Err(ImageError::Source(format!(
                        "downloading {} failed after {ATTEMPTS} attempts: {why}; {have} bytes are kept and the next import resumes from there",
                        self.url
                    )));
                }
            }
        }
    }

    async fn attempt(&self, info: &mut PartInfo, hasher: &mut Sha256, have: &mut u64) -> Result<(), Failure> {
        let mut req = self.client.get(self.url);
        if *have > 0 {
            req = req.header(RANGE, format!("bytes={have}-"));
            if let Some(v) = &info.validator {
                req = req.header(IF_RANGE, v);
            }
        }
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                Failure::Fatal(ImageError::Unreachable(format!(
                    "cannot reach {}: {}",
                    self.url,
                    error_chain(&e)
                )))
            } else {
                Failure::Retry(error_chain(&e))
            }
        })?;
        let status = resp.status();
        let restart = match status {
            StatusCode::PARTIAL_CONTENT if *have > 0 => {
                let starts_at = resp
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|s| s.strip_prefix("bytes "))
                    .and_then(|s| s.split('-').next())
                    .and_then(|s| s.parse::<u64>().ok());
                if starts_at != Some(*have) {
                    return Err(Failure::Retry(format!(
                        "the server resumed at {starts_at:?}, not at byte {have}"
                    )));
                }
                false
            }
            StatusCode::OK => true,
            s if s.is_server_error() => {
                return Err(Failure::Retry(format!("{} answered {s}", self.url)));
            }
            s => {
                return Err(Failure::Fatal(ImageError::Source(format!("{} answered {s}", self.url))));
            }
        };
        if restart {
            // A full answer: from the start (first attempt, or the file changed, or
            // the server cannot do ranges).
            *hasher = Sha256::new();
            *have = 0;
            info.validator = resp
                .headers()
                .get(ETAG)
                .or_else(|| resp.headers().get(LAST_MODIFIED))
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let bytes = serde_json::to_vec(info).unwrap_or_default();
            fs::write(self.info_path(), bytes).map_err(|e| Failure::Fatal(ImageError::Io(self.info_path(), e)))?;
        }
        let total = resp.content_length().map(|l| l + *have);
        self.progress.total.store(total.unwrap_or(0), Ordering::Relaxed);
        self.progress.resume_from(*have);
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(restart)
            .open(&self.part)
            .map_err(|e| Failure::Fatal(ImageError::Io(self.part.clone(), e)))?;
        let io = |e: std::io::Error| Failure::Fatal(ImageError::Io(self.part.clone(), e));
        let mut stream = resp.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| Failure::Retry(error_chain(&e)))?;
            hasher.update(&chunk);
            if chunk.iter().any(|&b| b != 0) {
                file.write_all_at(&chunk, *have).map_err(io)?;
            } else {
                // Zeros stay a hole; the length still says how much arrived.
                file.set_len(*have + chunk.len() as u64).map_err(io)?;
            }
            *have += chunk.len() as u64;
            self.progress.set(*have);
        }
        if let Some(t) = total {
            if *have != t {
                return Err(Failure::Retry(format!("the connection closed at byte {have} of {t}")));
            }
        }
        file.sync_all().map_err(io)?;
        let _ = fs::remove_file(self.info_path());
        Ok(())
    }
}

/// An error and its causes on one line (reqwest's top-level message says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The partial-download path for a URL (and an expected digest) in `tmp`.
pub fn part_path(tmp: &Path, key: &str) -> PathBuf {
    tmp.join(format!("download-{}.part", &hex(&Sha256::digest(key.as_bytes()))[..24]))
}
