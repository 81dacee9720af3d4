//! blockd: hearth's storage daemon. It owns volumes (in a file pool, an LVM volume
//! group, or memory), their snapshots and clones, and the ways to reach them: an NBD
//! server for other hosts and tools, and vhost-user-blk sockets for VMs.

pub mod device;
pub mod exports;
pub mod http;
pub mod nbd;
pub mod pool_file;
pub mod pool_lvm;
pub mod pool_memory;
pub mod service;
pub mod vhost_user;
pub mod volume;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use exports::{Exports, NbdSettings};
use service::VolumeService;
use volume::{VolumeBackend, VolumeError};

/// Raises the soft limit on open files to the hard one, as a server with many
/// connections needs (each NBD connection thread keeps a pipe for spliced writes;
/// systemd's soft default is 1024). Returns the limit now in force.
pub fn raise_open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write one live rlimit struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Which backend holds the volumes.
#[derive(Debug, Clone, PartialEq)]
pub enum PoolConfig {
    /// Sparse files in a directory.
    File(PathBuf),
    /// Thin volumes in `volume_group`'s thin pool `thin_pool` (created when missing).
    Lvm { volume_group: String, thin_pool: String },
    /// Memory, up to this many bytes.
    Memory(u64),
}

impl std::str::FromStr for PoolConfig {
    type Err = String;
    /// `file:/path`, `lvm:VG/POOL` or `memory:BYTES`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s.split_once(':') {
            Some(("file", p)) if p.starts_with('/') => Ok(PoolConfig::File(p.into())),
            Some(("lvm", vp)) => match vp.split_once('/') {
                Some((vg, pool)) => Ok(PoolConfig::Lvm {
                    volume_group: vg.into(),
                    thin_pool: pool.into(),
                }),
                None => Ok(PoolConfig::Lvm {
                    volume_group: vp.into(),
                    thin_pool: "hearth-pool".into(),
                }),
            },
            Some(("memory", n)) => n
                .parse()
                .map(PoolConfig::Memory)
                .map_err(|e| format!("memory pool size {n:?}: {e}")),
            _ => Err(format!(
                "pool {s:?}: use file:/absolute/path, lvm:VG[/THINPOOL] or memory:BYTES"
            )),
        }
    }
}

/// Everything blockd needs to start.
#[derive(Debug, Clone)]
pub struct BlockdConfig {
    pub pool: PoolConfig,
    /// The export table lives here.
    pub state_dir: PathBuf,
    /// vhost-user-blk sockets are made here.
    pub socket_dir: PathBuf,
    pub nbd: NbdSettings,
}

impl BlockdConfig {
    /// A file pool and state under `data_dir`, sockets under `run_dir`, NBD on a Unix
    /// socket only.
    pub fn new(data_dir: PathBuf, run_dir: PathBuf) -> BlockdConfig {
        BlockdConfig {
            pool: PoolConfig::File(data_dir.join("volumes")),
            state_dir: data_dir.join("blockd"),
            socket_dir: run_dir.join("blockd"),
            nbd: NbdSettings {
                unix: Some(run_dir.join("blockd").join("nbd.sock")),
                ..Default::default()
            },
        }
    }
}

/// blockd: its volumes and their exports.
#[derive(Debug)]
pub struct Blockd {
    pub volumes: VolumeService,
    pub exports: Exports,
}

impl Blockd {
    /// Opens the pool, starts the NBD listeners and restores the saved exports.
    pub async fn open(config: BlockdConfig) -> Result<Arc<Blockd>, VolumeError> {
        let backend: Arc<dyn VolumeBackend> = match config.pool.clone() {
            PoolConfig::File(dir) => Arc::new(
                tokio::task::spawn_blocking(move || pool_file::FilePool::open(&dir))
                    .await
                    .map_err(|e| VolumeError::Backend(e.to_string()))??,
            ),
            PoolConfig::Lvm {
                volume_group,
                thin_pool,
            } => {
                let cfg = pool_lvm::LvmConfig {
                    volume_group,
                    thin_pool,
                    pool_size_bytes: None,
                };
                Arc::new(
                    tokio::task::spawn_blocking(move || pool_lvm::LvmPool::open(cfg, Box::new(pool_lvm::SystemLvm)))
                        .await
                        .map_err(|e| VolumeError::Backend(e.to_string()))??,
                )
            }
            PoolConfig::Memory(n) => Arc::new(pool_memory::MemoryPool::new(n)),
        };
        let exports = Exports::new(&config.state_dir, &config.socket_dir, config.nbd.clone()).await?;
        let mut volumes = VolumeService::new(backend);
        volumes.set_busy_check(exports.busy_check());
        let blockd = Arc::new(Blockd { volumes, exports });
        blockd.exports.set_owner(&blockd);
        blockd.exports.restore(&blockd.volumes).await;
        Ok(blockd)
    }
}

/// blockd serving its HTTP API on a Unix socket from a task of this process (another
/// "host" in a test) until dropped. Dropping it stops the API and the exports: NBD
/// listeners and connections, vhost-user-blk sockets.
#[derive(Debug)]
pub struct InProcess {
    pub blockd: Arc<Blockd>,
    server: tokio::task::JoinHandle<()>,
}

impl InProcess {
    pub async fn start(config: BlockdConfig, socket: &std::path::Path) -> Result<InProcess, VolumeError> {
        let blockd = Blockd::open(config).await?;
        let listener = socket_http::server::bind_unix(socket)
            .await
            .map_err(|e| VolumeError::Backend(format!("cannot listen on {}: {e}", socket.display())))?;
        let router = router(blockd.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(InProcess { blockd, server })
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.server.abort();
        let b = self.blockd.clone();
        // On a runtime of its own: the caller's may be ending, or be this thread's.
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                rt.block_on(b.exports.shutdown());
            }
        })
        .join();
    }
}

/// The HTTP routes blockd serves on its Unix socket.
pub fn router(blockd: Arc<Blockd>) -> axum::Router {
    http::router(blockd)
}

/// Locks `m`, also after a thread panicked holding it (the data stays usable).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
