//! The transmission phase, on threads: nbdkit's "parallel" model.
//!
//! Once the handshake is done (asynchronously, under a timeout), the connection's
//! socket is switched to blocking mode and served by a few threads of its own. Each
//! thread takes the read lock, reads one request (and a write's data), lets go of the
//! lock, runs the I/O on the device, and writes the reply under the write lock with
//! one vectored write. A request is read, served and answered by one thread, so at
//! queue depth 1 nothing is handed from thread to thread and a request costs one
//! receive, the device call and one send: the earlier design (a reader task, the
//! blocking pool, a writer task) paid two wake-ups per request and reached half of
//! nbdkit's queue-depth-1 rate. Threads are added, up to the configured number, only
//! when every thread is busy and waiting for the one serving would cost more than
//! handing a request over: the request may take long (a flush, FUA, a large
//! transfer), a read would wait for the disk (its data is not in the page cache,
//! which a `RWF_NOWAIT` read tells), or requests have recently taken long from read
//! to reply (`WORTH_A_THREAD`) while more are waiting. Quick requests, even many in
//! flight, are served by one thread: a handover costs a futex wake, a context switch
//! and contention for the socket's lock, as much as a 4k write to the page cache.
//! Requests beyond the limit wait in the socket, which also bounds the memory one
//! connection can make the server hold (threads x 32 MiB).
//!
//! At queue depth 1 what decides the rate is how fast a sleeping thread wakes when
//! the next request arrives, and on a small machine where the client runs too that
//! depends on where the scheduler puts the two: measured here the same code gave
//! 12k or 24k 4k-reads/s from run to run. So the thread that waits for the next
//! request first polls the socket for a short while (`busy_poll`, 50 us by default,
//! as the kernel's own `net.core.busy_read` does for NICs) and only then sleeps in
//! `recv`: a client that answers within that time finds the server awake (30k
//! 4k-reads/s at queue depth 1 here, nbdkit 21k). The cost is bounded: at most one
//! poller per connection, for at most `busy_poll` after each request, none while
//! the connection has requests being served (their threads need the CPU more), and
//! none after a request of more than 64 KiB: large transfers are not bound by a
//! wake-up, and on 2 cores the spinning took CPU from the client (nbdcopy writes over
//! a Unix socket: 1,907 MiB/s polling, 2,329 not, nbdkit 2,178).
//!
//! Large writes to a file skip the data buffer: their payload is spliced from the
//! socket into a pipe of the thread's own while the read lock is held, and from the
//! pipe into the file once it is let go, so each byte is copied once (into the page
//! cache) instead of twice (into the buffer, then into the page cache). nbdcopy
//! writes of 256 KiB: 2,922 MiB/s over a Unix socket against 2,667 reading into the
//! buffer (nbdkit 2,407).
//!
//! The connection ends when the client disconnects (`NBD_CMD_DISC` or end of
//! stream) after the replies in flight are written, on a protocol violation or a
//! failed send at once, or when the server closes the socket (export removed,
//! shutdown): blocked receives then see end of stream.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Cursor, IoSlice, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::proto::{self, *};
use super::server::{ResizeRefused, Resizer};
use crate::device::BlockDevice;
pub(crate) use crate::lock;

/// A connected socket served with blocking calls from several threads at once.
pub(crate) trait BlockingSocket: Send + Sync + 'static {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Shuts both directions: blocked receives return end of stream, sends fail.
    fn close(&self);
    /// Shuts the receiving side only: blocked receives return end of stream, replies
    /// still go out.
    fn stop_receiving(&self);
    /// Whether bytes are waiting to be received.
    fn has_pending(&self) -> bool;
    /// Receives without waiting (`WouldBlock` when nothing is there).
    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Sends what fits without waiting (`WouldBlock` when nothing does).
    fn try_send(&self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    /// The socket itself when its bytes are the request stream as is (not inside
    /// TLS), so a write's data may be spliced from it.
    fn splice_source(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

macro_rules! blocking_socket {
    ($t:ty) => {
        impl BlockingSocket for $t {
            fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
                io::Read::read(&mut &*self, buf)
            }
            fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
                io::Write::write_vectored(&mut &*self, bufs)
            }
            fn close(&self) {
                let _ = self.shutdown(Shutdown::Both);
            }
            fn stop_receiving(&self) {
                let _ = self.shutdown(Shutdown::Read);
            }
            fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
                let fd = std::os::fd::AsRawFd::as_raw_fd(self);
                // SAFETY: recv into a live buffer of its own length, on a socket we own.
                let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }
            fn try_send(&self, buf: &[u8]) -> io::Result<usize> {
                let fd = std::os::fd::AsRawFd::as_raw_fd(self);
                let flags = libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL;
                // SAFETY: send from a live buffer of its own length, on a socket we own.
                let r = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(r as usize)
                }
            }
            fn splice_source(&self) -> Option<BorrowedFd<'_>> {
                Some(AsFd::as_fd(self))
            }
            fn has_pending(&self) -> bool {
                let mut n: libc::c_int = 0;
                // SAFETY: FIONREAD on a socket we own writes one c_int to a live local.
                let r = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(self), libc::FIONREAD, &mut n) };
                r == 0 && n > 0
            }
        }
    };
}
blocking_socket!(std::net::TcpStream);
blocking_socket!(std::os::unix::net::UnixStream);

