//! The NBD client: [`NbdClient`] speaks to one export over TCP or a Unix socket with
//! many requests in flight, and [`NbdDevice`] wraps it as a synchronous
//! [`BlockDevice`] that reconnects when the server goes away for a while.

use std::collections::HashMap;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::oneshot;

use super::proto::*;
use super::tls::ClientTls;
use crate::device::{check_range, BlockDevice};
use crate::lock;

/// Where an NBD server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddress {
    /// `host:port`.
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for NbdAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NbdAddress::Tcp(a) => write!(f, "nbd://{a}"),
            NbdAddress::Unix(p) => write!(f, "nbd+unix://?socket={}", p.display()),
        }
    }
}

/// Errors of the NBD client.
#[derive(Debug, Error, Clone)]
pub enum ClientError {
    #[error("cannot connect to {address}: {message}")]
    Connect { address: String, message: String },
    #[error("connection to the NBD server failed: {0}")]
    Io(String),
    #[error("the NBD server broke the protocol: {0}")]
    Protocol(String),
    #[error("the NBD server refused option {option}: {message} (reply {reply_type:#x})")]
    OptionRefused {
        option: u32,
        reply_type: u32,
        message: String,
    },
    #[error("the NBD server has no export {0:?}")]
    UnknownExport(String),
    #[error("the NBD server failed the {command} request: error {errno} {message}")]
    Request {
        command: &'static str,
        errno: u32,
        message: String,
    },
    #[error("the connection to the NBD server is closed")]
    Closed,
    #[error("the export is read-only")]
    ReadOnly,
    #[error("the export shrank from {was} to {now} bytes while reconnecting")]
    Shrunk { was: u64, now: u64 },
    #[error("the NBD server does not offer resizing this export (no NBD_FLAG_SEND_RESIZE)")]
    ResizeUnsupported,
}

impl ClientError {
    /// True when the connection itself failed (so reconnecting may help), false when
    /// the server answered with an error.
    pub fn is_connection_error(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Io(_) | ClientError::Closed | ClientError::Protocol(_)
        )
    }

    fn to_io(&self) -> io::Error {
        let errno = match self {
            ClientError::Request { errno, .. } => match *errno {
                EPERM => libc::EPERM,
                EINVAL => libc::EINVAL,
                ENOSPC => libc::ENOSPC,
                ENOMEM => libc::ENOMEM,
                EOVERFLOW => libc::EOVERFLOW,
                ENOTSUP => libc::EOPNOTSUPP,
                _ => libc::EIO,
            },
            ClientError::ReadOnly => libc::EPERM,
            _ => libc::EIO,
        };
        io::Error::new(io::Error::from_raw_os_error(errno).kind(), self.to_string())
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e.to_string())
    }
}

