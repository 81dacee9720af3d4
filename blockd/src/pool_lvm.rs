//! Volumes as LVM thin volumes in one thin pool of one volume group.
//!
//! Everything goes through the lvm2 commands with argument vectors (never a shell) and
//! their JSON reports (`--reportformat json --units b --nosuffix`, every value a
//! string). Names on the LVM side:
//!
//! ```text
//! hv-<volume>              thin volume, tagged `hearth`
//! hs-<volume>+<snapshot>   thin snapshot of it (read-only, tagged `hearth_snapshot` and
//!                          `hearth_mapped=<bytes>`: the volume's usage when it was taken)
//! clone                    thin snapshot of hs-…, tagged `hearth_origin=<volume>+<snapshot>`
//! ```
//! `+` cannot appear in a hearth name, so the split is unambiguous. blockd creates the
//! thin pool itself when the volume group has none, or validates the one it is given.
//! Thin snapshots and clones share blocks with their origin and cost nothing up front.

use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde::Deserialize;

use crate::device::{BlockDevice, FileDevice, ReadOnly};
use crate::volume::{PoolUsage, Result, Snapshot, Volume, VolumeBackend, VolumeError, VolumeFormat};

const VOLUME_PREFIX: &str = "hv-";
const SNAPSHOT_PREFIX: &str = "hs-";
const ORIGIN_TAG: &str = "hearth_origin=";
/// On a snapshot: the bytes its volume had mapped when it was taken. A read-only thin
/// snapshot's mapping never changes, and lvs has no figure for it while it is inactive
/// (thin snapshots skip activation), which is most of the time.
const MAPPED_TAG: &str = "hearth_mapped=";

/// Runs one lvm2 command: `argv[0]` is the program. Replaced in tests to check the
/// exact command vectors.
pub trait LvmRunner: Send + Sync + std::fmt::Debug {
    fn run(&self, argv: &[String]) -> Result<String>;
}

/// Runs the real lvm2 commands.
#[derive(Debug, Default)]
pub struct SystemLvm;