/// What the transmission phase serves and how.
pub(crate) struct Settings {
    pub device: Arc<dyn BlockDevice>,
    pub read_only: bool,
    /// Set when the export may be grown (`NBD_CMD_RESIZE`).
    pub resizer: Option<Arc<dyn Resizer>>,
    pub structured: bool,
    pub max_threads: usize,
    pub busy_poll: Duration,
    pub peer: String,
}

/// The socket's receiving side, polling for a while before it sleeps.
struct SocketReader<S> {
    socket: Arc<S>,
    busy_poll: Duration,
    /// Requests of the connection being served: while there are, the CPU is theirs.
    serving: Arc<AtomicUsize>,
    /// Whether the last request read was small enough to be worth polling after.
    small: Arc<AtomicBool>,
}

/// Requests served faster than this on average (read to reply) are served one after
/// the other by one thread even when the client sends many at once: handing the next
/// request to a second thread costs a futex wake and a context switch, and the two
/// threads contend for the socket's lock, about as much as such a request itself. 4k
/// writes to a file in the page cache take 2-3 us, and over TCP from fio at queue
/// depth 32, with the server on a CPU of its own, one thread served 107k a second
/// where the threads added at once served 78k (nbdkit 104k).
const WORTH_A_THREAD: Duration = Duration::from_micros(20);

/// Requests larger than this are not followed by busy polling.
const POLL_AFTER_AT_MOST: u32 = 64 << 10;

impl<S: BlockingSocket> Read for SocketReader<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if !self.busy_poll.is_zero() && self.serving.load(Ordering::Acquire) == 0 && self.small.load(Ordering::Relaxed)
        {
            let start = Instant::now();
            loop {
                match self.socket.try_recv(buf) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if start.elapsed() >= self.busy_poll {
                            break;
                        }
                        std::hint::spin_loop();
                    }
                    r => return r,
                }
            }
        }
        self.socket.recv(buf)
    }
}

type Reader<S> = BufReader<io::Chain<Cursor<Vec<u8>>, SocketReader<S>>>;

struct Connection<S> {
    socket: Arc<S>,
    reader: Mutex<Reader<S>>,
    writer: Mutex<()>,
    settings: Settings,
    size: u64,
    /// Set when no more requests are to be read.
    closing: AtomicBool,
    /// Requests taken and not yet answered (one per thread serving one).
    serving: Arc<AtomicUsize>,
    /// See [`SocketReader::small`].
    small: Arc<AtomicBool>,
    /// How long recent requests took from being read to being answered, in
    /// nanoseconds (a moving average): see [`WORTH_A_THREAD`].
    service_ns: AtomicU64,
    /// Threads not yet ended, at most `max_threads`; the last one out closes the
    /// socket and reports.
    live: AtomicUsize,
    ended: Mutex<Option<oneshot::Sender<()>>>,
}