impl From<ParseError> for ClientError {
    fn from(e: ParseError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

type Completion = oneshot::Sender<Result<Vec<u8>, ClientError>>;

struct Pending {
    command: u16,
    offset: u64,
    /// For reads: the buffer being filled (zeroed, so holes need no work).
    buf: Vec<u8>,
    /// First error chunk of a structured reply.
    error: Option<ClientError>,
    done: Completion,
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;

struct Connection {
    writer: tokio::sync::Mutex<Writer>,
    pending: Mutex<HashMap<u64, Pending>>,
    closed: AtomicBool,
    /// Woken when `closed` is set.
    ended: tokio::sync::Notify,
    next_cookie: AtomicU64,
    reader: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Connection {
    /// Fails every request still waiting; the connection is unusable from now on.
    fn fail_all(&self, error: ClientError) {
        self.closed.store(true, Ordering::SeqCst);
        self.ended.notify_waiters();
        let pending: Vec<Pending> = self
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain()
            .map(|(_, p)| p)
            .collect();
        for p in pending {
            let _ = p.done.send(Err(error.clone()));
        }
    }
}

/// What the server said about the export during the handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub structured_replies: bool,
    pub description: Option<String>,
    /// Largest request the server accepts.
    pub max_request: u32,
}

/// An async client connection to one NBD export.
pub struct NbdClient {
    conn: Arc<Connection>,
    info: ExportInfo,
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient").field("info", &self.info).finish()
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        self.close();
    }
}

impl NbdClient {
    /// Connects, negotiates structured replies and opens `export` with `NBD_OPT_GO`.
    pub async fn connect(address: &NbdAddress, export: &str) -> Result<NbdClient, ClientError> {
        Self::connect_with(address, export, None).await
    }

    /// As [`NbdClient::connect`], inside TLS (`NBD_OPT_STARTTLS` first) when `tls` is given.
    pub async fn connect_with(
        address: &NbdAddress,
        export: &str,
        tls: Option<&ClientTls>,
    ) -> Result<NbdClient, ClientError> {
        let connect_error = |e: io::Error| ClientError::Connect {
            address: address.to_string(),
            message: e.to_string(),
        };
        match address {
            NbdAddress::Tcp(a) => {
                let s = tokio::net::TcpStream::connect(a.as_str())
                    .await
                    .map_err(connect_error)?;
                s.set_nodelay(true).map_err(connect_error)?;
                match tls {
                    Some(tls) => Self::start_tls(s, export, tls, Some(tcp_host(a)), address).await,
                    None => {
                        let (r, w) = s.into_split();
                        Self::handshake(r, Box::new(w), export, false).await
                    }
                }
            }
            NbdAddress::Unix(p) => {
                let s = tokio::net::UnixStream::connect(p).await.map_err(connect_error)?;
                match tls {
                    Some(tls) => Self::start_tls(s, export, tls, None, address).await,
                    None => {
                        let (r, w) = s.into_split();
                        Self::handshake(r, Box::new(w), export, false).await
                    }
                }
            }
        }
    }

    /// Runs the handshake on an already-connected stream.
    pub async fn connect_stream<S>(stream: S, export: &str) -> Result<NbdClient, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        Self::handshake(r, Box::new(w), export, false).await
    }

    /// Greets, asks for TLS, verifies the server's certificate and runs the rest of
    /// the handshake inside TLS.
    async fn start_tls<S>(
        mut s: S,
        export: &str,
        tls: &ClientTls,
        host: Option<&str>,
        address: &NbdAddress,
    ) -> Result<NbdClient, ClientError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Unbuffered until TLS starts: nothing past the option reply may be read here.
        let mut greeting = [0u8; GREETING_LEN];
        s.read_exact(&mut greeting).await?;
        let mut out = client_flags(&greeting)?.to_be_bytes().to_vec();
        encode_option(&mut out, OPT_STARTTLS, &[]);
        s.write_all(&out).await?;
        s.flush().await?;
        let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
        s.read_exact(&mut header).await?;
        let header = parse_option_reply_header(&header)?;
        let mut payload = vec![0; header.len as usize];
        s.read_exact(&mut payload).await?;
        match (header.option, header.reply_type) {
            (OPT_STARTTLS, REP_ACK) if payload.is_empty() => {}
            (option, t) if is_error_reply(t) => {
                let said = String::from_utf8_lossy(&payload);
                return Err(ClientError::OptionRefused {
                    option,
                    reply_type: t,
                    message: format!("the server does not start TLS (NBD_OPT_STARTTLS): {said}"),
                });
            }
            (option, t) => {
                return Err(ClientError::Protocol(format!(
                    "unexpected reply {t:#x} to option {option}"
                )))
            }
        }
        let tls_error = |message: String| ClientError::Connect {
            address: address.to_string(),
            message: format!("TLS: {message}"),
        };
        let name = tls.server_name(host).map_err(|e| tls_error(e.to_string()))?;
        let stream = tls
            .connector
            .connect(name, s)
            .await
            .map_err(|e| tls_error(e.to_string()))?;
        let (r, w) = tokio::io::split(stream);
        Self::handshake(r, Box::new(w), export, true).await
    }

