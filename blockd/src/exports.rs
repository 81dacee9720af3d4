//! What makes volumes reachable: NBD exports (for other hosts and tools) and
//! vhost-user-blk sockets (for VMs), plus vhost-user-blk sockets for volumes another
//! host exports over NBD ("remote disks", served through blockd's NBD client, so no
//! kernel nbd module is needed).
//!
//! The table is saved in `<state dir>/exports.json` on every change and restored when
//! blockd starts, so a restart brings every export and socket back at the same place:
//! NBD clients reconnect, and a VM's vhost-user-blk frontend reconnects to the socket
//! (QEMU with `reconnect=` on its chardev; Cloud Hypervisor does on its own).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};

use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::device::{BlockDevice, ReadOnly};
use crate::nbd::client::{ClientError, NbdAddress, NbdDevice, ReconnectPolicy};
use crate::nbd::proto::{EINVAL, EIO, ENOSPC, EPERM};
use crate::nbd::server::{ExportOptions, NbdServer, ResizeRefused, Resizer};
use crate::nbd::tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles, TlsError};
use crate::service::VolumeService;
use crate::vhost_user::{VhostUserBlkExport, VhostUserBlkOptions};
use crate::volume::{validate_name, Result, VolumeError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ExportKind {
    Nbd,
    VhostUser,
}

/// The body of `PUT /volumes/{name}/exports/{kind}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportSpec {
    #[serde(default)]
    pub read_only: bool,
}

/// A volume on another host, exported there over NBD. Exactly one of `tcp` and `unix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteDiskSpec {
    /// `host:port` of the remote NBD server.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Unix socket of the remote NBD server (same host, or a forwarded socket).
    #[serde(default)]
    pub unix: Option<PathBuf>,
    /// The export name (the volume's name on the remote blockd).
    pub export: String,
    #[serde(default)]
    pub read_only: bool,
    /// Connect inside TLS (`nbds://`), verifying the server against the `ca-cert.pem`
    /// of this blockd's `--nbd-tls-certificates` directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl RemoteDiskSpec {
    fn address(&self) -> Result<NbdAddress> {
        match (&self.tcp, &self.unix) {
            (Some(t), None) => Ok(NbdAddress::Tcp(t.clone())),
            (None, Some(u)) if u.is_absolute() => Ok(NbdAddress::Unix(u.clone())),
            (None, Some(u)) => Err(VolumeError::Invalid(format!(
                "unix socket path {} must be absolute",
                u.display()
            ))),
            _ => Err(VolumeError::Invalid(
                "give exactly one of tcp (host:port) and unix (socket path)".into(),
            )),
        }
    }
}

/// Where an NBD export can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NbdEndpoint {
    pub export: String,
    /// `nbd://…` and `nbd+unix://…` URIs, as qemu-img, nbdinfo and nbdcopy take them.
    pub uris: Vec<String>,
}

/// An export as it exists now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Export {
    /// The volume (or, for remote disks, the local name of the remote disk).
    pub volume: String,
    pub kind: ExportKind,
    pub read_only: bool,
    /// The vhost-user-blk socket a VM attaches to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub socket: Option<PathBuf>,
    /// True while a VM is connected to the socket.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdEndpoint>,
    /// For remote disks: where the blocks really are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteDiskSpec>,
    /// For remote disks: the export's size as last offered (larger once its owner grew
    /// it; the NBD client follows by itself).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
}

/// Settings of the NBD server blockd runs.
#[derive(Debug, Clone, Default)]
pub struct NbdSettings {
    /// TCP address to listen on (e.g. `0.0.0.0:10809`); none: no TCP.
    pub tcp: Option<SocketAddr>,
    /// Unix socket to listen on.
    pub unix: Option<PathBuf>,
    /// TCP peers allowed (none: all that can reach the address).
    pub allow: Option<Vec<ipnet::IpNet>>,
    /// TLS for the server and for remote disks; none: plaintext only.
    pub tls: Option<NbdTlsSettings>,
}