/// Bytes of receive buffer per connection: several small requests per `recv`, while
/// most of a large write's data (past what one fill brought in) is received straight
/// into its own buffer rather than copied through this one.
const READ_BUFFER: usize = 32 << 10;
/// A thread's data buffer is given back after a request larger than this.
const KEEP_CAPACITY: usize = 4 << 20;
/// A peer that takes no reply bytes for this long is disconnected.
pub(crate) const SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves requests on `socket` from threads of its own. `leftover` is what the
/// handshake read past its end. The receiver fires once every thread has ended.
pub(crate) fn start<S: BlockingSocket>(socket: Arc<S>, leftover: Vec<u8>, settings: Settings) -> oneshot::Receiver<()> {
    let (tx, rx) = oneshot::channel();
    let serving = Arc::new(AtomicUsize::new(0));
    let small = Arc::new(AtomicBool::new(true));
    let receiving = SocketReader {
        socket: socket.clone(),
        busy_poll: settings.busy_poll,
        serving: serving.clone(),
        small: small.clone(),
    };
    let reader = BufReader::with_capacity(READ_BUFFER, Cursor::new(leftover).chain(receiving));
    let conn = Arc::new(Connection {
        socket,
        reader: Mutex::new(reader),
        writer: Mutex::new(()),
        size: settings.device.size(),
        settings,
        closing: AtomicBool::new(false),
        serving,
        small,
        service_ns: AtomicU64::new(0),
        live: AtomicUsize::new(0),
        ended: Mutex::new(Some(tx)),
    });
    if !conn.add_thread() {
        conn.socket.close();
    }
    rx
}

/// A request read off the socket, with its data if it is a write.
struct Pending {
    request: Request,
    refusal: Option<u32>,
    /// A write whose data was spliced into the thread's pipe.
    written: Option<Spliced>,
    /// Another request is already waiting (buffered or in the socket).
    queued: bool,
}