    /// The handshake from the greeting (or, once `greeted`, from the options on).
    async fn handshake<R>(r: R, mut w: Writer, export: &str, greeted: bool) -> Result<NbdClient, ClientError>
    where
        R: AsyncRead + Unpin + Send + 'static,
    {
        let mut r = BufReader::with_capacity(256 << 10, r);
        let mut out = Vec::new();
        if !greeted {
            let mut greeting = [0u8; GREETING_LEN];
            r.read_exact(&mut greeting).await?;
            out.extend_from_slice(&client_flags(&greeting)?.to_be_bytes());
        }
        encode_option(&mut out, OPT_STRUCTURED_REPLY, &[]);
        encode_option(
            &mut out,
            OPT_GO,
            &encode_info_request(export, &[INFO_BLOCK_SIZE, INFO_DESCRIPTION]),
        );
        w.write_all(&out).await?;
        w.flush().await?;

        let mut structured = false;
        let mut info = ExportInfo {
            size: 0,
            flags: 0,
            structured_replies: false,
            description: None,
            max_request: MAX_REQUEST_LEN,
        };
        let mut got_export = false;
        let mut payload = Vec::new();
        loop {
            let mut header = [0u8; OPTION_REPLY_HEADER_LEN];
            r.read_exact(&mut header).await?;
            let header = parse_option_reply_header(&header)?;
            payload.resize(header.len as usize, 0);
            r.read_exact(&mut payload).await?;
            match (header.option, header.reply_type) {
                (OPT_STRUCTURED_REPLY, REP_ACK) => structured = true,
                // Without structured replies the simple ones still work.
                (OPT_STRUCTURED_REPLY, t) if is_error_reply(t) => {}
                (OPT_GO, REP_INFO) => match parse_info_reply(&payload)? {
                    Info::Export { size, flags } => {
                        info.size = size;
                        info.flags = flags;
                        got_export = true;
                    }
                    Info::BlockSize { maximum, .. } => info.max_request = maximum.clamp(512, MAX_REQUEST_LEN),
                    Info::Description(d) => info.description = Some(d),
                    Info::Name(_) | Info::Unknown(_) => {}
                },
                (OPT_GO, REP_ACK) => break,
                (OPT_GO, REP_ERR_UNKNOWN) => return Err(ClientError::UnknownExport(export.to_string())),
                (option, t) if is_error_reply(t) => {
                    let message = String::from_utf8_lossy(&payload).into_owned();
                    return Err(ClientError::OptionRefused {
                        option,
                        reply_type: t,
                        message,
                    });
                }
                (option, t) => {
                    return Err(ClientError::Protocol(format!(
                        "unexpected reply {t:#x} to option {option}"
                    )));
                }
            }
        }
        if !got_export {
            return Err(ClientError::Protocol(
                "NBD_OPT_GO succeeded without NBD_INFO_EXPORT".into(),
            ));
        }
        info.structured_replies = structured;
        let conn = Arc::new(Connection {
            writer: tokio::sync::Mutex::new(w),
            pending: Mutex::new(HashMap::new()),
            closed: AtomicBool::new(false),
            ended: tokio::sync::Notify::new(),
            next_cookie: AtomicU64::new(1),
            reader: Mutex::new(None),
        });
        let reader_conn = conn.clone();
        let reader = tokio::spawn(async move {
            let error = match read_replies(&mut r, &reader_conn).await {
                Ok(()) => ClientError::Closed,
                Err(e) => e,
            };
            reader_conn.fail_all(error);
        });
        *conn.reader.lock().unwrap_or_else(|e| e.into_inner()) = Some(reader);
        Ok(NbdClient { conn, info })
    }

    pub fn info(&self) -> &ExportInfo {
        &self.info
    }
    pub fn size(&self) -> u64 {
        self.info.size
    }
    pub fn read_only(&self) -> bool {
        self.info.flags & TFLAG_READ_ONLY != 0
    }
    /// Whether the server lets this export be grown (`NBD_FLAG_SEND_RESIZE`).
    pub fn can_resize(&self) -> bool {
        self.info.flags & TFLAG_SEND_RESIZE != 0
    }
    /// True once the connection has failed or closed.
    pub fn is_closed(&self) -> bool {
        self.conn.closed.load(Ordering::SeqCst)
    }
    /// Returns once the connection has failed or closed.
    pub async fn closed(&self) {
        let ended = self.conn.ended.notified();
        tokio::pin!(ended);
        // Registered before the check, so a close between the two still wakes us.
        ended.as_mut().enable();
        if !self.is_closed() {
            ended.await;
        }
    }

