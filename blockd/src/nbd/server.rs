//! The NBD server: a table of named exports, changeable while connections are open,
//! served on any number of TCP and Unix listeners.
//!
//! Each connection runs the fixed-newstyle handshake in a task under a timeout; its
//! transmission phase then runs on threads of its own with blocking socket calls (see
//! [`super::transmission`]), while the task watches for the export's removal and the
//! server's shutdown and closes the socket on either.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};

use super::proto::*;
use super::tls::ServerTls;
use super::tls_socket::TlsSocket;
use super::transmission::{self, BlockingSocket};
use crate::device::BlockDevice;

/// How an export is offered.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
    /// Shown by `nbdinfo --list` and sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
    /// Grows the export when a client sends `NBD_CMD_RESIZE`; the export offers
    /// `NBD_FLAG_SEND_RESIZE` when it is set and the export is writable.
    pub resizer: Option<Arc<dyn Resizer>>,
}

/// Grows an export at a client's request (`NBD_CMD_RESIZE`, the protocol's
/// experimental `RESIZE` extension: the new size in the request's offset field).
pub trait Resizer: Send + Sync + std::fmt::Debug {
    /// Grows the export's storage to at least `size` bytes (larger than the size the
    /// asking connection was given) and offers the export at its new size, so that the
    /// connection a client makes next is told it. Connections open now keep the size
    /// they were given: offering the export anew ends them once their requests are
    /// answered (the answer to this request included), and clients reconnect. Runs on
    /// the asking connection's thread and may block.
    fn resize(&self, size: u64) -> Result<(), ResizeRefused>;
}

/// Why a resize did not happen: an NBD error value (`EINVAL` for a size refused,
/// `ENOSPC` for one that does not fit, `EIO` otherwise) and a message for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResizeRefused {
    pub errno: u32,
    pub message: String,
}

/// Server-wide settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A peer that has not finished the handshake by then is disconnected.
    pub handshake_timeout: Duration,
    /// When set, TCP peers outside these networks are closed before the handshake.
    /// Unix socket peers are governed by the socket file's permissions instead.
    pub allowed_networks: Option<Vec<IpNet>>,
    /// Connections beyond this are closed at once.
    pub max_connections: usize,
    /// Threads serving one connection's requests at most (nbdkit's default is 16).
    /// It bounds the requests served at once and so the request data the server holds
    /// for one connection (at most 32 MiB per thread); more requests wait in the
    /// socket until a thread is free. Threads start as the client's queue grows.
    pub threads_per_connection: usize,
    /// How long the thread waiting for a connection's next request polls the socket
    /// before it sleeps (zero: sleep at once). Polling spends up to this much CPU per
    /// request to spare the client a thread wake-up: at queue depth 1 it took 4k reads
    /// from 12-15k to 30k per second on this project's machines.
    pub busy_poll: Duration,
    /// Send and receive buffer size requested for Unix socket connections (0: the
    /// kernel's default). TCP keeps the kernel's autotuning: fixed 4 MiB buffers on
    /// loopback TCP cut QD1 4k reads about 5x in measurements.
    pub socket_buffer_bytes: usize,
    /// TLS (`NBD_OPT_STARTTLS`): off when `None`; see [`ServerTls`] for whether
    /// plaintext clients are still served.
    pub tls: Option<ServerTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            allowed_networks: None,
            max_connections: 1024,
            threads_per_connection: 8,
            busy_poll: Duration::from_micros(50),
            socket_buffer_bytes: 4 << 20,
            tls: None,
        }
    }
}