/// TLS of blockd's NBD server and of its connections to remote exports, from one
/// directory laid out as nbdkit's and qemu-nbd's `--tls-certificates`: `ca-cert.pem`,
/// `server-cert.pem`, `server-key.pem`, and, to present to servers that verify their
/// clients, `client-cert.pem` and `client-key.pem`. The same directory serves
/// `nbdinfo`/`nbdcopy` (`nbds://…?tls-certificates=DIR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdTlsSettings {
    pub dir: PathBuf,
    /// The server's TLS: off (the directory then only serves remote disks), on (TLS
    /// and plaintext clients) or require (nbdkit's `--tls=require`).
    pub mode: NbdTlsMode,
    /// Require client certificates signed by `ca-cert.pem` (nbdkit's `--tls-verify-peer`).
    pub verify_peer: bool,
}

/// TLS on the NBD server: `off`, `on` (TLS and plaintext clients) or `require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NbdTlsMode {
    #[default]
    Off,
    On,
    Require,
}

/// The NBD TLS options of `blockd` and `hearth-api --all-in-one`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NbdTlsArgs {
    /// TLS on the NBD server: off, on (TLS and plaintext) or require.
    #[arg(long, value_enum, default_value_t = NbdTlsMode::Off)]
    pub nbd_tls: NbdTlsMode,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem (and optionally
    /// client-cert.pem, client-key.pem), as nbdkit's --tls-certificates.
    #[arg(long)]
    pub nbd_tls_certificates: Option<PathBuf>,
    /// Require NBD clients to present a certificate signed by ca-cert.pem.
    #[arg(long)]
    pub nbd_tls_verify_peer: bool,
}

impl NbdTlsArgs {
    /// The settings these options ask for; an error when they do not fit together.
    pub fn settings(&self) -> std::result::Result<Option<NbdTlsSettings>, String> {
        match (self.nbd_tls, &self.nbd_tls_certificates) {
            (NbdTlsMode::Off, _) if self.nbd_tls_verify_peer => {
                Err("--nbd-tls-verify-peer needs --nbd-tls on or require".into())
            }
            (NbdTlsMode::Off, None) => Ok(None),
            (_, None) => Err("--nbd-tls on/require needs --nbd-tls-certificates DIR".into()),
            // With TLS off on the server the directory still serves remote disks.
            (mode, Some(dir)) => Ok(Some(NbdTlsSettings {
                dir: dir.clone(),
                mode,
                verify_peer: self.nbd_tls_verify_peer,
            })),
        }
    }
}

impl NbdTlsSettings {
    /// The server's TLS, `None` when the mode is off.
    pub fn server(&self) -> std::result::Result<Option<ServerTls>, TlsError> {
        if self.mode == NbdTlsMode::Off {
            return Ok(None);
        }
        ServerTls::load(&ServerTlsFiles {
            cert: self.dir.join("server-cert.pem"),
            key: self.dir.join("server-key.pem"),
            client_ca: self.verify_peer.then(|| self.dir.join("ca-cert.pem")),
            required: self.mode == NbdTlsMode::Require,
        })
        .map(Some)
    }