    async fn request(
        &self,
        command: u16,
        flags: u16,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<Vec<u8>, ClientError> {
        if self.is_closed() {
            return Err(ClientError::Closed);
        }
        let cookie = self.conn.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let buf = if command == CMD_READ {
            vec![0u8; len as usize]
        } else {
            Vec::new()
        };
        self.conn.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(
            cookie,
            Pending {
                command,
                offset,
                buf,
                error: None,
                done: tx,
            },
        );
        let header = encode_request(&Request {
            flags,
            command,
            cookie,
            offset,
            len,
        });
        let sent = {
            let mut w = self.conn.writer.lock().await;
            let mut slices = [IoSlice::new(&header), IoSlice::new(data.unwrap_or_default())];
            match write_all_vectored(&mut *w, &mut slices).await {
                Ok(()) => w.flush().await,
                Err(e) => Err(e),
            }
        };
        if let Err(e) = sent {
            self.conn
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&cookie);
            let error = ClientError::from(e);
            self.conn.fail_all(error.clone());
            return Err(error);
        }
        rx.await.map_err(|_| ClientError::Closed)?
    }

    /// Reads `len` bytes at `offset`. Longer reads are split into requests the
    /// server accepts.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, ClientError> {
        let max = self.info.max_request as usize;
        if len <= max {
            return self.request(CMD_READ, 0, offset, len as u32, None).await;
        }
        let mut out = Vec::with_capacity(len);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(max);
            out.extend_from_slice(&self.request(CMD_READ, 0, offset + done as u64, n as u32, None).await?);
            done += n;
        }
        Ok(out)
    }

    /// Writes `data` at `offset`; with `fua` the server makes it durable before
    /// replying.
    pub async fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), ClientError> {
        let flags = if fua { CMD_FLAG_FUA } else { 0 };
        for (i, chunk) in data.chunks(self.info.max_request as usize).enumerate() {
            let at = offset + (i * self.info.max_request as usize) as u64;
            self.request(CMD_WRITE, flags, at, chunk.len() as u32, Some(chunk))
                .await?;
        }
        Ok(())
    }

    pub async fn flush(&self) -> Result<(), ClientError> {
        self.request(CMD_FLUSH, 0, 0, 0, None).await.map(drop)
    }

    /// Discards a range, in pieces of at most 1 GiB.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), ClientError> {
        self.ranged(CMD_TRIM, 0, offset, len).await
    }

    /// Zeroes a range; `may_trim` lets the server deallocate it.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> Result<(), ClientError> {
        let flags = if may_trim { 0 } else { CMD_FLAG_NO_HOLE };
        self.ranged(CMD_WRITE_ZEROES, flags, offset, len).await
    }

    async fn ranged(&self, command: u16, flags: u16, offset: u64, len: u64) -> Result<(), ClientError> {
        const STEP: u64 = 1 << 30;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(STEP);
            self.request(command, flags, offset + done, n as u32, None).await?;
            done += n;
        }
        Ok(())
    }

    /// Asks the server to grow the export to `size` bytes (`NBD_CMD_RESIZE`, the
    /// protocol's experimental `RESIZE` extension). This connection keeps the size it
    /// was given (a server may end it); the next connection is told the new one.
    pub async fn resize(&self, size: u64) -> Result<(), ClientError> {
        if !self.can_resize() {
            return Err(ClientError::ResizeUnsupported);
        }
        self.request(CMD_RESIZE, 0, size, 0, None).await.map(drop)
    }

    /// Closes the connection at once: requests in flight fail as on a lost connection.
    pub fn close(&self) {
        self.conn.fail_all(ClientError::Closed);
        if let Some(reader) = self.conn.reader.lock().unwrap_or_else(|e| e.into_inner()).take() {
            reader.abort();
        }
    }

    /// Sends `NBD_CMD_DISC` after the requests in flight, and closes.
    pub async fn disconnect(&self) -> Result<(), ClientError> {
        let header = encode_request(&Request {
            flags: 0,
            command: CMD_DISC,
            cookie: 0,
            offset: 0,
            len: 0,
        });
        let mut w = self.conn.writer.lock().await;
        w.write_all(&header).await?;
        w.shutdown().await?;
        Ok(())
    }
}

/// Our flags in answer to the server's greeting.
fn client_flags(greeting: &[u8; GREETING_LEN]) -> Result<u32, ClientError> {
    let flags = parse_greeting(greeting)?;
    if flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(ClientError::Protocol("server does not speak fixed newstyle".into()));
    }
    Ok(if flags & FLAG_NO_ZEROES != 0 {
        FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES
    } else {
        FLAG_C_FIXED_NEWSTYLE
    })
}