impl LvmRunner for SystemLvm {
    fn run(&self, argv: &[String]) -> Result<String> {
        let (prog, args) = argv
            .split_first()
            .ok_or_else(|| VolumeError::Backend("empty lvm command".into()))?;
        let out = Command::new(prog)
            .args(args)
            .env("LVM_SUPPRESS_FD_WARNINGS", "1")
            .output()
            .map_err(|e| VolumeError::Backend(format!("cannot run {prog} ({e}); install Debian's lvm2")))?;
        if !out.status.success() {
            return Err(classify_failure(argv, &String::from_utf8_lossy(&out.stderr)));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

/// Turns lvm2's complaints into the error a user can act on.
fn classify_failure(argv: &[String], stderr: &str) -> VolumeError {
    let cmd = argv.join(" ");
    let msg = stderr.trim();
    if msg.contains("Insufficient free space")
        || msg.contains("insufficient free space")
        || msg.contains("exceeds the size of thin pool")
    {
        return VolumeError::NoSpace(format!("{cmd}: {msg}"));
    }
    if msg.contains("already exists") {
        return VolumeError::Conflict(format!("{cmd}: {msg}"));
    }
    if msg.contains("/dev/mapper/control") || msg.contains("device-mapper") || msg.contains("Activation disabled") {
        return VolumeError::Unsupported(format!(
            "{cmd}: {msg} (LVM thin pools need the kernel's device-mapper, which this host lacks)"
        ));
    }
    VolumeError::Backend(format!("{cmd} failed: {msg}"))
}

#[derive(Debug, Deserialize)]
struct Report<T> {
    report: Vec<T>,
}

#[derive(Debug, Deserialize)]
struct LvReport {
    #[serde(default)]
    lv: Vec<LvRow>,
}

#[derive(Debug, Deserialize)]
struct VgReport {
    #[serde(default)]
    vg: Vec<VgRow>,
}

/// One row of `lvs --reportformat json -o lv_name,lv_uuid,lv_attr,lv_size,data_percent,pool_lv,origin,lv_tags,lv_path,chunk_size`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct LvRow {
    pub lv_name: String,
    #[serde(default)]
    pub lv_uuid: String,
    #[serde(default)]
    pub lv_attr: String,
    pub lv_size: String,
    #[serde(default)]
    pub data_percent: String,
    #[serde(default)]
    pub pool_lv: String,
    #[serde(default)]
    pub origin: String,
    #[serde(default)]
    pub lv_tags: String,
    #[serde(default)]
    pub lv_path: String,
    /// The thin pool's allocation unit in bytes ("0" on thin volumes).
    #[serde(default)]
    pub chunk_size: String,
}

impl LvRow {
    fn size(&self) -> Result<u64> {
        parse_bytes(&self.lv_size, &self.lv_name)
    }
    /// Bytes really used: a thin volume's `data_percent` of its size. lvs gives the
    /// percentage with two decimals, so the figure is rounded to the pool's allocation
    /// unit (`chunk` bytes, 0 if unknown): that makes it exact up to 10,000 chunks
    /// (640 MiB with lvm2's default 64 KiB chunks), and within 0.005% of the size above.
    /// An inactive snapshot has no percentage: its `hearth_mapped` tag is used, else
    /// its whole size.
    fn allocated(&self, chunk: u64) -> Result<u64> {
        let size = self.size()?;
        if self.data_percent.is_empty() {
            let mapped = self
                .tags()
                .find_map(|t| t.strip_prefix(MAPPED_TAG)?.parse::<u64>().ok());
            return Ok(mapped.unwrap_or(size).min(size));
        }
        let pct: f64 = self.data_percent.parse().map_err(|_| {
            VolumeError::Backend(format!(
                "lvs gave data_percent {:?} for {}",
                self.data_percent, self.lv_name
            ))
        })?;
        let bytes = size as f64 * pct / 100.0;
        let bytes = if chunk > 0 {
            (bytes / chunk as f64).round() as u64 * chunk
        } else {
            bytes as u64
        };
        Ok(bytes.min(size))
    }
    fn tags(&self) -> impl Iterator<Item = &str> {
        self.lv_tags.split(',').filter(|t| !t.is_empty())
    }
}

/// One row of `vgs --reportformat json -o vg_name,vg_size,vg_free,vg_extent_size`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct VgRow {
    pub vg_name: String,
    pub vg_size: String,
    pub vg_free: String,
    #[serde(default)]
    pub vg_extent_size: String,
}

fn parse_bytes(s: &str, what: &str) -> Result<u64> {
    s.trim().parse::<u64>().map_err(|_| {
        VolumeError::Backend(format!(
            "lvm2 gave size {s:?} for {what}; expected bytes (--units b --nosuffix)"
        ))
    })
}

/// Parses `lvs --reportformat json` output. lvs gives one row per segment with segment
/// fields, so rows are deduplicated by UUID.
pub fn parse_lvs(json: &str) -> Result<Vec<LvRow>> {
    let r: Report<LvReport> =
        serde_json::from_str(json).map_err(|e| VolumeError::Backend(format!("cannot parse lvs output: {e}")))?;
    let mut rows: Vec<LvRow> = Vec::new();
    for row in r.report.into_iter().flat_map(|r| r.lv) {
        if row.lv_uuid.is_empty() || !rows.iter().any(|x| x.lv_uuid == row.lv_uuid) {
            rows.push(row);
        }
    }
    Ok(rows)
}

/// Parses `vgs --reportformat json` output.
pub fn parse_vgs(json: &str) -> Result<Vec<VgRow>> {
    let r: Report<VgReport> =
        serde_json::from_str(json).map_err(|e| VolumeError::Backend(format!("cannot parse vgs output: {e}")))?;
    Ok(r.report.into_iter().flat_map(|r| r.vg).collect())
}

/// Where the LVM backend keeps its volumes.
#[derive(Debug, Clone)]
pub struct LvmConfig {
    pub volume_group: String,
    pub thin_pool: String,
    /// Size of the thin pool blockd creates when it is missing; default: 90% of the
    /// volume group's free space.
    pub pool_size_bytes: Option<u64>,
}

/// A pool of LVM thin volumes.
#[derive(Debug)]
pub struct LvmPool {
    cfg: LvmConfig,
    lvm: Box<dyn LvmRunner>,
    changes: Mutex<()>,
}

fn s(x: &str) -> String {
    x.to_string()
}

impl LvmPool {
    /// Opens the pool: checks the volume group exists and creates the thin pool in it
    /// unless it is there (and is a thin pool).
    pub fn open(cfg: LvmConfig, lvm: Box<dyn LvmRunner>) -> Result<LvmPool> {
        let pool = LvmPool::new(cfg, lvm)?;
        pool.ensure_thin_pool()?;
        Ok(pool)
    }