    /// The client side, when the directory has a CA to verify servers with.
    fn client(&self) -> std::result::Result<Option<ClientTls>, TlsError> {
        let ca = self.dir.join("ca-cert.pem");
        if !ca.exists() {
            return Ok(None);
        }
        let (cert, key) = (self.dir.join("client-cert.pem"), self.dir.join("client-key.pem"));
        let cert = match (cert.exists(), key.exists()) {
            (true, true) => Some((cert, key)),
            (false, false) => None,
            (cert_there, _) => {
                let (there, missing) = if cert_there { (cert, key) } else { (key, cert) };
                let message = format!("{} without {}", there.display(), missing.display());
                return Err(TlsError::Config(message));
            }
        };
        ClientTls::load(&ClientTlsFiles {
            ca,
            cert,
            server_name: None,
        })
        .map(Some)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Saved {
    #[serde(default)]
    volumes: Vec<(String, ExportKind, ExportSpec)>,
    #[serde(default)]
    remote: Vec<(String, RemoteDiskSpec)>,
}

#[derive(Debug, Default)]
struct Table {
    nbd: BTreeMap<String, ExportSpec>,
    vhost: BTreeMap<String, (ExportSpec, VhostUserBlkExport)>,
    remote: BTreeMap<String, (RemoteDiskSpec, VhostUserBlkExport, Arc<NbdDevice>)>,
}

/// The exports of one blockd.
#[derive(Debug)]
pub struct Exports {
    state_file: PathBuf,
    socket_dir: PathBuf,
    nbd: Arc<NbdServer>,
    nbd_uris: Vec<String>,
    /// For remote disks with `tls`.
    client_tls: Option<ClientTls>,
    table: Mutex<Table>,
    /// Exported volume names, readable from the synchronous busy check.
    exported: Arc<StdMutex<BTreeSet<String>>>,
    /// The blockd these exports belong to, which grows a volume when a client of its
    /// NBD export asks (unset: NBD exports do not offer resizing).
    owner: OnceLock<(Weak<crate::Blockd>, tokio::runtime::Handle)>,
}

/// Grows a volume when a client of its NBD export asks (`NBD_CMD_RESIZE`), as
/// `POST /volumes/{name}/resize` on the volume's own host does: the volume grows, its
/// vhost-user-blk socket tells its VM, and the NBD export is offered anew at the new
/// size (which ends the connections told the old one; NBD clients reconnect).
#[derive(Debug)]
struct VolumeResizer {
    blockd: Weak<crate::Blockd>,
    runtime: tokio::runtime::Handle,
    volume: String,
}

impl Resizer for VolumeResizer {
    fn resize(&self, size: u64) -> std::result::Result<(), ResizeRefused> {
        let Some(b) = self.blockd.upgrade() else {
            return Err(ResizeRefused {
                errno: EIO,
                message: "blockd is stopping".into(),
            });
        };
        // The NBD server calls this on a connection's own thread, never a runtime's.
        let grown = self.runtime.block_on(async {
            b.volumes.resize(&self.volume, size).await?;
            b.exports.resized(&b.volumes, &self.volume).await;
            Ok::<_, VolumeError>(())
        });
        grown.map_err(|e| ResizeRefused {
            errno: match e {
                VolumeError::Invalid(_) => EINVAL,
                VolumeError::NoSpace(_) => ENOSPC,
                _ => EIO,
            },
            message: e.to_string(),
        })
    }
}

/// The longest path a Unix socket can have (`sun_path` holds 108 bytes with a NUL).
const MAX_SOCKET_PATH: usize = 107;

/// `<dir>/<prefix>-<name>/vhost.sock`, or, where that is longer than a Unix socket's
/// path may be (a long name in a deep directory), the name cut short and followed by a
/// hash of all of it: the same every time, and different for different names.
///
/// Each socket has a directory of its own, which outlives blockd restarts: the one
/// VM that may connect is the one its directory is handed to (vmm-manager gives it to
/// the VM's jailed user and mounts it into that VMM's namespace), so the socket itself
/// is open to whoever can reach it, and a socket blockd makes anew after a restart
/// is reachable by the same VM and no other.
fn socket_path(dir: &Path, prefix: &str, name: &str) -> PathBuf {
    const FILE: &str = "vhost.sock";
    let path = dir.join(format!("{prefix}-{name}")).join(FILE);
    if path.as_os_str().len() <= MAX_SOCKET_PATH {
        return path;
    }
    // FNV-1a: stable across builds, unlike std's hasher.
    let hash = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let fixed = dir.as_os_str().len() + format!("/{prefix}--{hash:016x}/{FILE}").len();
    // Names are ASCII (validated), so any cut is between characters.
    let keep = MAX_SOCKET_PATH.saturating_sub(fixed).min(name.len());
    dir.join(format!("{prefix}-{}-{hash:016x}", &name[..keep])).join(FILE)
}

/// Starts a vhost-user-blk export on `socket` in its own directory (made root-only if
/// new; a directory handed to a VM keeps its owner), connectable by whoever reaches it.
fn start_vhost(
    socket: &Path,
    dev: Arc<dyn BlockDevice>,
    options: VhostUserBlkOptions,
) -> std::io::Result<VhostUserBlkExport> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(dir) = socket.parent() {
        if !dir.exists() {
            std::fs::DirBuilder::new().mode(0o700).create(dir)?;
        }
    }
    let export = VhostUserBlkExport::start(socket, dev, options)?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o666))?;
    Ok(export)
}

