//! The NBD server: a table of named exports, changeable while connections are open,
//! served on any number of TCP and Unix listeners.
//!
//! Each connection is one task. It runs the fixed-newstyle handshake under a timeout,
//! then reads requests continuously: every request takes permits from a per-connection
//! budget of in-flight bytes (so a client cannot make the server buffer without bound),
//! its I/O runs on the blocking pool (or inline for small requests when configured),
//! and its reply goes through a channel to one writer task, which sends whatever
//! replies are ready with one vectored write.

use std::collections::BTreeMap;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use ipnet::IpNet;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

use super::proto::{self, *};
use crate::device::BlockDevice;

/// How an export is offered.
#[derive(Debug, Clone, Default)]
pub struct ExportOptions {
    /// Refuse writes even if the device accepts them.
    pub read_only: bool,
    /// Shown by `nbdinfo --list` and sent as `NBD_INFO_DESCRIPTION`.
    pub description: String,
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
    /// Bytes of request and reply data one connection may have in flight.
    pub max_in_flight_bytes: usize,
    /// Reads and writes of at most this many bytes run on the connection's task
    /// instead of the blocking pool. On this project's machines that is 2-10x the
    /// 4k IOPS of the blocking pool (no thread hand-off per request) for devices whose
    /// I/O is a page-cache copy; larger requests do better spread over the pool.
    /// Set 0 for devices whose small I/O may wait long (an `NbdDevice`, a cold disk),
    /// so one slow request cannot stall the runtime thread.
    pub inline_io_max: u32,
    /// Send and receive buffer size requested for Unix socket connections (0: the
    /// kernel's default). TCP keeps the kernel's autotuning: fixed 4 MiB buffers on
    /// loopback TCP cut QD1 4k reads about 5x in measurements.
    pub socket_buffer_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            allowed_networks: None,
            max_connections: 1024,
            max_in_flight_bytes: 128 << 20,
            inline_io_max: 64 << 10,
            socket_buffer_bytes: 4 << 20,
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
        let server = self.clone();
        let path = path.to_path_buf();
        tokio::spawn(async move { server.accept_unix(listener, path).await });
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
            let (r, w) = stream.into_split();
            self.spawn_connection(r, w, peer.to_string());
        }
    }

    async fn accept_unix(self, listener: UnixListener, path: PathBuf) {
        let mut shutdown = self.inner.shutdown.subscribe();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.wait_for(|s| *s) => break,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    set_socket_buffers(&stream, self.inner.config.socket_buffer_bytes);
                    let (r, w) = stream.into_split();
                    self.spawn_connection(r, w, format!("unix:{}", path.display()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "NBD accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        let _ = std::fs::remove_file(&path);
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

    fn spawn_connection<R, W>(&self, r: R, w: W, peer: String)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let Ok(slot) = self.inner.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "NBD connection refused: too many connections");
            return;
        };
        let server = self.clone();
        tokio::spawn(async move {
            server.serve_halves(r, w, &peer).await;
            drop(slot);
        });
    }

    /// Serves one already-connected stream to its end (used for in-memory streams in
    /// tests and fuzzing; listeners do the same for each accepted socket).
    pub async fn serve_connection<S>(&self, stream: S)
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.serve_halves(r, w, "stream").await;
    }

    async fn serve_halves<R, W>(&self, r: R, mut w: W, peer: &str)
    where
        R: AsyncRead + Unpin + Send + 'static,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let mut shutdown = self.inner.shutdown.subscribe();
        if *shutdown.borrow() {
            return;
        }
        let mut reader = BufReader::with_capacity(256 << 10, r);
        let timeout = self.inner.config.handshake_timeout;
        let handshake = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => return,
            h = tokio::time::timeout(timeout, self.handshake(&mut reader, &mut w)) => match h {
                Ok(h) => h,
                Err(_) => Err(ConnectionError::HandshakeTimeout(timeout)),
            },
        };
        let session = match handshake {
            Ok(Some(session)) => session,
            Ok(None) => return,
            Err(e) => {
                tracing::debug!(peer, error = %e, "NBD handshake ended");
                return;
            }
        };
        tracing::debug!(peer, export = %session.export.name, "NBD client connected");
        let mut removed = session.export.removed.subscribe();
        let result = tokio::select! {
            _ = shutdown.wait_for(|s| *s) => Ok(()),
            _ = removed.wait_for(|r| *r) => Ok(()),
            r = transmission(reader, w, session, &self.inner.config) => r,
        };
        if let Err(e) = result {
            tracing::debug!(peer, error = %e, "NBD connection ended");
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

    /// Runs the option haggling. `None` means the client ended it (abort, or closed).
    async fn handshake<R, W>(&self, r: &mut R, w: &mut W) -> Result<Option<Session>, ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        w.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
            .await?;
        w.flush().await?;
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
        let no_zeroes = client_flags & FLAG_C_NO_ZEROES != 0;
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
                OPT_EXPORT_NAME => {
                    let name = parse_export_name(&payload)?;
                    let Some(export) = self.lookup(name) else {
                        // The protocol has no way to refuse EXPORT_NAME but to hang up.
                        return Err(ConnectionError::Protocol(format!("unknown export {name:?}")));
                    };
                    let mut reply = [0u8; EXPORT_NAME_REPLY_LEN];
                    let flags = export.transmission_flags(structured);
                    let n = encode_export_name_reply(&mut reply, export.device.size(), flags, no_zeroes);
                    w.write_all(&reply[..n]).await?;
                    w.flush().await?;
                    return Ok(Some(Session { export, structured }));
                }
                OPT_ABORT => {
                    encode_option_reply(&mut out, option, REP_ACK, &[]);
                    // The client may already have gone; that is fine.
                    let _ = w.write_all(&out).await;
                    let _ = w.flush().await;
                    return Ok(None);
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
                                w.write_all(&out).await?;
                                w.flush().await?;
                                return Ok(Some(Session { export, structured }));
                            }
                        }
                    },
                },
                _ => {
                    let message = format!("option {option} is not supported");
                    encode_option_reply(&mut out, option, REP_ERR_UNSUP, message.as_bytes());
                }
            }
            w.write_all(&out).await?;
            w.flush().await?;
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