    /// The pool without checking the volume group or thin pool (`open` does both).
    pub fn new(cfg: LvmConfig, lvm: Box<dyn LvmRunner>) -> Result<LvmPool> {
        for n in [&cfg.volume_group, &cfg.thin_pool] {
            crate::volume::validate_name("LVM", n)?;
        }
        Ok(LvmPool {
            cfg,
            lvm,
            changes: Mutex::new(()),
        })
    }

    /// The volume group's row of a `vgs` report.
    fn vg(&self) -> Result<VgRow> {
        let vgs = parse_vgs(&self.lvm.run(&self.vgs_argv())?)?;
        vgs.into_iter()
            .find(|v| v.vg_name == self.cfg.volume_group)
            .ok_or_else(|| {
                VolumeError::NotFound(format!(
                    "volume group {:?} does not exist; create it with pvcreate and vgcreate",
                    self.cfg.volume_group
                ))
            })
    }

    /// Checks the volume group, and creates the thin pool unless it exists.
    pub fn ensure_thin_pool(&self) -> Result<()> {
        let vg = self.vg()?;
        let rows = self.lvs()?;
        match rows.iter().find(|r| r.lv_name == self.cfg.thin_pool) {
            Some(r) if r.lv_attr.starts_with('t') => Ok(()),
            Some(r) => Err(VolumeError::Conflict(format!(
                "{}/{} exists but is not a thin pool (attributes {:?})",
                self.cfg.volume_group, self.cfg.thin_pool, r.lv_attr
            ))),
            None => {
                let free = parse_bytes(&vg.vg_free, "vg_free")?;
                self.lvm.run(&self.create_pool_argv(free)).map(|_| ())
            }
        }
    }

    fn vg_lv(&self, lv: &str) -> String {
        format!("{}/{}", self.cfg.volume_group, lv)
    }

    /// `vgs`/`lvs` with the JSON report in bytes, the way every report is read here.
    fn report_argv(command: &str, fields: &str) -> Vec<String> {
        [
            command,
            "--reportformat",
            "json",
            "--units",
            "b",
            "--nosuffix",
            "-o",
            fields,
        ]
        .map(s)
        .to_vec()
    }

    pub fn vgs_argv(&self) -> Vec<String> {
        Self::report_argv("vgs", "vg_name,vg_size,vg_free,vg_extent_size")
    }

    pub fn lvs_argv(&self) -> Vec<String> {
        let mut v = Self::report_argv(
            "lvs",
            "lv_name,lv_uuid,lv_attr,lv_size,data_percent,pool_lv,origin,lv_tags,lv_path,chunk_size",
        );
        v.push(self.cfg.volume_group.clone());
        v
    }

    pub fn create_pool_argv(&self, vg_free: u64) -> Vec<String> {
        let mut v = vec![
            s("lvcreate"),
            s("--yes"),
            s("--type"),
            s("thin-pool"),
            s("-n"),
            self.cfg.thin_pool.clone(),
        ];
        match self.cfg.pool_size_bytes {
            Some(b) => v.extend([s("-L"), format!("{b}b")]),
            None if vg_free > 0 => v.extend([s("-l"), s("90%FREE")]),
            None => v.extend([s("-l"), s("100%FREE")]),
        }
        v.push(self.cfg.volume_group.clone());
        v
    }

    pub fn create_argv(&self, name: &str, size_bytes: u64) -> Vec<String> {
        vec![
            s("lvcreate"),
            s("--yes"),
            s("--type"),
            s("thin"),
            s("-V"),
            format!("{size_bytes}b"),
            s("--thinpool"),
            self.cfg.thin_pool.clone(),
            s("-n"),
            format!("{VOLUME_PREFIX}{name}"),
            s("--addtag"),
            s("hearth"),
            self.cfg.volume_group.clone(),
        ]
    }