/// Removes the directory of an export's socket once the export is gone for good.
fn remove_socket_dir(socket: &Path) {
    if let Some(dir) = socket.parent() {
        let _ = std::fs::remove_file(socket);
        let _ = std::fs::remove_dir(dir);
    }
}

/// Why a remote disk's export did not grow, as a blockd error.
fn resize_error(name: &str, e: ClientError) -> VolumeError {
    match e {
        ClientError::Request {
            errno: EINVAL, message, ..
        } => VolumeError::Invalid(message),
        ClientError::Request {
            errno: ENOSPC, message, ..
        } => VolumeError::NoSpace(message),
        ClientError::Request { errno: EPERM, .. } | ClientError::ReadOnly => {
            VolumeError::Conflict(format!("remote disk {name:?} is read-only"))
        }
        ClientError::ResizeUnsupported => VolumeError::Unsupported(format!(
            "the NBD server of remote disk {name:?} does not offer resizing; grow the volume on its own host"
        )),
        e => VolumeError::Backend(format!("remote disk {name:?} did not grow: {e}")),
    }
}

fn internal(context: &str) -> impl FnOnce(std::io::Error) -> VolumeError + '_ {
    move |e| VolumeError::Io {
        context: context.to_string(),
        source: e,
    }
}

impl Exports {
    /// Starts the NBD listeners (none when `settings` names none).
    pub async fn new(state_dir: &Path, socket_dir: &Path, nbd: NbdSettings) -> Result<Exports> {
        std::fs::create_dir_all(state_dir).map_err(internal("creating the state directory"))?;
        std::fs::create_dir_all(socket_dir).map_err(internal("creating the socket directory"))?;
        let tls_error = |e: TlsError| VolumeError::Backend(format!("NBD TLS: {e}"));
        let (server_tls, client_tls) = match &nbd.tls {
            Some(t) => (t.server().map_err(tls_error)?, t.client().map_err(tls_error)?),
            None => (None, None),
        };
        let config = crate::nbd::server::ServerConfig {
            allowed_networks: nbd.allow.clone(),
            tls: server_tls,
            ..Default::default()
        };
        // Plaintext URIs unless TLS is required, TLS ones when it is offered.
        let mode = nbd.tls.as_ref().map_or(NbdTlsMode::Off, |t| t.mode);
        let schemes: Vec<&str> = [(mode != NbdTlsMode::Require, "nbd"), (mode != NbdTlsMode::Off, "nbds")]
            .into_iter()
            .filter_map(|(offered, scheme)| offered.then_some(scheme))
            .collect();
        let server = Arc::new(NbdServer::new(config));
        let mut uris = Vec::new();
        if let Some(addr) = nbd.tcp {
            let bound = server
                .listen_tcp(addr)
                .await
                .map_err(|e| VolumeError::Backend(format!("NBD server cannot listen on {addr}: {e}")))?;
            uris.extend(schemes.iter().map(|s| format!("{s}://{bound}/")));
        }
        if let Some(path) = &nbd.unix {
            server
                .listen_unix(path)
                .await
                .map_err(|e| VolumeError::Backend(format!("NBD server cannot listen on {}: {e}", path.display())))?;
            uris.extend(
                schemes
                    .iter()
                    .map(|s| format!("{s}+unix:///?socket={}", path.display())),
            );
        }
        Ok(Exports {
            state_file: state_dir.join("exports.json"),
            socket_dir: socket_dir.to_path_buf(),
            nbd: server,
            nbd_uris: uris,
            client_tls,
            table: Mutex::new(Table::default()),
            exported: Arc::default(),
            owner: OnceLock::new(),
        })
    }

    /// Lets clients of NBD exports added from now on grow their volumes through
    /// `blockd` (which holds these exports).
    pub fn set_owner(&self, blockd: &Arc<crate::Blockd>) {
        let _ = self
            .owner
            .set((Arc::downgrade(blockd), tokio::runtime::Handle::current()));
    }