/// The host part of `host:port` (brackets of an IPv6 literal removed).
fn tcp_host(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host)
}

async fn read_replies<R: AsyncRead + Unpin>(r: &mut R, conn: &Connection) -> Result<(), ClientError> {
    let mut header = [0u8; STRUCTURED_HEADER_LEN];
    let mut scratch = Vec::new();
    loop {
        match r.read_exact(&mut header[..REPLY_MAGIC_LEN]).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        let need = match parse_reply_header(&header[..REPLY_MAGIC_LEN]) {
            Err(ParseError::Short { needed, .. }) => needed,
            Err(e) => return Err(e.into()),
            Ok(_) => REPLY_MAGIC_LEN,
        };
        r.read_exact(&mut header[REPLY_MAGIC_LEN..need]).await?;
        match parse_reply_header(&header[..need])? {
            ReplyHeader::Simple { error, cookie } => {
                let mut p = take_pending(conn, cookie)?;
                if error != 0 {
                    let _ = p.done.send(Err(request_error(p.command, error, String::new())));
                    continue;
                }
                if p.command == CMD_READ {
                    r.read_exact(&mut p.buf).await?;
                }
                let _ = p.done.send(Ok(p.buf));
            }
            ReplyHeader::Structured {
                flags,
                chunk_type,
                cookie,
                len,
            } => {
                let done = flags & REPLY_FLAG_DONE != 0;
                // Taken out to be filled; put back below unless this chunk ends the reply.
                let mut p = take_pending(conn, cookie)?;
                let result = read_chunk(r, &mut p, chunk_type, len, &mut scratch).await;
                if let Err(e) = result {
                    let _ = p.done.send(Err(e.clone()));
                    return Err(e);
                }
                if done {
                    let outcome = match p.error.take() {
                        Some(e) => Err(e),
                        None => Ok(std::mem::take(&mut p.buf)),
                    };
                    let _ = p.done.send(outcome);
                } else {
                    conn.pending.lock().unwrap_or_else(|e| e.into_inner()).insert(cookie, p);
                }
            }
        }
    }
}

fn take_pending(conn: &Connection, cookie: u64) -> Result<Pending, ClientError> {
    conn.pending
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&cookie)
        .ok_or_else(|| ClientError::Protocol(format!("reply for unknown cookie {cookie}")))
}

fn request_error(command: u16, errno: u32, message: String) -> ClientError {
    ClientError::Request {
        command: command_name(command),
        errno,
        message,
    }
}

async fn read_chunk<R: AsyncRead + Unpin>(
    r: &mut R,
    p: &mut Pending,
    chunk_type: u16,
    len: u32,
    scratch: &mut Vec<u8>,
) -> Result<(), ClientError> {
    match chunk_type {
        REPLY_TYPE_NONE if len == 0 => Ok(()),
        REPLY_TYPE_OFFSET_DATA if p.command == CMD_READ && len > 8 => {
            let mut offset = [0u8; 8];
            r.read_exact(&mut offset).await?;
            let at = chunk_position(p, u64::from_be_bytes(offset), u64::from(len - 8))?;
            r.read_exact(&mut p.buf[at..at + (len - 8) as usize]).await?;
            Ok(())
        }
        REPLY_TYPE_OFFSET_HOLE if p.command == CMD_READ && len == 12 => {
            let mut body = [0u8; 12];
            r.read_exact(&mut body).await?;
            let mut offset = [0u8; 8];
            offset.copy_from_slice(&body[..8]);
            let hole = u64::from(u32::from_be_bytes([body[8], body[9], body[10], body[11]]));
            let at = chunk_position(p, u64::from_be_bytes(offset), hole)?;
            p.buf[at..at + hole as usize].fill(0);
            Ok(())
        }
        t if t & (1 << 15) != 0 => {
            scratch.resize(len as usize, 0);
            r.read_exact(scratch).await?;
            let (errno, message) = parse_structured_error(scratch)?;
            if p.error.is_none() {
                p.error = Some(request_error(p.command, errno, message));
            }
            Ok(())
        }
        t => Err(ClientError::Protocol(format!(
            "unexpected chunk type {t} of {len} bytes for a {}",
            command_name(p.command)
        ))),
    }
}