/// Errors of the server's management API.
#[derive(Debug, Error)]
pub enum ServerError {
    #[error("an export named {0:?} already exists")]
    ExportExists(String),
    #[error("invalid export name {name:?}: {reason}")]
    InvalidExportName { name: String, reason: &'static str },
    #[error("cannot listen on {address}: {source}")]
    Listen { address: String, source: io::Error },
}

/// Why one connection ended early. Only logged.
#[derive(Debug, Error)]
enum ConnectionError {
    #[error("i/o on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

impl From<ParseError> for ConnectionError {
    fn from(e: ParseError) -> Self {
        ConnectionError::Protocol(e.to_string())
    }
}

#[derive(Debug)]
struct Export {
    name: String,
    device: Arc<dyn BlockDevice>,
    read_only: bool,
    description: String,
    /// `None` for read-only exports.
    resizer: Option<Arc<dyn Resizer>>,
    /// Set to true when the export is removed; its connections watch it.
    removed: watch::Sender<bool>,
}

impl Export {
    fn transmission_flags(&self, structured: bool) -> u16 {
        let mut flags = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            flags |= TFLAG_READ_ONLY;
        } else {
            flags |= TFLAG_SEND_FUA | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if self.resizer.is_some() {
            flags |= TFLAG_SEND_RESIZE;
        }
        if structured {
            // Reads are always answered with one data chunk, so DF is honoured for free.
            flags |= TFLAG_SEND_DF;
        }
        flags
    }
}

struct Inner {
    config: ServerConfig,
    exports: RwLock<BTreeMap<String, Arc<Export>>>,
    shutdown: watch::Sender<bool>,
    connections: Arc<Semaphore>,
}

/// An NBD server. Cloning gives another handle to the same server.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NbdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdServer")
            .field("exports", &self.export_names())
            .finish()
    }
}

/// Stops a server: its listeners stop accepting and its connections are closed.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    tx: watch::Sender<bool>,
}

impl ShutdownHandle {
    pub fn shutdown(&self) {
        self.tx.send_replace(true);
    }
}

/// A file's device and inode: which file a path names now.
fn file_id(meta: &std::fs::Metadata) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    (meta.dev(), meta.ino())
}

impl NbdServer {
    pub fn new(config: ServerConfig) -> NbdServer {
        let connections = Arc::new(Semaphore::new(config.max_connections));
        NbdServer {
            inner: Arc::new(Inner {
                config,
                exports: RwLock::new(BTreeMap::new()),
                shutdown: watch::channel(false).0,
                connections,
            }),
        }
    }

    /// Offers `device` under `name`. New connections can use it at once.
    pub fn add_export(
        &self,
        name: &str,
        device: Arc<dyn BlockDevice>,
        options: ExportOptions,
    ) -> Result<(), ServerError> {
        if name.len() > MAX_STRING_LEN {
            return Err(ServerError::InvalidExportName {
                name: name.into(),
                reason: "longer than 4096 bytes",
            });
        }
        if name.contains('\0') {
            return Err(ServerError::InvalidExportName {
                name: name.into(),
                reason: "contains NUL",
            });
        }
        let mut exports = self.inner.exports.write().unwrap_or_else(|e| e.into_inner());
        if exports.contains_key(name) {
            return Err(ServerError::ExportExists(name.into()));
        }
        let read_only = options.read_only || device.read_only();
        let description = proto_string(options.description);
        let export = Export {
            name: name.into(),
            device,
            read_only,
            description,
            resizer: options.resizer.filter(|_| !read_only),
            removed: watch::channel(false).0,
        };
        exports.insert(name.into(), Arc::new(export));
        Ok(())
    }