    fn nbd_options(&self, name: &str, spec: &ExportSpec) -> ExportOptions {
        let resizer = self.owner.get().filter(|_| !spec.read_only).map(|(blockd, runtime)| {
            Arc::new(VolumeResizer {
                blockd: blockd.clone(),
                runtime: runtime.clone(),
                volume: name.to_string(),
            }) as Arc<dyn Resizer>
        });
        ExportOptions {
            read_only: spec.read_only,
            description: format!("hearth volume {name}"),
            resizer,
        }
    }

    /// The check `VolumeService` runs before deleting a volume.
    pub fn busy_check(&self) -> impl Fn(&str) -> Option<String> + Send + Sync + 'static {
        let exported = self.exported.clone();
        move |name| {
            exported
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(name)
                .then(|| "it is exported (over NBD or to a VM); remove its exports first".to_string())
        }
    }

    /// Brings back the exports saved before a restart. Failures are logged, not fatal:
    /// the rest of the table still comes back.
    pub async fn restore(&self, volumes: &VolumeService) {
        let saved: Saved = match std::fs::read(&self.state_file) {
            Ok(b) => match serde_json::from_slice(&b) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(file = %self.state_file.display(), "cannot parse the saved exports: {e}");
                    return;
                }
            },
            Err(_) => return,
        };
        for (name, kind, spec) in saved.volumes {
            if let Err(e) = self.export(volumes, &name, kind, spec).await {
                tracing::error!(volume = name, ?kind, "cannot restore export: {e}");
            }
        }
        for (name, spec) in saved.remote {
            if let Err(e) = self.remote_disk(&name, spec).await {
                tracing::error!(disk = name, "cannot restore remote disk: {e}");
            }
        }
    }

    fn save(&self, t: &Table) -> Result<()> {
        let mut saved = Saved::default();
        for (n, s) in &t.nbd {
            saved.volumes.push((n.clone(), ExportKind::Nbd, s.clone()));
        }
        for (n, (s, _)) in &t.vhost {
            saved.volumes.push((n.clone(), ExportKind::VhostUser, s.clone()));
        }
        for (n, (s, _, _)) in &t.remote {
            saved.remote.push((n.clone(), s.clone()));
        }
        let bytes = serde_json::to_vec_pretty(&saved).map_err(|e| VolumeError::Backend(e.to_string()))?;
        let tmp = self.state_file.with_extension("json.tmp");
        std::fs::write(&tmp, bytes)
            .and_then(|_| std::fs::rename(&tmp, &self.state_file))
            .map_err(internal("saving the export table"))?;
        let mut names: BTreeSet<String> = t.nbd.keys().cloned().collect();
        names.extend(t.vhost.keys().cloned());
        *self.exported.lock().unwrap_or_else(|e| e.into_inner()) = names;
        Ok(())
    }

    fn vhost_socket(&self, prefix: &str, name: &str) -> PathBuf {
        socket_path(&self.socket_dir, prefix, name)
    }

    fn describe_nbd(&self, name: &str, spec: &ExportSpec) -> Export {
        let uris = self
            .nbd_uris
            .iter()
            .map(|u| match u.split_once("/?") {
                Some((base, q)) => format!("{base}/{name}?{q}"),
                None => format!("{u}{name}"),
            })
            .collect();
        Export {
            volume: name.to_string(),
            kind: ExportKind::Nbd,
            read_only: spec.read_only,
            socket: None,
            connected: None,
            nbd: Some(NbdEndpoint {
                export: name.to_string(),
                uris,
            }),
            remote: None,
            size_bytes: None,
        }
    }

    fn describe_vhost(name: &str, spec: &ExportSpec, e: &VhostUserBlkExport) -> Export {
        Export {
            volume: name.to_string(),
            kind: ExportKind::VhostUser,
            read_only: spec.read_only,
            socket: Some(e.socket_path().to_path_buf()),
            connected: Some(e.is_connected()),
            nbd: None,
            remote: None,
            size_bytes: None,
        }
    }

    fn describe_remote(name: &str, spec: &RemoteDiskSpec, e: &VhostUserBlkExport) -> Export {
        Export {
            remote: Some(spec.clone()),
            size_bytes: Some(e.device_size()),
            ..Self::describe_vhost(
                name,
                &ExportSpec {
                    read_only: spec.read_only,
                },
                e,
            )
        }
    }

    pub async fn list(&self) -> Vec<Export> {
        let t = self.table.lock().await;
        let mut out: Vec<Export> = t.nbd.iter().map(|(n, s)| self.describe_nbd(n, s)).collect();
        out.extend(t.vhost.iter().map(|(n, (s, e))| Self::describe_vhost(n, s, e)));
        out.extend(t.remote.iter().map(|(n, (s, e, _))| Self::describe_remote(n, s, e)));
        out
    }

    async fn open(volumes: &VolumeService, name: &str, read_only: bool) -> Result<Arc<dyn BlockDevice>> {
        volumes.get(name).await?;
        let backend = volumes.backend().clone();
        let n = name.to_string();
        let dev = tokio::task::spawn_blocking(move || backend.open(&n, read_only))
            .await
            .map_err(|e| VolumeError::Backend(e.to_string()))??;
        Ok(if read_only && !dev.read_only() {
            Arc::new(ReadOnly(dev))
        } else {
            dev
        })
    }

    /// Exports a volume. Idempotent: the same export again changes nothing; a different
    /// `read_only` is a conflict (unexport first).
    pub async fn export(
        &self,
        volumes: &VolumeService,
        name: &str,
        kind: ExportKind,
        spec: ExportSpec,
    ) -> Result<(Export, bool)> {
        validate_name("volume", name)?;
        let mut t = self.table.lock().await;
        let existing = match kind {
            ExportKind::Nbd => t.nbd.get(name).cloned(),
            ExportKind::VhostUser => t.vhost.get(name).map(|(s, _)| s.clone()),
        };
        if let Some(s) = existing {
            if s != spec {
                return Err(VolumeError::Conflict(format!(
                    "volume {name:?} is already exported with read_only={}; remove that export first",
                    s.read_only
                )));
            }
            let e = match kind {
                ExportKind::Nbd => self.describe_nbd(name, &s),
                ExportKind::VhostUser => {
                    let (s, e) = &t.vhost[name];
                    Self::describe_vhost(name, s, e)
                }
            };
            return Ok((e, false));
        }
        let dev = Self::open(volumes, name, spec.read_only).await?;
        match kind {
            ExportKind::Nbd => {
                if self.nbd_uris.is_empty() {
                    return Err(VolumeError::Unsupported(
                        "this blockd runs no NBD listener; start it with --nbd-tcp or --nbd-unix".into(),
                    ));
                }
                self.nbd
                    .add_export(name, dev, self.nbd_options(name, &spec))
                    .map_err(|e| VolumeError::Backend(format!("cannot export {name:?}: {e}")))?;
                t.nbd.insert(name.to_string(), spec.clone());
            }
            ExportKind::VhostUser => {
                let socket = self.vhost_socket("vol", name);
                let options = VhostUserBlkOptions {
                    serial: name.chars().take(20).collect(),
                    ..Default::default()
                };
                let started = tokio::task::spawn_blocking(move || start_vhost(&socket, dev, options))
                    .await
                    .map_err(|e| VolumeError::Backend(e.to_string()))?
                    .map_err(internal("starting the vhost-user-blk socket"))?;
                t.vhost.insert(name.to_string(), (spec.clone(), started));
            }
        }
        if let Err(e) = self.save(&t) {
            self.drop_export(&mut t, name, kind);
            return Err(e);
        }
        let made = match kind {
            ExportKind::Nbd => self.describe_nbd(name, &spec),
            ExportKind::VhostUser => {
                let (s, e) = &t.vhost[name];
                Self::describe_vhost(name, s, e)
            }
        };
        Ok((made, true))
    }

    fn drop_export(&self, t: &mut Table, name: &str, kind: ExportKind) {
        match kind {
            ExportKind::Nbd => {
                t.nbd.remove(name);
                self.nbd.remove_export(name);
            }
            ExportKind::VhostUser => {
                if let Some((_, e)) = t.vhost.remove(name) {
                    if let Err(err) = e.stop() {
                        tracing::warn!(volume = name, "stopping vhost-user-blk export: {err}");
                    }
                    remove_socket_dir(&self.vhost_socket("vol", name));
                }
            }
        }
    }

    /// Removes an export; removing one that does not exist succeeds.
    pub async fn unexport(&self, name: &str, kind: ExportKind) -> Result<()> {
        validate_name("volume", name)?;
        let mut t = self.table.lock().await;
        self.drop_export(&mut t, name, kind);
        self.save(&t)
    }

    /// After a resize, new connections must see the new size: the NBD export is
    /// re-added and the vhost-user-blk socket serves the re-opened volume to the next
    /// frontend (connections already open keep the size they negotiated).
    pub async fn resized(&self, volumes: &VolumeService, name: &str) {
        let t = self.table.lock().await;
        if let Some((spec, export)) = t.vhost.get(name) {
            match Self::open(volumes, name, spec.read_only).await {
                Ok(dev) => match export.set_device(dev) {
                    Ok(true) => tracing::info!(volume = name, "the VM on the vhost-user socket was told the new size"),
                    Ok(false) if export.is_connected() => tracing::info!(
                        volume = name,
                        "the VM on the vhost-user socket gave no back-end channel: it sees the new size at its next start"
                    ),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(volume = name, "the VM on the vhost-user socket was not told the new size: {e}"),
                },
                Err(e) => tracing::error!(volume = name, "re-opening after resize: {e}"),
            }
        }
        if let Some(spec) = t.nbd.get(name) {
            match Self::open(volumes, name, spec.read_only).await {
                Ok(dev) => {
                    self.nbd.remove_export(name);
                    if let Err(e) = self.nbd.add_export(name, dev, self.nbd_options(name, spec)) {
                        tracing::error!(volume = name, "re-exporting after resize: {e}");
                    }
                }
                Err(e) => tracing::error!(volume = name, "re-opening after resize: {e}"),
            }
        }
    }

    /// Serves a remote NBD export to local VMs on a vhost-user-blk socket.
    pub async fn remote_disk(&self, name: &str, spec: RemoteDiskSpec) -> Result<(Export, bool)> {
        validate_name("remote disk", name)?;
        let address = spec.address()?;
        let mut t = self.table.lock().await;
        if let Some((s, e, _)) = t.remote.get(name) {
            if *s != spec {
                return Err(VolumeError::Conflict(format!(
                    "remote disk {name:?} exists with other settings; delete it first"
                )));
            }
            return Ok((Self::describe_remote(name, s, e), false));
        }
        let tls = match (spec.tls, &self.client_tls) {
            (false, _) => None,
            (true, Some(tls)) => Some(tls.clone()),
            (true, None) => {
                return Err(VolumeError::Invalid(
                    "tls needs blockd's --nbd-tls-certificates directory with a ca-cert.pem".into(),
                ))
            }
        };
        let socket = self.vhost_socket("remote", name);
        let (export, read_only) = (spec.export.clone(), spec.read_only);
        let started = tokio::task::spawn_blocking(move || -> Result<(VhostUserBlkExport, Arc<NbdDevice>)> {
            let nbd = NbdDevice::connect_with(address.clone(), &export, tls, ReconnectPolicy::default())
                .map_err(|e| VolumeError::NotFound(format!("cannot reach NBD export {export:?} at {address}: {e}")))?;
            let nbd = Arc::new(nbd);
            let dev: Arc<dyn BlockDevice> = if read_only {
                Arc::new(ReadOnly(Arc::clone(&nbd)))
            } else {
                Arc::clone(&nbd) as Arc<dyn BlockDevice>
            };
            let options = VhostUserBlkOptions {
                serial: export.chars().take(20).collect(),
                ..Default::default()
            };
            let started = start_vhost(&socket, dev, options).map_err(internal("starting the vhost-user-blk socket"))?;
            // Grown on its own host: the VM here is told when the NBD client
            // reconnects, which it does as soon as the owner's resize ends its connection.
            let notify = started.growth_notifier();
            nbd.on_grow(move |_| notify());
            Ok((started, nbd))
        })
        .await
        .map_err(|e| VolumeError::Backend(e.to_string()))??;
        let (started, nbd) = started;
        t.remote.insert(name.to_string(), (spec.clone(), started, nbd));
        if let Err(e) = self.save(&t) {
            if let Some((_, e, _)) = t.remote.remove(name) {
                let _ = e.stop();
                remove_socket_dir(&self.vhost_socket("remote", name));
            }
            return Err(e);
        }
        let (s, e, _) = &t.remote[name];
        Ok((Self::describe_remote(name, s, e), true))
    }

    /// Grows the volume behind a remote disk through its NBD server (`NBD_CMD_RESIZE`,
    /// which blockd's own NBD exports offer when writable), and tells the VM on the
    /// disk's socket. Shrinking is refused (422), as is a size the remote pool cannot
    /// hold (507) or a server that does not offer resizing (409).
    pub async fn resize_remote_disk(&self, name: &str, size_bytes: u64) -> Result<Export> {
        validate_name("remote disk", name)?;
        crate::volume::validate_size(size_bytes)?;
        let nbd = {
            let t = self.table.lock().await;
            let (spec, _, nbd) = t
                .remote
                .get(name)
                .ok_or_else(|| VolumeError::NotFound(format!("no remote disk {name:?}")))?;
            if spec.read_only {
                return Err(VolumeError::Conflict(format!(
                    "remote disk {name:?} is read-only here; it is not grown from here"
                )));
            }
            nbd.clone()
        };
        // Shrinking is refused by the server, with its reason.
        tokio::task::spawn_blocking(move || nbd.resize(size_bytes))
            .await
            .map_err(|e| VolumeError::Backend(e.to_string()))?
            .map_err(|e| resize_error(name, e))?;
        let t = self.table.lock().await;
        let (s, e, _) = t
            .remote
            .get(name)
            .ok_or_else(|| VolumeError::NotFound(format!("remote disk {name:?} was deleted meanwhile")))?;
        Ok(Self::describe_remote(name, s, e))
    }

    pub async fn delete_remote_disk(&self, name: &str) -> Result<()> {
        validate_name("remote disk", name)?;
        let mut t = self.table.lock().await;
        if let Some((_, e, _)) = t.remote.remove(name) {
            if let Err(err) = e.stop() {
                tracing::warn!(disk = name, "stopping vhost-user-blk export: {err}");
            }
            remove_socket_dir(&self.vhost_socket("remote", name));
        }
        self.save(&t)
    }

    /// Stops every export without forgetting them (blockd is shutting down; they come
    /// back on the next start).
    pub async fn shutdown(&self) {
        let mut t = self.table.lock().await;
        for (_, (_, e)) in std::mem::take(&mut t.vhost) {
            let _ = e.stop();
        }
        for (_, (_, e, _)) in std::mem::take(&mut t.remote) {
            let _ = e.stop();
        }
        self.nbd.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_paths_fit_a_unix_socket_and_stay_distinct() {
        let short = socket_path(Path::new("/run/hearth/blockd"), "remote", "data");
        assert_eq!(short, Path::new("/run/hearth/blockd/remote-data/vhost.sock"));
        let deep = Path::new("/tmp/hearth-test-AbCdEf/run/blockd");
        let a = format!("far-{}", "x".repeat(59));
        let b = format!("far-{}y", "x".repeat(58));
        let (pa, pb) = (socket_path(deep, "remote", &a), socket_path(deep, "remote", &b));
        for p in [&pa, &pb] {
            assert!(p.as_os_str().len() <= MAX_SOCKET_PATH, "{}", p.display());
            assert!(
                p.starts_with(deep) && p.to_string_lossy().contains("/remote-far-xxx"),
                "{}",
                p.display()
            );
        }
        assert_ne!(pa, pb, "names that differ only past the cut");
        assert_eq!(pa, socket_path(deep, "remote", &a), "the same name gives the same path");
        // Even UnixListener takes it.
        let dir = tempfile::tempdir().expect("tempdir");
        let long_dir = dir.path().join("d".repeat(40));
        std::fs::create_dir(&long_dir).expect("mkdir");
        let p = socket_path(&long_dir, "vol", &a);
        std::fs::create_dir(p.parent().expect("its directory")).expect("mkdir");
        std::os::unix::net::UnixListener::bind(&p).expect("bind");
    }
}