impl<S: BlockingSocket> Connection<S> {
    /// Starts one more thread unless the limit is reached. False if none could start.
    fn add_thread(self: &Arc<Self>) -> bool {
        let max = self.settings.max_threads.max(1);
        let counted = self
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1));
        if counted.is_err() {
            return false;
        }
        let conn = self.clone();
        let spawned = std::thread::Builder::new()
            .name("nbd-conn".into())
            .spawn(move || conn.work());
        if let Err(e) = spawned {
            tracing::warn!(peer = %self.settings.peer, error = %e, "cannot start an NBD connection thread");
            self.thread_ended();
            return false;
        }
        true
    }

    fn thread_ended(&self) {
        if self.live.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.socket.close();
            if let Some(tx) = lock(&self.ended).take() {
                let _ = tx.send(());
            }
        }
    }

    /// Stops reading and cuts the connection now (replies in flight are lost).
    fn abort(&self, why: &dyn std::fmt::Display) {
        tracing::debug!(peer = %self.settings.peer, error = %why, "NBD connection ended");
        self.closing.store(true, Ordering::Release);
        self.socket.close();
    }

    fn work(self: Arc<Self>) {
        /// Ends the thread's share of the connection however the thread ends: a panic
        /// (a device bug) cuts the connection rather than leaving the client hanging.
        /// `.1`: the thread was already counted out (it retired).
        struct Ended<'a, S: BlockingSocket>(&'a Connection<S>, bool);
        impl<S: BlockingSocket> Drop for Ended<'_, S> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    self.0.abort(&"a connection thread panicked");
                }
                if !self.1 {
                    self.0.thread_ended();
                }
            }
        }
        let mut ended = Ended(&self, false);
        let mut data: Vec<u8> = Vec::new();
        let mut head: Vec<u8> = Vec::with_capacity(512);
        let mut pipe = ThreadPipe::Untried;
        loop {
            let next = {
                let mut reader = lock(&self.reader);
                if self.closing.load(Ordering::Acquire) {
                    break;
                }
                let next = self.next_request(&mut reader, &mut data, &mut pipe);
                if !matches!(next, Ok(Some(_))) {
                    // Before the lock goes: a thread waiting for it must not read on.
                    self.closing.store(true, Ordering::Release);
                }
                next
            };
            let pending = match next {
                Ok(Some(p)) => p,
                // Disconnect: the others finish their requests, nobody reads more.
                Ok(None) => break,
                Err(e) => {
                    self.abort(&e);
                    break;
                }
            };
            let started = Instant::now();
            let serving = self.serving.fetch_add(1, Ordering::AcqRel) + 1;
            let all_busy = serving >= self.live.load(Ordering::Acquire);
            if all_busy && (may_take_long(&pending.request) || (pending.queued && self.requests_are_slow())) {
                // Every thread is busy and this request may keep its thread a while, or
                // the client has more waiting and requests take long enough here that
                // a second thread gains more than handing requests over costs: another
                // thread reads meanwhile. (Quick requests, at any queue depth, are all
                // read, served and answered by one thread.)
                self.add_thread();
            }
            let mut said = None;
            let error = match (pending.refusal, pending.written) {
                (Some(e), _) => e,
                (None, Some(spliced)) => self.finish_spliced(&pending.request, spliced, &mut pipe),
                (None, None) if pending.request.command == CMD_RESIZE => match self.resize(&pending.request) {
                    Ok(()) => 0,
                    Err(refused) => {
                        said = Some(refused.message);
                        refused.errno
                    }
                },
                (None, None) => self.execute(&pending.request, &mut data),
            };
            let sent = self.send_reply(&pending.request, error, said.as_deref(), &data, &mut head);
            self.serving.fetch_sub(1, Ordering::AcqRel);
            self.served_in(started.elapsed());
            if let Err(e) = sent {
                self.abort(&e);
                break;
            }
            if data.capacity() > KEEP_CAPACITY {
                data = Vec::new();
            }
            if self.retire() {
                ended.1 = true;
                break;
            }
        }
    }

    /// Counts this thread out, after it answered its request, if the connection no
    /// longer needs it: recent requests were quick (half of [`WORTH_A_THREAD`], so
    /// threads are not started and ended over and over around it) and another thread
    /// is free to read (it waits for the read lock). Threads added for a burst of slow
    /// requests would otherwise stay and hand quick requests to each other.
    fn retire(&self) -> bool {
        if self.service_ns.load(Ordering::Relaxed) > WORTH_A_THREAD.as_nanos() as u64 / 2 {
            return false;
        }
        let serving = self.serving.load(Ordering::Acquire);
        self.live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n >= serving + 2).then(|| n - 1)
            })
            .is_ok()
    }

    /// Counts one request's time from being read to being answered into the average.
    fn served_in(&self, took: Duration) {
        // Capped: one request that took long because its thread was preempted (or the
        // page cache made room) must not start threads; several in a row do.
        let took = took.min(2 * WORTH_A_THREAD).as_nanos() as u64;
        // An update lost to a race only makes the average a little older.
        let average = self.service_ns.load(Ordering::Relaxed);
        let average = average - average / 8 + took / 8;
        self.service_ns.store(average, Ordering::Relaxed);
    }

    /// Whether recent requests took long enough to be worth serving side by side.
    fn requests_are_slow(&self) -> bool {
        self.service_ns.load(Ordering::Relaxed) > WORTH_A_THREAD.as_nanos() as u64
    }

    /// Reads the next request (under the read lock). `None` at a disconnect.
    fn next_request(
        &self,
        r: &mut Reader<S>,
        data: &mut Vec<u8>,
        pipe: &mut ThreadPipe,
    ) -> Result<Option<Pending>, RequestError> {
        let mut header = [0u8; REQUEST_LEN];
        match r.read_exact(&mut header) {
            Ok(()) => {}
            // A client that hangs up without NBD_CMD_DISC is rude but common.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let request = parse_request(&header)?;
        self.small.store(request.len <= POLL_AFTER_AT_MOST, Ordering::Relaxed);
        if request.command == CMD_DISC {
            return Ok(None);
        }
        let payload = if request.command == CMD_WRITE { request.len } else { 0 };
        let refusal = self.refusal(&request);
        let mut written = None;
        if refusal.is_some() {
            // Refused writes still carry their data, which must be skipped to stay in step.
            let skipped = io::copy(&mut r.by_ref().take(payload.into()), &mut io::sink())?;
            if skipped < u64::from(payload) {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
        } else if request.command == CMD_WRITE {
            written = self.splice_in(r, &request, pipe)?;
            if written.is_none() {
                data.resize(payload as usize, 0);
                r.read_exact(data)?;
            }
        }
        let queued = !r.buffer().is_empty() || self.socket.has_pending();
        Ok(Some(Pending {
            request,
            refusal,
            written,
            queued,
        }))
    }

    /// Takes a large write's data off the socket into the thread's pipe with
    /// `splice(2)` (what the read buffer already holds is copied in), so the data never
    /// passes through this process: the file write that follows, outside the read
    /// lock, moves it from the pipe into the file, one copy of every byte where reading
    /// it into a buffer and writing that makes two. `None`: not applicable (a small
    /// write, a device that is not a file, TLS, bytes left from the handshake, no
    /// pipe); the caller reads the data itself. Should the pipe fill before the whole
    /// payload is in, it is emptied into the file here and then refilled. An error
    /// from the socket ends the connection; one from the file only the request.
    fn splice_in(&self, r: &mut Reader<S>, request: &Request, pipe: &mut ThreadPipe) -> io::Result<Option<Spliced>> {
        if request.len < SPLICE_AT_LEAST {
            return Ok(None);
        }
        let device = &*self.settings.device;
        let (Some(_), Some(socket)) = (device.splice_target(), self.socket.splice_source()) else {
            return Ok(None);
        };
        let handshake_bytes = r.get_ref().get_ref().0;
        if (handshake_bytes.position() as usize) < handshake_bytes.get_ref().len() {
            return Ok(None);
        }
        if let ThreadPipe::Untried = pipe {
            *pipe = Pipe::new().map_or(ThreadPipe::Unavailable, ThreadPipe::Ready);
        }
        let ThreadPipe::Ready(pipe) = pipe else {
            return Ok(None);
        };
        let mut spliced = Spliced {
            offset: request.offset,
            in_pipe: 0,
            failed: None,
            copied: false,
        };
        let mut remaining = request.len as usize;
        // The pipe is empty and holds more than the read buffer (`Pipe::new`): this
        // write cannot wait for room.
        let buffered = r.buffer().len().min(remaining);
        if buffered > 0 {
            (&pipe.write).write_all(&r.buffer()[..buffered])?;
            r.consume(buffered);
            spliced.in_pipe = buffered;
            remaining -= buffered;
        }
        while remaining > 0 {
            // Never waiting for room in the pipe (nothing else empties it).
            match splice(socket, pipe.write.as_fd(), None, remaining, libc::SPLICE_F_NONBLOCK) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    spliced.in_pipe += n;
                    remaining -= n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The pipe is full, or (a Unix socket honours the flag) no data has
                    // come yet. Emptied, the pipe has room: waiting on the socket is safe.
                    spliced.drain(pipe, device)?;
                    let n = splice(socket, pipe.write.as_fd(), None, remaining, 0)?;
                    if n == 0 {
                        return Err(io::ErrorKind::UnexpectedEof.into());
                    }
                    spliced.in_pipe += n;
                    remaining -= n;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(Some(spliced))
    }

    /// Finishes a write whose data is in the pipe: into the file, then its flush when
    /// it asked for FUA. Returns the NBD error value.
    fn finish_spliced(&self, r: &Request, mut spliced: Spliced, pipe: &mut ThreadPipe) -> u32 {
        // `splice_in` made it, and it stays for the thread's life.
        let ThreadPipe::Ready(p) = &*pipe else {
            return EIO;
        };
        if let Err(e) = spliced.drain(p, &*self.settings.device) {
            // Data may be left in the pipe: it cannot serve another request.
            *pipe = ThreadPipe::Unavailable;
            self.abort(&e);
            return EIO;
        }
        if spliced.copied {
            // The file system cannot take splices: later writes go through the buffer.
            *pipe = ThreadPipe::Unavailable;
        }
        let result = match spliced.failed {
            None if r.flags & CMD_FLAG_FUA != 0 => self.settings.device.flush(),
            None => Ok(()),
            Some(e) => Err(e),
        };
        match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(offset = r.offset, len = r.len, error = %e, "NBD write failed");
                error_value(&e)
            }
        }
    }

    /// The error value for a request that must not run, or `None` if it may.
    fn refusal(&self, r: &Request) -> Option<u32> {
        let structured = self.settings.structured;
        let allowed_flags = match r.command {
            CMD_READ => CMD_FLAG_FUA | if structured { CMD_FLAG_DF } else { 0 },
            CMD_WRITE | CMD_TRIM | CMD_FLUSH => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_RESIZE => 0,
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
        if r.command != CMD_READ && self.settings.read_only {
            return Some(EPERM);
        }
        if r.command == CMD_RESIZE {
            // The new size travels in the offset; `resize` checks it.
            return (r.len != 0).then_some(EINVAL);
        }
        match r.offset.checked_add(u64::from(r.len)) {
            Some(end) if end <= self.size => None,
            // The spec asks for ENOSPC on writes past the end, EINVAL otherwise.
            _ if r.command == CMD_WRITE || r.command == CMD_WRITE_ZEROES => Some(ENOSPC),
            _ => Some(EINVAL),
        }
    }

    /// Runs an accepted request on the device; returns the NBD error value (0: done).
    /// A read leaves its data in `data`.
    fn execute(self: &Arc<Self>, r: &Request, data: &mut Vec<u8>) -> u32 {
        let device = &*self.settings.device;
        let fua = r.flags & CMD_FLAG_FUA != 0;
        let result = match r.command {
            CMD_READ => {
                data.resize(r.len as usize, 0);
                device.read_at_if_cached(data, r.offset).unwrap_or_else(|| {
                    // The read waits for a disk: requests behind it go to another thread.
                    if self.serving.load(Ordering::Acquire) >= self.live.load(Ordering::Acquire) {
                        self.add_thread();
                    }
                    device.read_at(data, r.offset)
                })
            }
            CMD_WRITE => device.write_at(data, r.offset),
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
        match result {
            Ok(()) => 0,
            Err(e) => {
                tracing::debug!(command = proto::command_name(r.command), offset = r.offset, len = r.len, error = %e, "NBD request failed");
                error_value(&e)
            }
        }
    }

    /// Grows the export to the size in `r.offset` (a size this connection already has
    /// is done; a smaller one is refused, as is any on an export without a resizer).
    fn resize(&self, r: &Request) -> Result<(), ResizeRefused> {
        let refused = |errno, message| Err(ResizeRefused { errno, message });
        let Some(resizer) = &self.settings.resizer else {
            return refused(EINVAL, "this export cannot be resized".into());
        };
        match r.offset.cmp(&self.size) {
            std::cmp::Ordering::Less => refused(
                EINVAL,
                format!(
                    "the export has {} bytes; it is never shrunk (asked: {})",
                    self.size, r.offset
                ),
            ),
            std::cmp::Ordering::Equal => Ok(()),
            std::cmp::Ordering::Greater => {
                tracing::info!(peer = %self.settings.peer, from = self.size, to = r.offset, "NBD client grows the export");
                resizer.resize(r.offset)
            }
        }
    }

    /// Writes the reply to `r` (with the read data when `error` is 0) in one go. A
    /// message of the request's own (`said`) travels in a structured error reply when
    /// the client negotiated those.
    fn send_reply(
        &self,
        r: &Request,
        error: u32,
        said: Option<&str>,
        data: &[u8],
        head: &mut Vec<u8>,
    ) -> io::Result<()> {
        head.clear();
        let structured = self.settings.structured && (r.command == CMD_READ || (error != 0 && said.is_some()));
        let data = if r.command == CMD_READ && error == 0 { data } else { &[] };
        match (error, structured) {
            (0, true) if data.is_empty() => {
                head.extend_from_slice(&encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, r.cookie, 0))
            }
            (0, true) => head.extend_from_slice(&encode_read_data_header(r.cookie, r.offset, data.len() as u32)),
            (_, true) => encode_structured_error(head, r.cookie, error, said.unwrap_or(error_message(error))),
            (_, false) => head.extend_from_slice(&encode_simple_reply(error, r.cookie)),
        }
        let mut slices = [IoSlice::new(head), IoSlice::new(data)];
        let _serialized = lock(&self.writer);
        send_all(&*self.socket, &mut slices)
    }
}

/// Requests that may hold their thread long enough for later ones to queue behind:
/// flushes, forced unit access, and large transfers.
fn may_take_long(r: &Request) -> bool {
    r.command == CMD_FLUSH || r.command == CMD_RESIZE || r.flags & CMD_FLAG_FUA != 0 || r.len >= 1 << 20
}

pub(crate) fn send_all<S: BlockingSocket>(socket: &S, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while slices.iter().any(|s| !s.is_empty()) {
        match socket.send_vectored(slices) {
            Ok(0) => return Err(io::Error::new(io::ErrorKind::WriteZero, "peer stopped accepting data")),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("peer did not read its replies for {} s", SEND_TIMEOUT.as_secs()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes of at least this many bytes go from the socket to the file by splice.
const SPLICE_AT_LEAST: u32 = 128 << 10;
/// The pipe capacities asked for, in turn.
const PIPE_BYTES: [usize; 2] = [4 << 20, 1 << 20];

/// A thread's pipe for spliced writes, made at the first large write.
enum ThreadPipe {
    Untried,
    Ready(Pipe),
    /// None could be made, or the file system takes no splices: writes use the buffer.
    Unavailable,
}

/// A pipe a thread splices write data through (its ends as files, for std's reads
/// and writes).
struct Pipe {
    read: File,
    write: File,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into a live array of two.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors were just made by pipe2 and are owned by nothing else.
        let (read, write) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // Large enough for most writes to be in the pipe whole, so that the file write
        // happens after the read lock is let go. Past /proc/sys/fs/pipe-max-size (1 MiB
        // by default) only root may go; the default 64 KiB still works.
        for bytes in PIPE_BYTES {
            // SAFETY: F_SETPIPE_SZ on a pipe we own, with an integer argument.
            if unsafe { libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, bytes as libc::c_int) } >= 0 {
                break;
            }
        }
        let pipe = Pipe { read, write };
        pipe.check_capacity()?;
        Ok(pipe)
    }

    /// A user over fs.pipe-user-pages-soft gets pipes of 8 KiB, which the read
    /// buffer's bytes would not fit in without a reader: no splicing then.
    fn check_capacity(&self) -> io::Result<()> {
        // SAFETY: F_GETPIPE_SZ on a pipe we own.
        let capacity = unsafe { libc::fcntl(self.write.as_raw_fd(), libc::F_GETPIPE_SZ) };
        if capacity < (2 * READ_BUFFER) as libc::c_int {
            return Err(io::Error::other(format!("pipe of {capacity} bytes")));
        }
        Ok(())
    }
}

/// A write's data in a thread's pipe, on its way to the file.
struct Spliced {
    /// Where the bytes in the pipe go.
    offset: u64,
    in_pipe: usize,
    /// The file's error, once it failed: the rest of the data is dropped.
    failed: Option<io::Error>,
    /// The file took no splice (EINVAL: its file system has no splice_write), so the
    /// data was copied through a buffer instead.
    copied: bool,
}

impl Spliced {
    /// Moves what is in the pipe into the device's file (or, once the file failed,
    /// drops it). An error is the pipe's own: it cannot be used again.
    fn drain(&mut self, pipe: &Pipe, device: &dyn BlockDevice) -> io::Result<()> {
        // Only for the copy: a file that takes splices never needs it.
        let mut scratch = Vec::new();
        while self.in_pipe > 0 {
            if self.failed.is_none() && !self.copied {
                let Some(file) = device.splice_target() else {
                    self.copied = true;
                    continue;
                };
                match splice(pipe.read.as_fd(), file, Some(&mut self.offset), self.in_pipe, 0) {
                    Ok(0) => self.failed = Some(io::ErrorKind::WriteZero.into()),
                    Ok(n) => self.in_pipe -= n,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.copied = true,
                    Err(e) => self.failed = Some(e),
                }
                continue;
            }
            // Through a buffer: into the device (copied), or dropped once it failed.
            scratch.resize(self.in_pipe.min(64 << 10), 0);
            let n = match (&pipe.read).read(&mut scratch) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            self.in_pipe -= n;
            if self.failed.is_none() {
                match device.write_at(&scratch[..n], self.offset) {
                    Ok(()) => self.offset += n as u64,
                    Err(e) => self.failed = Some(e),
                }
            }
        }
        Ok(())
    }
}

/// One `splice(2)` of at most `len` bytes (to `offset` in `to` when given), retried
/// when interrupted.
fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    offset: Option<&mut u64>,
    len: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let mut off = offset.as_deref().map(|&o| o as libc::loff_t);
    loop {
        let off_ptr = off.as_mut().map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
        // SAFETY: splice between two descriptors we hold; the offset pointer is null or
        // points to a live local.
        let r = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                off_ptr,
                len,
                libc::SPLICE_F_MOVE | flags,
            )
        };
        if r >= 0 {
            if let (Some(o), Some(new)) = (offset, off) {
                *o = new as u64;
            }
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Why reading a request ended the connection.
#[derive(Debug, thiserror::Error)]
enum RequestError {
    #[error("i/o on the connection: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ParseError),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipe_too_small_for_the_read_buffer_is_not_used() {
        let pipe = Pipe::new().expect("a pipe of at least 64 KiB");
        // What the kernel hands a user over fs.pipe-user-pages-soft (two pages).
        // SAFETY: F_SETPIPE_SZ on a pipe we own, with an integer argument.
        let r = unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, 8192) };
        assert!(r >= 0, "cannot shrink the pipe: {}", io::Error::last_os_error());
        let err = pipe.check_capacity().expect_err("an 8 KiB pipe must be refused");
        assert!(err.to_string().contains("8192"), "{err}");
    }
}