/// Data buffers reused across requests of a connection, so steady-state I/O does not
/// allocate.
#[derive(Default)]
struct BufferPool {
    free: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    const KEEP: usize = 64;
    const KEEP_CAPACITY: usize = 4 << 20;

    /// A buffer of exactly `len` bytes (contents unspecified but initialized).
    fn take(&self, len: usize) -> Vec<u8> {
        let reused = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let mut buf = reused.unwrap_or_default();
        if buf.len() < len {
            buf.resize(len, 0);
        } else {
            buf.truncate(len);
        }
        buf
    }

    fn give(&self, buf: Vec<u8>) {
        if buf.capacity() > Self::KEEP_CAPACITY {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < Self::KEEP {
            free.push(buf);
        }
    }
}

/// What the writer task sends for one request.
struct Reply {
    cookie: u64,
    command: u16,
    error: u32,
    /// Read data, for a successful read. Other buffers ride along to be given back.
    data: Option<Vec<u8>>,
    offset: u64,
    /// Returned to the connection's in-flight budget once the reply is written.
    _permit: Option<OwnedSemaphorePermit>,
}

const PERMIT_UNIT: usize = 4096;

fn permits_for(len: u32) -> u32 {
    (len as usize).div_ceil(PERMIT_UNIT).max(1) as u32
}

struct Transmission {
    device: Arc<dyn BlockDevice>,
    size: u64,
    read_only: bool,
    structured: bool,
    pool: Arc<BufferPool>,
    replies: mpsc::UnboundedSender<Reply>,
    inline_io_max: u32,
}

const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn transmission<R, W>(
    mut reader: BufReader<R>,
    writer: W,
    session: Session,
    config: &ServerConfig,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let pool = Arc::new(BufferPool::default());
    let structured = session.structured;
    let mut writer_task = tokio::spawn(write_replies(writer, rx, pool.clone(), structured));
    // If this future is dropped (export removed, server shut down), so is the writer.
    let _abort_writer = AbortOnDrop(writer_task.abort_handle());
    let budget_permits = (config.max_in_flight_bytes / PERMIT_UNIT).max(permits_for(MAX_REQUEST_LEN) as usize);
    let budget = Arc::new(Semaphore::new(budget_permits));
    let t = Transmission {
        size: session.export.device.size(),
        device: session.export.device.clone(),
        read_only: session.export.read_only,
        structured,
        pool,
        replies: tx,
        inline_io_max: config.inline_io_max,
    };
    let read_result = tokio::select! {
        r = read_requests(&mut reader, &t, &budget) => r,
        // The writer only ends early when the socket fails.
        w = &mut writer_task => return match w {
            Ok(r) => r.map_err(ConnectionError::from),
            Err(e) => Err(ConnectionError::Protocol(format!("reply writer failed: {e}"))),
        },
    };
    // Let in-flight requests finish and their replies go out before closing, but do
    // not wait forever on a peer that stopped reading.
    drop(t);
    let write_result = match tokio::time::timeout(DRAIN_TIMEOUT, writer_task).await {
        Ok(Ok(r)) => r.map_err(ConnectionError::from),
        Ok(Err(e)) => Err(ConnectionError::Protocol(format!("reply writer failed: {e}"))),
        Err(_) => Err(ConnectionError::Protocol("peer did not read its last replies".into())),
    };
    read_result.and(write_result)
}

async fn read_requests<R>(
    reader: &mut BufReader<R>,
    t: &Transmission,
    budget: &Arc<Semaphore>,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
{
    let mut header = [0u8; REQUEST_LEN];
    loop {
        match reader.read_exact(&mut header).await {
            Ok(_) => {}
            // A client that hangs up without NBD_CMD_DISC is rude but common.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let request = parse_request(&header)?;
        if request.command == CMD_DISC {
            return Ok(());
        }
        let payload_len = if request.command == CMD_WRITE { request.len } else { 0 };
        let data_len = if request.command == CMD_READ || request.command == CMD_WRITE {
            request.len
        } else {
            0
        };
        if let Some(error) = t.refusal(&request) {
            // Refused writes still carry their data, which must be skipped to stay in step.
            skip(reader, payload_len).await?;
            t.reply(Reply {
                cookie: request.cookie,
                command: request.command,
                error,
                data: None,
                offset: 0,
                _permit: None,
            });
            continue;
        }
        let permit = budget
            .clone()
            .acquire_many_owned(permits_for(data_len))
            .await
            .map_err(|_| ConnectionError::Protocol("in-flight budget closed".into()))?;
        let is_io = request.command == CMD_READ || request.command == CMD_WRITE;
        let mut data = if is_io {
            Some(t.pool.take(data_len as usize))
        } else {
            None
        };
        if let Some(buf) = data.as_mut().filter(|_| request.command == CMD_WRITE) {
            reader.read_exact(buf).await?;
        }
        let job = Job { request, data, permit };
        if is_io && data_len <= t.inline_io_max {
            t.reply(job.run(&*t.device));
        } else {
            let device = t.device.clone();
            let replies = t.replies.clone();
            tokio::task::spawn_blocking(move || {
                let _ = replies.send(job.run(&*device));
            });
        }
    }
}

async fn skip<R: AsyncRead + Unpin>(reader: &mut R, mut len: u32) -> io::Result<()> {
    let mut sink = [0u8; 8192];
    while len > 0 {
        let n = (len as usize).min(sink.len());
        reader.read_exact(&mut sink[..n]).await?;
        len -= n as u32;
    }
    Ok(())
}

impl Transmission {
    fn reply(&self, reply: Reply) {
        // Fails only when the writer is gone, which ends the connection anyway.
        let _ = self.replies.send(reply);
    }

    /// The error value for a request that must not run, or `None` if it may.
    fn refusal(&self, r: &Request) -> Option<u32> {
        let allowed_flags = match r.command {
            CMD_READ => CMD_FLAG_FUA | if self.structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => return Some(EINVAL),
        };
        if r.flags & !allowed_flags != 0 {
            return Some(EINVAL);
        }
        if (r.command == CMD_READ || r.command == CMD_WRITE) && r.len > MAX_REQUEST_LEN {
            return Some(EINVAL);
        }
        if r.command == CMD_FLUSH {
            return if r.offset == 0 && r.len == 0 {
                None
            } else {
                Some(EINVAL)
            };
        }
        let writes = r.command != CMD_READ;
        if writes && self.read_only {
            return Some(EPERM);
        }
        match r.offset.checked_add(u64::from(r.len)) {
            Some(end) if end <= self.size => None,
            // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
            _ if r.command == CMD_WRITE || r.command == CMD_WRITE_ZEROES => Some(ENOSPC),
            _ => Some(EINVAL),
        }
    }
}

struct Job {
    request: Request,
    data: Option<Vec<u8>>,
    permit: OwnedSemaphorePermit,
}

impl Job {
    fn run(self, device: &dyn BlockDevice) -> Reply {
        let Job {
            request: r,
            mut data,
            permit,
        } = self;
        let fua = r.flags & CMD_FLAG_FUA != 0;
        let result = match r.command {
            CMD_READ => match data.as_mut() {
                Some(buf) => device.read_at(buf, r.offset),
                None => Ok(()),
            },
            CMD_WRITE => match data.as_ref() {
                Some(buf) => device.write_at(buf, r.offset),
                None => Ok(()),
            },
            CMD_FLUSH => device.flush(),
            CMD_TRIM => device.discard(r.offset, r.len.into()),
            CMD_WRITE_ZEROES => device.write_zeroes(r.offset, r.len.into(), r.flags & CMD_FLAG_NO_HOLE == 0),
            _ => Err(io::Error::from_raw_os_error(libc::EINVAL)),
        };
        let result = if fua && r.command != CMD_READ && result.is_ok() {
            device.flush()
        } else {
            result
        };
        let error = match &result {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(command = proto::command_name(r.command), offset = r.offset, len = r.len, error = %e, "NBD request failed");
                error_value(e)
            }
        };
        Reply {
            cookie: r.cookie,
            command: r.command,
            error,
            data,
            offset: r.offset,
            _permit: Some(permit),
        }
    }
}

fn error_message(error: u32) -> &'static str {
    match error {
        EPERM => "operation not permitted (read-only export)",
        EINVAL => "invalid request (bad range, length, flags or command)",
        ENOSPC => "request beyond the end of the export",
        ENOMEM => "out of memory",
        ENOTSUP => "not supported",
        _ => "I/O error",
    }
}

/// Writes replies as they come, batching all that are ready into one vectored write.
async fn write_replies<W>(
    mut w: W,
    mut rx: mpsc::UnboundedReceiver<Reply>,
    pool: Arc<BufferPool>,
    structured: bool,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    // Small payloads are copied next to their headers; larger ones are sent from their
    // own buffers so a 32 MiB read is never copied.
    const COPY_MAX: usize = 16 << 10;
    let mut batch: Vec<Reply> = Vec::with_capacity(64);
    let mut out: Vec<u8> = Vec::with_capacity(256 << 10);
    // (start, end) in `out`, or usize::MAX and the index of the reply whose data to send.
    let mut segments: Vec<(usize, usize)> = Vec::with_capacity(128);
    loop {
        if rx.recv_many(&mut batch, 64).await == 0 {
            break;
        }
        out.clear();
        segments.clear();
        let mut mark = 0;
        for (i, reply) in batch.iter().enumerate() {
            let data = reply
                .data
                .as_deref()
                .filter(|_| reply.command == CMD_READ && reply.error == 0);
            match (data, structured && reply.command == CMD_READ) {
                (Some([]), true) => out.extend_from_slice(&encode_structured_header(
                    REPLY_FLAG_DONE,
                    REPLY_TYPE_NONE,
                    reply.cookie,
                    0,
                )),
                (Some(d), true) => {
                    out.extend_from_slice(&encode_read_data_header(reply.cookie, reply.offset, d.len() as u32))
                }
                (Some(_), false) => out.extend_from_slice(&encode_simple_reply(0, reply.cookie)),
                (None, true) => {
                    encode_structured_error(&mut out, reply.cookie, reply.error, error_message(reply.error))
                }
                (None, false) => out.extend_from_slice(&encode_simple_reply(reply.error, reply.cookie)),
            }
            if let Some(d) = data {
                if d.len() <= COPY_MAX {
                    out.extend_from_slice(d);
                } else {
                    segments.push((mark, out.len()));
                    segments.push((usize::MAX, i));
                    mark = out.len();
                }
            }
        }
        segments.push((mark, out.len()));
        {
            let mut slices: Vec<IoSlice<'_>> = segments
                .iter()
                .filter(|(a, b)| *a == usize::MAX || a < b)
                .map(|&(a, b)| {
                    if a == usize::MAX {
                        IoSlice::new(batch[b].data.as_deref().unwrap_or_default())
                    } else {
                        IoSlice::new(&out[a..b])
                    }
                })
                .collect();
            write_all_vectored(&mut w, &mut slices).await?;
        }
        for reply in batch.drain(..) {
            if let Some(buf) = reply.data {
                pool.give(buf);
            }
        }
    }
    w.flush().await?;
    w.shutdown().await
}

/// Writes every slice, in as few system calls as the socket allows.
pub(crate) async fn write_all_vectored<W: AsyncWrite + Unpin>(
    w: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped accepting data"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