    /// `mapped`: the volume's allocated bytes, recorded on the snapshot.
    pub fn snapshot_argv(&self, volume: &str, snapshot: &str, mapped: u64) -> Vec<String> {
        vec![
            s("lvcreate"),
            s("--yes"),
            s("-s"),
            s("-n"),
            format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}"),
            s("--addtag"),
            s("hearth_snapshot"),
            s("--addtag"),
            format!("{MAPPED_TAG}{mapped}"),
            s("--permission"),
            s("r"),
            self.vg_lv(&format!("{VOLUME_PREFIX}{volume}")),
        ]
    }

    pub fn clone_argv(&self, volume: &str, snapshot: &str, name: &str) -> Vec<String> {
        let origin = format!("{ORIGIN_TAG}{volume}+{snapshot}");
        self.writable_snapshot_argv(volume, snapshot, &format!("{VOLUME_PREFIX}{name}"), Some(&origin))
    }

    /// A writable thin snapshot `lv` of `volume@snapshot`, tagged as a volume.
    fn writable_snapshot_argv(&self, volume: &str, snapshot: &str, lv: &str, origin: Option<&str>) -> Vec<String> {
        let mut argv = vec![
            s("lvcreate"),
            s("--yes"),
            s("-s"),
            // Thin snapshots skip activation by default; a clone is a volume in use.
            s("--setactivationskip"),
            s("n"),
            s("--permission"),
            s("rw"),
            s("-n"),
            lv.to_string(),
            s("--addtag"),
            s("hearth"),
        ];
        if let Some(tag) = origin {
            argv.extend([s("--addtag"), tag.to_string()]);
        }
        argv.push(self.vg_lv(&format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}")));
        argv
    }

    pub fn resize_argv(&self, name: &str, size_bytes: u64) -> Vec<String> {
        vec![
            s("lvextend"),
            s("-L"),
            format!("{size_bytes}b"),
            self.vg_lv(&format!("{VOLUME_PREFIX}{name}")),
        ]
    }

    /// Rolling `volume` back to `volume@snapshot`: a writable thin snapshot of the
    /// snapshot takes the volume's name and the old volume goes (thin snapshots are
    /// independent of their origin, so the volume's other snapshots stay). Leftovers of
    /// a rollback cut short are removed first.
    pub fn rollback_argvs(&self, volume: &str, snapshot: &str, rows: &[LvRow]) -> Vec<Vec<String>> {
        let lv = format!("{VOLUME_PREFIX}{volume}");
        let (fresh, old) = (format!("{lv}.rollback"), format!("{lv}.replaced"));
        let mut out: Vec<Vec<String>> = [&fresh, &old]
            .into_iter()
            .filter(|n| rows.iter().any(|r| &r.lv_name == *n))
            .map(|n| self.remove_argv(n))
            .collect();
        out.push(self.writable_snapshot_argv(volume, snapshot, &fresh, None));
        out.push(vec![
            s("lvrename"),
            self.cfg.volume_group.clone(),
            lv.clone(),
            old.clone(),
        ]);
        out.push(vec![s("lvrename"), self.cfg.volume_group.clone(), fresh, lv]);
        out.push(self.remove_argv(&old));
        out
    }

    pub fn remove_argv(&self, lv: &str) -> Vec<String> {
        vec![s("lvremove"), s("--yes"), self.vg_lv(lv)]
    }

    pub fn activate_argv(&self, lv: &str) -> Vec<String> {
        vec![s("lvchange"), s("-ay"), s("-K"), self.vg_lv(lv)]
    }

    fn lvs(&self) -> Result<Vec<LvRow>> {
        parse_lvs(&self.lvm.run(&self.lvs_argv())?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.changes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The thin pool's chunk size in bytes from an `lvs` report (0 if it is not there).
    fn chunk_size(&self, rows: &[LvRow]) -> u64 {
        rows.iter()
            .find(|r| r.lv_name == self.cfg.thin_pool)
            .and_then(|r| r.chunk_size.parse().ok())
            .unwrap_or(0)
    }

    fn describe_all(&self, rows: &[LvRow]) -> Result<Vec<Volume>> {
        let chunk = self.chunk_size(rows);
        let origin_of = |r: &LvRow| -> Option<String> {
            r.tags()
                .find_map(|t| t.strip_prefix(ORIGIN_TAG))
                .map(|o| o.replacen('+', "@", 1))
        };
        let volumes: Vec<(&LvRow, String)> = rows
            .iter()
            .filter_map(|r| r.lv_name.strip_prefix(VOLUME_PREFIX).map(|n| (r, n.to_string())))
            .collect();
        let mut out = Vec::new();
        for (row, name) in &volumes {
            let mut snapshots = Vec::new();
            let prefix = format!("{SNAPSHOT_PREFIX}{name}+");
            for snap in rows.iter().filter(|r| r.lv_name.starts_with(&prefix)) {
                let snap_name = snap.lv_name[prefix.len()..].to_string();
                let origin = format!("{name}@{snap_name}");
                snapshots.push(Snapshot {
                    name: snap_name,
                    volume: name.clone(),
                    size_bytes: snap.size()?,
                    allocated_bytes: snap.allocated(chunk)?,
                    clones: volumes
                        .iter()
                        .filter(|(r, _)| origin_of(r).as_deref() == Some(origin.as_str()))
                        .map(|(_, n)| n.clone())
                        .collect(),
                });
            }
            out.push(Volume {
                name: name.clone(),
                backend: "lvm".into(),
                size_bytes: row.size()?,
                allocated_bytes: row.allocated(chunk)?,
                format: VolumeFormat::Raw,
                path: Some(self.dev_path(&row.lv_name)),
                origin: origin_of(row),
                snapshots,
            });
        }
        Ok(out)
    }

    fn dev_path(&self, lv: &str) -> PathBuf {
        PathBuf::from(format!("/dev/{}/{}", self.cfg.volume_group, lv))
    }

    fn find(&self, name: &str) -> Result<Volume> {
        self.describe_all(&self.lvs()?)?
            .into_iter()
            .find(|v| v.name == name)
            .ok_or_else(|| VolumeError::NotFound(format!("volume {name:?} does not exist")))
    }
}

impl VolumeBackend for LvmPool {
    fn kind(&self) -> &'static str {
        "lvm"
    }

    fn create(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let _g = self.lock();
        if self
            .lvs()?
            .iter()
            .any(|r| r.lv_name == format!("{VOLUME_PREFIX}{name}"))
        {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        self.lvm.run(&self.create_argv(name, size_bytes))?;
        self.find(name)
    }

    fn create_from_file(&self, name: &str, path: &std::path::Path, size_bytes: Option<u64>) -> Result<Volume> {
        let len = std::fs::metadata(path)
            .map_err(VolumeError::io(format!("stat {}", path.display())))?
            .len();
        let size = size_bytes.unwrap_or(len).max(len).div_ceil(512) * 512;
        let v = self.create(name, size)?;
        let copied = (|| -> std::io::Result<()> {
            use std::os::unix::fs::FileExt;
            let src = std::fs::File::open(path)?;
            let dst = FileDevice::open(&self.dev_path(&format!("{VOLUME_PREFIX}{name}")), false)?;
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < len {
                let n = (len - off).min(buf.len() as u64) as usize;
                src.read_exact_at(&mut buf[..n], off)?;
                // Zero blocks stay unallocated in the thin pool.
                if buf[..n].iter().any(|&b| b != 0) {
                    dst.write_at(&buf[..n], off)?;
                }
                off += n as u64;
            }
            dst.flush()
        })();
        if let Err(e) = copied {
            let _ = self.delete(name);
            return Err(VolumeError::Io {
                context: format!("copying {} into {name:?}", path.display()),
                source: e,
            });
        }
        Ok(v)
    }

    fn delete(&self, name: &str) -> Result<()> {
        let _g = self.lock();
        let rows = self.lvs()?;
        let snap_prefix = format!("{SNAPSHOT_PREFIX}{name}+");
        for r in rows.iter().filter(|r| r.lv_name.starts_with(&snap_prefix)) {
            self.lvm.run(&self.remove_argv(&r.lv_name))?;
        }
        let lv = format!("{VOLUME_PREFIX}{name}");
        if rows.iter().any(|r| r.lv_name == lv) {
            self.lvm.run(&self.remove_argv(&lv))?;
        }
        Ok(())
    }

    fn resize(&self, name: &str, size_bytes: u64) -> Result<Volume> {
        let _g = self.lock();
        let v = self.find(name)?;
        if size_bytes > v.size_bytes {
            self.lvm.run(&self.resize_argv(name, size_bytes))?;
        }
        self.find(name)
    }

    fn snapshot(&self, volume: &str, snapshot: &str) -> Result<Snapshot> {
        let _g = self.lock();
        let v = self.find(volume)?;
        if v.snapshots.iter().any(|s| s.name == snapshot) {
            return Err(VolumeError::Conflict(format!(
                "snapshot {volume}@{snapshot} already exists"
            )));
        }
        self.lvm.run(&self.snapshot_argv(volume, snapshot, v.allocated_bytes))?;
        self.find(volume)?
            .snapshots
            .into_iter()
            .find(|s| s.name == snapshot)
            .ok_or_else(|| VolumeError::Backend(format!("snapshot {volume}@{snapshot} missing after lvcreate")))
    }

    fn delete_snapshot(&self, volume: &str, snapshot: &str) -> Result<()> {
        let _g = self.lock();
        let lv = format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}");
        if self.lvs()?.iter().any(|r| r.lv_name == lv) {
            self.lvm.run(&self.remove_argv(&lv))?;
        }
        Ok(())
    }

    fn rollback(&self, volume: &str, snapshot: &str) -> Result<Volume> {
        let _g = self.lock();
        let rows = self.lvs()?;
        let lv = format!("{VOLUME_PREFIX}{volume}");
        if !rows.iter().any(|r| r.lv_name == lv) {
            return Err(VolumeError::NotFound(format!("volume {volume:?} does not exist")));
        }
        if !rows
            .iter()
            .any(|r| r.lv_name == format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}"))
        {
            return Err(VolumeError::NotFound(format!(
                "snapshot {volume}@{snapshot} does not exist"
            )));
        }
        for argv in self.rollback_argvs(volume, snapshot, &rows) {
            self.lvm.run(&argv)?;
        }
        self.find(volume)
    }

    fn clone_snapshot(&self, volume: &str, snapshot: &str, name: &str) -> Result<Volume> {
        let _g = self.lock();
        let rows = self.lvs()?;
        if rows.iter().any(|r| r.lv_name == format!("{VOLUME_PREFIX}{name}")) {
            return Err(VolumeError::Conflict(format!("volume {name:?} already exists")));
        }
        if !rows
            .iter()
            .any(|r| r.lv_name == format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}"))
        {
            return Err(VolumeError::NotFound(format!(
                "snapshot {volume}@{snapshot} does not exist"
            )));
        }
        self.lvm.run(&self.clone_argv(volume, snapshot, name))?;
        self.find(name)
    }

    fn list(&self) -> Result<Vec<Volume>> {
        self.describe_all(&self.lvs()?)
    }

    fn open(&self, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        let lv = format!("{VOLUME_PREFIX}{name}");
        self.lvm.run(&self.activate_argv(&lv))?;
        let dev =
            FileDevice::open(&self.dev_path(&lv), read_only).map_err(VolumeError::io(format!("opening {name:?}")))?;
        Ok(Arc::new(dev))
    }

    fn open_snapshot(&self, volume: &str, snapshot: &str) -> Result<Arc<dyn BlockDevice>> {
        let lv = format!("{SNAPSHOT_PREFIX}{volume}+{snapshot}");
        self.lvm.run(&self.activate_argv(&lv))?;
        let dev = FileDevice::open(&self.dev_path(&lv), true)
            .map_err(VolumeError::io(format!("opening {volume}@{snapshot}")))?;
        Ok(Arc::new(ReadOnly(dev)))
    }

    /// Thin volumes are whole extents: lvcreate and lvextend round sizes up to them.
    fn size_granularity(&self) -> Result<u64> {
        match parse_bytes(&self.vg()?.vg_extent_size, "vg_extent_size")? {
            0 => Err(VolumeError::Backend("vgs gave an extent size of 0".into())),
            n => Ok(n),
        }
    }

    fn usage(&self) -> Result<PoolUsage> {
        let rows = self.lvs()?;
        let pool = rows
            .iter()
            .find(|r| r.lv_name == self.cfg.thin_pool)
            .ok_or_else(|| VolumeError::Backend(format!("thin pool {} vanished", self.cfg.thin_pool)))?;
        let total = pool.size()?;
        Ok(PoolUsage {
            total_bytes: total,
            free_bytes: total.saturating_sub(pool.allocated(self.chunk_size(&rows))?),
        })
    }
}
