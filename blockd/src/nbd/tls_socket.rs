//! A TLS session served by the transmission threads themselves.
//!
//! After the handshake (asynchronous, with tokio-rustls) the rustls session is taken
//! out of its stream and put beside the connection's blocking socket, so the threads
//! that read requests and send replies decrypt and encrypt in place of a relay: no
//! task in between, no socket pair, no extra copy through the kernel each way.
//!
//! The session is one state machine for both directions, behind one lock that is
//! never held across a blocking socket call. Receiving reads raw bytes off the
//! socket without it, then takes it to feed the records in and take plaintext out.
//! Sending takes the send lock (records must leave in the order they were sealed),
//! seals the plaintext under the session lock into a buffer of its own, lets the
//! session go and sends. So a reply being sent to a slow peer never stops the next
//! request from being decrypted. Whatever the session has to say on its own (the
//! session tickets, a key update's answer, a warning alert) goes out ahead of the
//! next reply, so the reading thread never sends; a fatal alert goes with the
//! close_notify when the connection is cut.

use std::io::{self, IoSlice, Read, Write};
use std::sync::{Mutex, TryLockError};

use tokio_rustls::rustls::ServerConnection;

use super::transmission::{lock, send_all, BlockingSocket};

/// Bytes received off the socket per call.
const RECEIVE: usize = 256 << 10;
/// Plaintext sealed per send: the records of one chunk are sent while still in cache.
const SEAL: usize = 256 << 10;
/// A send buffer larger than this is given back after use.
const KEEP_CAPACITY: usize = 4 << 20;

pub(crate) struct TlsSocket<B> {
    socket: B,
    session: Mutex<ServerConnection>,
    /// Raw bytes received and not yet given to the session (only the thread holding
    /// the transmission read lock receives, so this is never contended).
    received: Mutex<Received>,
    /// Sealed records on their way out; held from sealing to sent.
    sending: Mutex<Vec<u8>>,
}

struct Received {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl<B: BlockingSocket> TlsSocket<B> {
    /// Takes over an established session on `socket`. What the session still has
    /// queued goes out with the first reply.
    pub(crate) fn new(socket: B, mut session: ServerConnection) -> TlsSocket<B> {
        // Sealing is bounded by SEAL per call; the session need not hold back.
        session.set_buffer_limit(None);
        TlsSocket {
            socket,
            session: Mutex::new(session),
            received: Mutex::new(Received {
                buf: vec![0; RECEIVE].into_boxed_slice(),
                start: 0,
                end: 0,
            }),
            sending: Mutex::new(Vec::new()),
        }
    }

    /// Seals `plain` (after anything the session had queued) into records, the
    /// slices together so a reply's header shares a record with its data, and sends
    /// them. The caller holds the send lock (`out`).
    fn seal_and_send(&self, out: &mut Vec<u8>, plain: &[&[u8]]) -> io::Result<()> {
        out.clear();
        {
            let mut session = lock(&self.session);
            let mut slices: Vec<IoSlice<'_>> = plain.iter().map(|p| IoSlice::new(p)).collect();
            let mut slices = &mut slices[..];
            while slices.iter().any(|s| !s.is_empty()) {
                let n = session.writer().write_vectored(slices)?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                IoSlice::advance_slices(&mut slices, n);
            }
            while session.wants_write() {
                session.write_tls(&mut *out)?;
            }
        }
        if !out.is_empty() {
            send_all(&self.socket, &mut [IoSlice::new(out)])?;
        }
        Ok(())
    }

    /// Plaintext into `buf`: what the session has, else records received off the
    /// socket (waiting for them unless `wait` is false: then `WouldBlock`).
    fn receive(&self, buf: &mut [u8], wait: bool) -> io::Result<usize> {
        let mut rx = lock(&self.received);
        loop {
            let answer = {
                let mut session = lock(&self.session);
                let mut answer = None;
                while answer.is_none() {
                    match session.reader().read(buf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        // Plaintext, the peer's close_notify (0) or its unclean end.
                        r => {
                            answer = Some(r);
                            break;
                        }
                    }
                    if rx.start == rx.end {
                        break;
                    }
                    let Received { buf: raw, start, end } = &mut *rx;
                    let fed = session.read_tls(&mut &raw[*start..*end])?;
                    *start += fed;
                    if let Err(e) = session.process_new_packets() {
                        // The session has queued an alert saying why.
                        answer = Some(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                    }
                }
                answer
            };
            if let Some(answer) = answer {
                return answer;
            }
            // Every byte received is in the session; more must come off the wire.
            let n = if wait {
                self.socket.recv(&mut rx.buf)?
            } else {
                self.socket.try_recv(&mut rx.buf)?
            };
            if n == 0 {
                // End of stream: the session tells a clean close from a cut one.
                lock(&self.session).read_tls(&mut io::empty())?;
            }
            rx.start = 0;
            rx.end = n;
        }
    }
}

impl<B: BlockingSocket> BlockingSocket for TlsSocket<B> {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.receive(buf, true)
    }

    fn try_recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.receive(buf, false)
    }

    /// Seals and sends every byte before returning (a partial count would leave a
    /// record half sent), SEAL bytes at a time.
    fn send_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut out = lock(&self.sending);
        let mut total = 0;
        let mut window: Vec<&[u8]> = Vec::with_capacity(bufs.len());
        let mut in_window = 0;
        for b in bufs {
            let mut rest: &[u8] = b;
            total += rest.len();
            while !rest.is_empty() {
                let take = rest.len().min(SEAL - in_window);
                window.push(&rest[..take]);
                in_window += take;
                rest = &rest[take..];
                if in_window == SEAL {
                    self.seal_and_send(&mut out, &window)?;
                    window.clear();
                    in_window = 0;
                }
            }
        }
        if in_window > 0 {
            self.seal_and_send(&mut out, &window)?;
        }
        if out.capacity() > KEEP_CAPACITY {
            *out = Vec::new();
        }
        Ok(total)
    }

    fn close(&self) {
        // A close_notify if it can go at once: a peer that stopped reading, or a
        // send in progress, must not delay the cut.
        let sending = match self.sending.try_lock() {
            Ok(out) => Some(out),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(mut out) = sending {
            out.clear();
            {
                let mut session = lock(&self.session);
                session.send_close_notify();
                while session.wants_write() {
                    if session.write_tls(&mut *out).is_err() {
                        break;
                    }
                }
            }
            let _ = self.socket.try_send(&out);
        }
        self.socket.close();
    }

    fn stop_receiving(&self) {
        self.socket.stop_receiving();
    }

    fn has_pending(&self) -> bool {
        let plaintext = lock(&self.session)
            .process_new_packets()
            .is_ok_and(|state| state.plaintext_bytes_to_read() > 0);
        let rx = lock(&self.received);
        plaintext || rx.start < rx.end || self.socket.has_pending()
    }
}