/// Where a chunk for `offset..offset+len` lands in the read buffer, checked.
fn chunk_position(p: &Pending, offset: u64, len: u64) -> Result<usize, ClientError> {
    let end = offset.checked_add(len);
    match (offset.checked_sub(p.offset), end) {
        (Some(at), Some(end)) if end - p.offset <= p.buf.len() as u64 => Ok(at as usize),
        _ => Err(ClientError::Protocol(format!(
            "chunk {offset}+{len} is outside the request"
        ))),
    }
}

// ---------------------------------------------------------------------------------

/// How long and how often [`NbdDevice`] tries to reconnect.
#[derive(Debug, Clone)]
pub struct ReconnectPolicy {
    /// Give up (and fail the request) after this long without a connection.
    pub give_up_after: Duration,
    pub first_delay: Duration,
    pub max_delay: Duration,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy {
            give_up_after: Duration::from_secs(60),
            first_delay: Duration::from_millis(50),
            max_delay: Duration::from_secs(2),
        }
    }
}

/// How long one connection attempt (connect, TLS, handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A remote NBD export as a synchronous [`BlockDevice`].
///
/// It runs its own small tokio runtime, so it can be called from plain threads (the
/// vhost-user workers). It must not be called from inside a tokio runtime: use
/// `spawn_blocking` there. When the connection drops a request reconnects with
/// backoff and retries, for up to `ReconnectPolicy::give_up_after`; a write that was
/// in flight when the connection dropped is sent again, which is safe because NBD
/// writes are idempotent. A task of the device's own reconnects as soon as the
/// connection ends, not at the next request, and keeps trying for as long as the
/// device lives: an export that grew (its owner resized the volume, which ends the
/// connections) is noticed while the device is idle, and the first request after a
/// server restart finds a connection waiting.
pub struct NbdDevice {
    runtime: Option<tokio::runtime::Runtime>,
    link: Arc<Link>,
    read_only: bool,
}

/// The connection an [`NbdDevice`] uses and what it takes to make a new one, shared
/// between the requests and the task that keeps it connected.
struct Link {
    address: NbdAddress,
    export: String,
    tls: Option<ClientTls>,
    policy: ReconnectPolicy,
    client: Mutex<Option<Arc<NbdClient>>>,
    /// What the server offered; larger after a reconnection found the export grown.
    size: AtomicU64,
    /// Called with the new size when a reconnection finds the export grown.
    on_grow: OnceLock<Box<dyn Fn(u64) + Send + Sync>>,
    reconnects: AtomicU64,
}

impl std::fmt::Debug for NbdDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDevice")
            .field("address", &self.link.address)
            .field("export", &self.link.export)
            .field("size", &self.size())
            .finish()
    }
}