    /// Withdraws an export and closes the connections using it. Returns whether it
    /// existed.
    pub fn remove_export(&self, name: &str) -> bool {
        let removed = self
            .inner
            .exports
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(export) => {
                export.removed.send_replace(true);
                true
            }
            None => false,
        }
    }

    /// Names of the current exports, sorted.
    pub fn export_names(&self) -> Vec<String> {
        self.inner
            .exports
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            tx: self.inner.shutdown.clone(),
        }
    }

    /// Same as `shutdown_handle().shutdown()`.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    /// Listens on a TCP address and serves connections in a background task until
    /// shutdown. Returns the bound address (useful with port 0).
    pub async fn listen_tcp(&self, address: SocketAddr) -> Result<SocketAddr, ServerError> {
        let listen_error = |source| ServerError::Listen {
            address: address.to_string(),
            source,
        };
        let socket = if address.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .map_err(listen_error)?;
        socket.set_reuseaddr(true).map_err(listen_error)?;
        socket.bind(address).map_err(listen_error)?;
        let listener = socket.listen(1024).map_err(listen_error)?;
        let local = listener.local_addr().map_err(listen_error)?;
        let server = self.clone();
        tokio::spawn(async move { server.accept_tcp(listener).await });
        Ok(local)
    }

    /// Listens on a Unix socket at `path` (replacing a stale socket file there) and
    /// serves connections in a background task until shutdown, then removes the file.
    pub async fn listen_unix(&self, path: &Path) -> Result<(), ServerError> {
        let listen_error = |source| ServerError::Listen {
            address: path.display().to_string(),
            source,
        };
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if meta.file_type().is_socket() {
                std::fs::remove_file(path).map_err(listen_error)?;
            }
        }
        let listener = UnixListener::bind(path).map_err(listen_error)?;
        // Which file is ours: a server started on the same path after this one stopped
        // (a restart) must not lose its socket when this one's task ends later.
        let bound = std::fs::symlink_metadata(path).map_err(listen_error)?;
        let server = self.clone();
        let path = path.to_path_buf();
        tokio::spawn(async move { server.accept_unix(listener, path, file_id(&bound)).await });
        Ok(())
    }

    async fn accept_tcp(self, listener: TcpListener) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => return,
                a = listener.accept() => a,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    // EMFILE and friends: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if !self.peer_allowed(peer.ip()) {
                tracing::info!(%peer, "NBD connection refused: peer not in the allowed networks");
                drop(stream);
                continue;
            }
            let _ = stream.set_nodelay(true);
            self.spawn_connection(stream, peer.to_string());
        }
    }

    async fn accept_unix(self, listener: UnixListener, path: PathBuf, ours: (u64, u64)) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    set_socket_buffers(&stream, self.inner.config.socket_buffer_bytes);
                    self.spawn_connection(stream, format!("unix:{}", path.display()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| file_id(&m) == ours) {
            let _ = std::fs::remove_file(&path);
        }
    }

    fn peer_allowed(&self, ip: IpAddr) -> bool {
        let Some(nets) = &self.inner.config.allowed_networks else {
            return true;
        };
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(IpAddr::V6(v6)),
            v4 => v4,
        };
        nets.iter().any(|n| n.contains(&ip))
    }

    fn spawn_connection<S: Socket>(&self, stream: S, peer: String) {
        let Ok(slot) = self.inner.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "NBD connection refused: too many connections");
            return;
        };
        let server = self.clone();
        tokio::spawn(async move {
            server.serve(stream, peer).await;
            drop(slot);
        });
    }

    /// Serves one already-connected Unix stream to its end (tests and fuzzing use a
    /// socket pair; listeners do the same for each accepted socket).
    pub async fn serve_connection(&self, stream: UnixStream) {
        self.serve(stream, "stream".into()).await;
    }

    async fn serve<S: Socket>(&self, stream: S, peer: String) {
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return;
        }
        let timeout = self.inner.config.handshake_timeout;
        let negotiated = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            n = tokio::time::timeout(timeout, self.negotiate(stream)) => match n {
                Ok(n) => n,
                Err(_) => Err(ConnectionError::HandshakeTimeout(timeout)),
            },
        };
        let (session, transport) = match negotiated {
            Ok(Some(negotiated)) => negotiated,
            Ok(None) => return,
            // Certificates that do not fit are the operator's to see.
            Err(e @ ConnectionError::Tls(_)) => {
                tracing::info!(peer, error = %e, "NBD client refused");
                return;
            }
            Err(e) => {
                tracing::debug!(peer, error = %e, "NBD handshake ended");
                return;
            }
        };
        match transport {
            Transport::Plain(stream) => {
                // A client may send its first requests without waiting for the
                // handshake's last reply: those bytes are in the buffer and go first.
                let leftover = stream.buffer().to_vec();
                match stream.into_inner().into_blocking() {
                    Ok(socket) => self.transmit(socket, leftover, session, peer).await,
                    Err(e) => {
                        tracing::warn!(peer, error = %e, "NBD connection dropped: cannot make its socket blocking")
                    }
                }
            }
            Transport::Tls(stream) => {
                // The threads run the TLS session themselves (see `tls_socket`).
                let peer = format!("{peer} (TLS)");
                let leftover = stream.buffer().to_vec();
                let (socket, tls) = (*stream).into_inner().into_inner();
                match socket.into_blocking() {
                    Ok(socket) => {
                        self.transmit(TlsSocket::new(socket, tls), leftover, session, peer)
                            .await
                    }
                    Err(e) => {
                        tracing::warn!(peer, error = %e, "NBD connection dropped: cannot make its socket blocking")
                    }
                }
            }
        }
    }

    /// The transmission phase on `socket`, until the client leaves, the export is
    /// removed or the server shuts down.
    async fn transmit<B: BlockingSocket>(&self, socket: B, leftover: Vec<u8>, session: Session, peer: String) {
        let socket = Arc::new(socket);
        let mut shutdown = self.inner.shutdown.subscribe();
        tracing::debug!(peer, export = %session.export.name, "NBD client connected");
        let mut removed = session.export.removed.subscribe();
        let settings = transmission::Settings {
            device: session.export.device.clone(),
            read_only: session.export.read_only,
            resizer: session.export.resizer.clone(),
            structured: session.structured,
            max_threads: self.inner.config.threads_per_connection,
            busy_poll: self.inner.config.busy_poll,
            peer,
        };
        let mut ended = transmission::start(socket.clone(), leftover, settings);
        tokio::select! {
            _ = &mut ended => return,
            _ = shutdown.wait_for(|s| *s) => {}
            _ = removed.wait_for(|r| *r) => {}
        }
        // Blocked receives see end of stream; requests being served finish and are
        // answered, then the last thread closes the socket.
        socket.stop_receiving();
        let _ = ended.await;
    }

    /// The handshake, with TLS when the client asks for it. `None`: the client ended it.
    async fn negotiate<S: Socket>(&self, stream: S) -> Result<Option<(Session, Transport<S>)>, ConnectionError> {
        let mut plain = BufReader::with_capacity(64 << 10, stream);
        let no_zeroes = greet(&mut plain).await?;
        let tls = self.inner.config.tls.as_ref();
        let phase = tls.map_or(TlsPhase::Unavailable, |t| TlsPhase::Offered { required: t.required });
        let acceptor = match self.options(&mut plain, no_zeroes, phase).await? {
            Negotiated::Ended => return Ok(None),
            Negotiated::Session(s) => return Ok(Some((s, Transport::Plain(plain)))),
            // `options` says yes to STARTTLS only in the Offered phase, which needs `tls`.
            Negotiated::StartTls => match tls {
                Some(t) => t.acceptor.clone(),
                None => return Err(ConnectionError::Protocol("TLS started without a configuration".into())),
            },
        };
        if !plain.buffer().is_empty() {
            return Err(ConnectionError::Protocol(
                "data after NBD_OPT_STARTTLS before its reply".into(),
            ));
        }
        let stream = acceptor
            .accept(plain.into_inner())
            .await
            .map_err(ConnectionError::Tls)?;
        let (_, session) = stream.get_ref();
        tracing::debug!(
            version = ?session.protocol_version(),
            suite = ?session.negotiated_cipher_suite().map(|s| s.suite()),
            "NBD TLS session established"
        );
        let mut secure = BufReader::with_capacity(64 << 10, stream);
        match self.options(&mut secure, no_zeroes, TlsPhase::Done).await? {
            Negotiated::Session(s) => Ok(Some((s, Transport::Tls(Box::new(secure))))),
            Negotiated::Ended => Ok(None),
            Negotiated::StartTls => Err(ConnectionError::Protocol("TLS negotiated twice".into())),
        }
    }

    fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let exports = self.inner.exports.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = exports.get(name) {
            return Some(e.clone());
        }
        // The empty name is the default export: the only one, when there is only one.
        if name.is_empty() && exports.len() == 1 {
            return exports.values().next().cloned();
        }
        None
    }

    /// Runs the option haggling after the greeting, in the given TLS phase.
    async fn options<S>(
        &self,
        r: &mut BufReader<S>,
        no_zeroes: bool,
        phase: TlsPhase,
    ) -> Result<Negotiated, ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let tls_required = matches!(phase, TlsPhase::Offered { required: true });
        let mut structured = false;
        let mut out = Vec::with_capacity(1024);
        let mut payload = Vec::new();
        // Enough for any sane client; bounds the work a peer can cause in the handshake.
        for _ in 0..64 {
            let mut header = [0u8; OPTION_HEADER_LEN];
            r.read_exact(&mut header).await?;
            let header = parse_option_header(&header)?;
            payload.resize(header.len as usize, 0);
            r.read_exact(&mut payload).await?;
            out.clear();
            let option = header.option;
            match option {
                OPT_STARTTLS if !payload.is_empty() => {
                    encode_option_reply(&mut out, option, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
                }
                OPT_STARTTLS => match phase {
                    TlsPhase::Unavailable => {
                        encode_option_reply(&mut out, option, REP_ERR_UNSUP, b"TLS is not configured on this server");
                    }
                    TlsPhase::Done => {
                        encode_option_reply(&mut out, option, REP_ERR_INVALID, b"TLS is already on");
                    }
                    TlsPhase::Offered { .. } => {
                        encode_option_reply(&mut out, option, REP_ACK, &[]);
                        r.get_mut().write_all(&out).await?;
                        r.get_mut().flush().await?;
                        return Ok(Negotiated::StartTls);
                    }
                },
                OPT_EXPORT_NAME if tls_required => {
                    // As with an unknown name, the only refusal EXPORT_NAME allows is to hang up.
                    return Err(ConnectionError::Protocol(
                        "NBD_OPT_EXPORT_NAME before the required TLS".into(),
                    ));
                }
                OPT_ABORT => {
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                    // The client may already have gone; that is fine.
                    let _ = r.get_mut().write_all(&out).await;
                    let _ = r.get_mut().flush().await;
                    return Ok(Negotiated::Ended);
                }
                _ if tls_required => {
                    encode_option_reply(
                        &mut out,
                        option,
                        REP_ERR_TLS_REQD,
                        b"this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                }
                OPT_EXPORT_NAME => {
                    let name = parse_export_name(&payload)?;
                    let Some(export) = self.lookup(name) else {
                        // The protocol has no way to refuse EXPORT_NAME but to hang up.
                        return Err(ConnectionError::Protocol(format!("unknown export {name:?}")));
                    };
                    let mut reply = [0u8; EXPORT_NAME_REPLY_LEN];
                    let flags = export.transmission_flags(structured);
                    let n = encode_export_name_reply(&mut reply, export.device.size(), flags, no_zeroes);
                    r.get_mut().write_all(&reply[..n]).await?;
                    r.get_mut().flush().await?;
                    return Ok(Negotiated::Session(Session { export, structured }));
                }
                OPT_LIST if !payload.is_empty() => {
                    encode_option_reply(&mut out, option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                }
                OPT_LIST => {
                    let exports: Vec<Arc<Export>> = self
                        .inner
                        .exports
                        .read()
                        .unwrap_or_else(|e| e.into_inner())
                        .values()
                        .cloned()
                        .collect();
                    for e in exports {
                        encode_option_reply(
                            &mut out,
                            option,
                            REP_SERVER,
                            &encode_rep_server(&e.name, &e.description),
                        );
                    }
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                }
                OPT_STRUCTURED_REPLY if !payload.is_empty() => {
                    encode_option_reply(
                        &mut out,
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                }
                OPT_STRUCTURED_REPLY => {
                    structured = true;
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                }
                OPT_INFO | OPT_GO => match parse_info_request(&payload) {
                    Err(e) => encode_option_reply(&mut out, option, REP_ERR_INVALID, e.to_string().as_bytes()),
                    Ok(request) => match self.lookup(request.name) {
                        None => {
                            let message = format!("no export named {:?}", request.name);
                            encode_option_reply(&mut out, option, REP_ERR_UNKNOWN, message.as_bytes());
                        }
                        Some(export) => {
                            let flags = export.transmission_flags(structured);
                            let size = export.device.size();
                            encode_option_reply(&mut out, option, REP_INFO, &encode_info_export(size, flags));
                            let block = encode_info_block_size(1, 4096, MAX_REQUEST_LEN);
                            encode_option_reply(&mut out, option, REP_INFO, &block);
                            if request.requests.contains(&INFO_NAME) {
                                let name = encode_info_string(INFO_NAME, &export.name);
                                encode_option_reply(&mut out, option, REP_INFO, &name);
                            }
                            if request.requests.contains(&INFO_DESCRIPTION) && !export.description.is_empty() {
                                let d = encode_info_string(INFO_DESCRIPTION, &export.description);
                                encode_option_reply(&mut out, option, REP_INFO, &d);
                            }
                            encode_option_reply(&mut out, option, REP_ACK, &[]);
                            if option == OPT_GO {
                                r.get_mut().write_all(&out).await?;
                                r.get_mut().flush().await?;
                                return Ok(Negotiated::Session(Session { export, structured }));
                            }
                        }
                    },
                },
                _ => {
                    let message = format!("option {option} is not supported");
                    encode_option_reply(&mut out, option, REP_ERR_UNSUP, message.as_bytes());
                }
            }
            r.get_mut().write_all(&out).await?;
            r.get_mut().flush().await?;
        }
        Err(ConnectionError::Protocol("too many options".into()))
    }
}

/// Cuts a description to the protocol's string limit.
fn proto_string(mut s: String) -> String {
    s.retain(|c| c != '\0');
    if s.len() > MAX_STRING_LEN {
        let mut end = MAX_STRING_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

fn set_socket_buffers(socket: &impl AsRawFd, bytes: usize) {
    if bytes == 0 {
        return;
    }
    let value = bytes.min(i32::MAX as usize) as libc::c_int;
    for option in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
        // SAFETY: setsockopt on a socket we own, with a pointer to a live c_int and its
        // size. Failure only leaves the kernel's default, so the result is ignored.
        unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                option,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

struct Session {
    export: Arc<Export>,
    structured: bool,
}

/// Where the option haggling stands with TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TlsPhase {
    /// The server has no TLS configuration.
    Unavailable,
    /// Before `NBD_OPT_STARTTLS`; with `required`, nothing else is served.
    Offered { required: bool },
    /// Options now run inside TLS.
    Done,
}

/// How the option haggling ended.
enum Negotiated {
    Session(Session),
    /// The client asked for TLS and was told yes: the TLS handshake comes next.
    StartTls,
    /// The client aborted.
    Ended,
}

/// The stream the transmission phase runs on (with what the handshake read ahead).
enum Transport<S> {
    Plain(BufReader<S>),
    Tls(Box<BufReader<tokio_rustls::server::TlsStream<S>>>),
}

/// Reads the client's flags after sending the greeting. Returns whether the client
/// takes replies without zero padding.
async fn greet<S>(r: &mut BufReader<S>) -> Result<bool, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    r.get_mut()
        .write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    r.get_mut().flush().await?;
    let mut client_flags = [0u8; 4];
    r.read_exact(&mut client_flags).await?;
    let client_flags = u32::from_be_bytes(client_flags);
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(ConnectionError::Protocol("client does not speak fixed newstyle".into()));
    }
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ConnectionError::Protocol(format!(
            "unknown client flags {client_flags:#x}"
        )));
    }
    Ok(client_flags & FLAG_C_NO_ZEROES != 0)
}

/// A socket a connection is accepted on: the handshake runs on it asynchronously,
/// the transmission phase on its blocking twin.
trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    type Blocking: BlockingSocket;
    fn into_blocking(self) -> io::Result<Self::Blocking>;
}

macro_rules! socket {
    ($async:ty => $blocking:ty) => {
        impl Socket for $async {
            type Blocking = $blocking;
            fn into_blocking(self) -> io::Result<Self::Blocking> {
                let s = self.into_std()?;
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(transmission::SEND_TIMEOUT))?;
                Ok(s)
            }
        }
    };
}
socket!(TcpStream => std::net::TcpStream);
socket!(UnixStream => std::os::unix::net::UnixStream);