impl Drop for NbdDevice {
    fn drop(&mut self) {
        // Drop the connection inside the runtime, then let the runtime go without
        // blocking (this may run on a runtime thread); that ends the reconnecting task.
        lock(&self.link.client).take();
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl NbdDevice {
    /// Connects to `export` at `address` (the first connection is not retried, so a
    /// wrong address fails fast).
    pub fn connect(address: NbdAddress, export: &str, policy: ReconnectPolicy) -> Result<NbdDevice, ClientError> {
        Self::connect_with(address, export, None, policy)
    }

    /// As [`NbdDevice::connect`], inside TLS when `tls` is given (reconnects too).
    pub fn connect_with(
        address: NbdAddress,
        export: &str,
        tls: Option<ClientTls>,
        policy: ReconnectPolicy,
    ) -> Result<NbdDevice, ClientError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("nbd-client")
            .enable_all()
            .build()
            .map_err(|e| ClientError::Io(format!("cannot start the NBD client runtime: {e}")))?;
        let connect = || runtime.block_on(NbdClient::connect_with(&address, export, tls.as_ref()));
        let client = if tokio::runtime::Handle::try_current().is_ok() {
            // Blocking on our runtime from inside another would panic.
            std::thread::scope(|s| {
                s.spawn(connect)
                    .join()
                    .unwrap_or_else(|_| Err(ClientError::Io("NBD connect thread panicked".into())))
            })?
        } else {
            connect()?
        };
        let read_only = client.read_only();
        let link = Arc::new(Link {
            size: AtomicU64::new(client.size()),
            on_grow: OnceLock::new(),
            address,
            export: export.to_string(),
            tls,
            policy,
            client: Mutex::new(Some(Arc::new(client))),
            reconnects: AtomicU64::new(0),
        });
        runtime.spawn(keep_connected(Arc::downgrade(&link)));
        Ok(NbdDevice {
            runtime: Some(runtime),
            link,
            read_only,
        })
    }

    /// Calls `f` with the new size whenever a reconnection finds the export grown (its
    /// owner resized the volume, which re-adds the export and so ends this
    /// connection). `f` runs on the thread of the request that noticed, or on one of
    /// the device's own: it must not wait for other requests on this device. Set once;
    /// later calls are ignored.
    pub fn on_grow(&self, f: impl Fn(u64) + Send + Sync + 'static) {
        let _ = self.link.on_grow.set(Box::new(f));
    }

    /// Grows the export to `size` bytes through its server (`NBD_CMD_RESIZE`) and
    /// returns the size a new connection was then told, which the device now has (a
    /// server may round up). `on_grow` is called as on any growth. The connection that
    /// asked is closed: it was told the old size, and requests past it would fail.
    pub fn resize(&self, size: u64) -> Result<u64, ClientError> {
        if self.read_only {
            return Err(ClientError::ReadOnly);
        }
        if size == self.size() {
            return Ok(size);
        }
        self.with_client(|c| async move {
            c.resize(size).await?;
            c.close();
            Ok(())
        })?;
        // Connect now (unless the reconnecting task already has), so the new size is
        // known when this returns.
        let now = self.with_client(|c| async move { Ok(c.size()) })?;
        if now < size {
            return Err(ClientError::Protocol(format!(
                "the server grew the export to {size} bytes but offers {now}"
            )));
        }
        Ok(self.size())
    }

    /// How many times the connection was re-established.
    pub fn reconnects(&self) -> u64 {
        self.link.reconnects.load(Ordering::Relaxed)
    }

    /// Runs `op` on a live connection, reconnecting and retrying on connection errors.
    fn with_client<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        T: Send,
        F: Fn(Arc<NbdClient>) -> Fut + Send,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let Some(runtime) = self.runtime.as_ref() else {
            return Err(ClientError::Closed);
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Called from inside a runtime (say, an NBD server serving this device
            // inline): blocking on another runtime here would panic, so wait on a
            // plain thread instead.
            return std::thread::scope(|s| {
                s.spawn(|| runtime.block_on(self.link.retrying(op)))
                    .join()
                    .unwrap_or_else(|_| Err(ClientError::Io("NBD request thread panicked".into())))
            });
        }
        runtime.block_on(self.link.retrying(op))
    }
}

impl Link {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn current(&self) -> Option<Arc<NbdClient>> {
        lock(&self.client).clone().filter(|c| !c.is_closed())
    }

    /// Makes a new connection and puts it in place, unless a live one got there first
    /// (a request and the reconnecting task may both try): that one is returned and
    /// the new one closed. The size it reports when this connection raised it.
    async fn reconnect(&self) -> Result<(Arc<NbdClient>, Option<u64>), ClientError> {
        let connect = NbdClient::connect_with(&self.address, &self.export, self.tls.as_ref());
        let c = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ClientError::Connect {
                address: self.address.to_string(),
                message: format!("no answer within {CONNECT_TIMEOUT:?}"),
            })??;
        // Grown is fine (the bytes so far are where they were); shrunk would lose some
        // the guest may hold.
        let was = self.size();
        if c.size() < was {
            return Err(ClientError::Shrunk { was, now: c.size() });
        }
        let grown = (self.size.fetch_max(c.size(), Ordering::AcqRel) < c.size()).then_some(c.size());
        let mut slot = lock(&self.client);
        if let Some(live) = slot.as_ref().filter(|l| !l.is_closed()) {
            return Ok((live.clone(), grown));
        }
        tracing::info!(address = %self.address, export = %self.export, "NBD connection re-established");
        self.reconnects.fetch_add(1, Ordering::Relaxed);
        let c = Arc::new(c);
        *slot = Some(c.clone());
        Ok((c, grown))
    }

    /// Says that the export grew to `size`, and tells whoever asked to know.
    fn grew(&self, size: u64) {
        tracing::info!(address = %self.address, export = %self.export, now = size, "the NBD export grew");
        if let Some(f) = self.on_grow.get() {
            f(size);
        }
    }

    async fn retrying<T, F, Fut>(&self, op: F) -> Result<T, ClientError>
    where
        F: Fn(Arc<NbdClient>) -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let mut first_failure: Option<Instant> = None;
        let mut delay = self.policy.first_delay;
        loop {
            let attempt = match self.current() {
                Some(c) => op(c).await,
                None => match self.reconnect().await {
                    Ok((c, grown)) => {
                        if let Some(size) = grown {
                            self.grew(size);
                        }
                        op(c).await
                    }
                    Err(e) => Err(e),
                },
            };
            match attempt {
                Ok(v) => return Ok(v),
                Err(e) if e.is_connection_error() => {
                    let since = *first_failure.get_or_insert_with(Instant::now);
                    if since.elapsed() >= self.policy.give_up_after {
                        return Err(e);
                    }
                    tracing::warn!(address = %self.address, error = %e, "NBD connection lost; retrying");
                    lock(&self.client).take_if(|c| c.is_closed());
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.policy.max_delay);
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The device's own task: waits for its connection to end and makes a new one, with
/// backoff, for as long as the device lives (`link` gone: the device was dropped).
async fn keep_connected(link: Weak<Link>) -> Option<()> {
    let policy = link.upgrade()?.policy.clone();
    let mut delay = policy.first_delay;
    loop {
        // None: a request dropped a dead connection and is reconnecting; try too.
        let current = lock(&link.upgrade()?.client).clone();
        if let Some(current) = current {
            let lived = Instant::now();
            current.closed().await;
            if lived.elapsed() >= policy.max_delay {
                // It served a while and ended as connections do (a restart, the owner's
                // resize): try again soon. One that ends at once backs off further.
                delay = policy.first_delay;
            }
        }
        loop {
            tokio::time::sleep(delay).await;
            if reconnect_once(&link, &mut delay, &policy).await? {
                break;
            }
        }
    }
}

/// One attempt of [`keep_connected`]: true when a live connection is in place
/// (made here or by a request), false after a failure (`delay` doubled), `None` when
/// the device is gone.
async fn reconnect_once(link: &Weak<Link>, delay: &mut Duration, policy: &ReconnectPolicy) -> Option<bool> {
    let l = link.upgrade()?;
    if l.current().is_some() {
        return Some(true);
    }
    match l.reconnect().await {
        Ok((_, grown)) => {
            if let Some(size) = grown {
                // Telling may wait on the VM's hypervisor: not on this runtime's thread.
                let told = l.clone();
                tokio::task::spawn_blocking(move || told.grew(size));
            }
            Some(true)
        }
        Err(e) => {
            if *delay == policy.first_delay {
                tracing::warn!(address = %l.address, export = %l.export, error = %e, "NBD connection lost; reconnecting");
            } else {
                tracing::debug!(address = %l.address, export = %l.export, error = %e, "NBD reconnection failed");
            }
            *delay = (*delay * 2).min(policy.max_delay);
            Some(false)
        }
    }
}

impl BlockDevice for NbdDevice {
    fn size(&self) -> u64 {
        self.link.size()
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len() as u64)?;
        let len = buf.len();
        let data = self
            .with_client(|c| async move { c.read(offset, len).await })
            .map_err(|e| e.to_io())?;
        buf.copy_from_slice(&data);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(ClientError::ReadOnly.to_io());
        }
        check_range(self.size(), offset, buf.len() as u64)?;
        self.with_client(|c| async move { c.write(offset, buf, false).await })
            .map_err(|e| e.to_io())
    }
    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.with_client(|c| async move { c.flush().await })
            .map_err(|e| e.to_io())
    }
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(ClientError::ReadOnly.to_io());
        }
        check_range(self.size(), offset, len)?;
        self.with_client(|c| async move { c.trim(offset, len).await })
            .map_err(|e| e.to_io())
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        if self.read_only {
            return Err(ClientError::ReadOnly.to_io());
        }
        check_range(self.size(), offset, len)?;
        self.with_client(|c| async move { c.write_zeroes(offset, len, may_trim).await })
            .map_err(|e| e.to_io())
    }
}

/// Writes every slice, in as few system calls as the socket allows.
async fn write_all_vectored<W: AsyncWrite + Unpin>(w: &mut W, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let n = w.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped accepting data"));
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}
