//! Serial consoles.
//!
//! vmm-manager is the one client of each VMM's serial socket. A [`SerialConsole`] keeps
//! the socket connected while the VMM lives, appends output to the VM's console log
//! (unless the VMM writes that log itself, as QEMU does with `logfile=`), keeps the
//! most recent output in a ring buffer, and fans it out to any number of readers over
//! bounded channels (a slow reader loses data, never the guest or other readers).
//! Input comes from at most one writer at a time.

use std::collections::VecDeque;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{broadcast, mpsc, OwnedMutexGuard};
use tokio::task::JoinHandle;

/// Bytes of recent output kept in memory for newly attached readers.
pub const RING_BYTES: usize = 256 * 1024;
/// Chunks buffered per reader before it starts losing output.
const READER_QUEUE: usize = 1024;

struct Shared {
    ring: Mutex<VecDeque<u8>>,
    output: broadcast::Sender<Bytes>,
    writer: Arc<tokio::sync::Mutex<()>>,
    /// Bumped to ask the current writer to give up its turn.
    takeover: tokio::sync::watch::Sender<u64>,
}

/// A VM's serial console, alive while its VMM runs.
pub struct SerialConsole {
    shared: Arc<Shared>,
    input: mpsc::Sender<Bytes>,
    task: JoinHandle<()>,
}

impl Drop for SerialConsole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A reader's view: what was printed before it attached, then live output.
pub struct ConsoleSubscription {
    pub scrollback: Bytes,
    pub live: broadcast::Receiver<Bytes>,
}

/// The right to type into the console. Dropping it lets the next writer in.
pub struct ConsoleWriter {
    input: mpsc::Sender<Bytes>,
    _turn: OwnedMutexGuard<()>,
    takeover: tokio::sync::watch::Receiver<u64>,
}

impl ConsoleWriter {
    /// Sends keystrokes to the guest. Fails once the console is gone.
    pub async fn write(&self, data: Bytes) -> Result<(), ConsoleGone> {
        self.input.send(data).await.map_err(|_| ConsoleGone)
    }

    /// Resolves when another client takes the writer's turn over (see
    /// [`SerialConsole::take_writer`]); the holder must then drop this writer.
    pub async fn taken_over(&mut self) {
        if self.takeover.changed().await.is_err() {
            // The console is gone; nobody can take over any more.
            std::future::pending::<()>().await;
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the console is gone (the VM stopped)")]
pub struct ConsoleGone;

impl SerialConsole {
    /// Starts serving the serial socket at `socket`. `log` is the VM's console log: when
    /// `write_log` is set vmm-manager appends to it, otherwise the VMM does and vmm-manager
    /// only reads it. The ring starts with the log's tail, so a re-adopted VM keeps its
    /// scrollback.
    pub fn start(socket: PathBuf, log: PathBuf, write_log: bool) -> Self {
        let (output, _) = broadcast::channel(READER_QUEUE);
        let initial = read_tail(&log, RING_BYTES).unwrap_or_default();
        let shared = Arc::new(Shared {
            ring: Mutex::new(VecDeque::from(initial)),
            output,
            writer: Arc::new(tokio::sync::Mutex::new(())),
            takeover: tokio::sync::watch::channel(0).0,
        });
        let (input, input_rx) = mpsc::channel(64);
        let task = tokio::spawn(pump(socket, write_log.then_some(log), shared.clone(), input_rx));
        Self { shared, input, task }
    }

    /// Attaches a reader.
    pub fn subscribe(&self) -> ConsoleSubscription {
        // Snapshot and subscribe under the ring's lock, which the pump also holds while
        // it appends and broadcasts, so no byte is missed or seen twice.
        let ring = lock(&self.shared.ring);
        let live = self.shared.output.subscribe();
        let (a, b) = ring.as_slices();
        let mut scrollback = Vec::with_capacity(ring.len());
        scrollback.extend_from_slice(a);
        scrollback.extend_from_slice(b);
        ConsoleSubscription {
            scrollback: Bytes::from(scrollback),
            live,
        }
    }

    /// Takes the writer's turn, unless someone else holds it.
    pub fn try_writer(&self) -> Option<ConsoleWriter> {
        let takeover = self.shared.takeover.subscribe();
        let turn = self.shared.writer.clone().try_lock_owned().ok()?;
        Some(ConsoleWriter {
            input: self.input.clone(),
            _turn: turn,
            takeover,
        })
    }

    /// Takes the writer's turn even if someone holds it: the holder is told to give it
    /// up (and becomes a reader), and this waits until it has, at most `patience`.
    pub async fn take_writer(&self, patience: std::time::Duration) -> Option<ConsoleWriter> {
        if let Some(w) = self.try_writer() {
            return Some(w);
        }
        self.shared.takeover.send_modify(|n| *n += 1);
        let takeover = self.shared.takeover.subscribe();
        let turn = tokio::time::timeout(patience, self.shared.writer.clone().lock_owned())
            .await
            .ok()?;
        Some(ConsoleWriter {
            input: self.input.clone(),
            _turn: turn,
            takeover,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether the serial socket is served by the VM's own VMM user (see
/// [`crate::jail::Jailer::check_peer`]).
fn peer_ok(socket: &std::path::Path, stream: &UnixStream) -> bool {
    let Some(dir) = socket.parent() else { return true };
    match crate::jail::Jailer::check_peer(&crate::vm_dir::VmDir { dir: dir.to_path_buf() }, stream) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(socket = %socket.display(), "not connecting the console: {e}");
            false
        }
    }
}

/// Keeps the serial socket connected and moves bytes both ways.
async fn pump(socket: PathBuf, log: Option<PathBuf>, shared: Arc<Shared>, mut input: mpsc::Receiver<Bytes>) {
    let mut log_file = log.and_then(|p| {
        crate::vm_dir::open_regular(&p, std::fs::OpenOptions::new().create(true).append(true))
            .map_err(|e| tracing::warn!(log = %p.display(), "cannot open console log: {e}"))
            .ok()
    });
    loop {
        let stream = match UnixStream::connect(&socket).await {
            Ok(s) if peer_ok(&socket, &s) => s,
            Ok(_) => {
                // Not the VMM's own socket (a jailed VMM put something else there).
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            Err(_) => {
                // The VMM may not have bound it yet, or is rebooting: keep trying while
                // the console lives (the supervisor drops it when the VMM exits).
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (mut rd, mut wr) = stream.into_split();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            tokio::select! {
                n = rd.read(&mut buf) => {
                    let n = match n { Ok(0) | Err(_) => break, Ok(n) => n };
                    let chunk = Bytes::copy_from_slice(&buf[..n]);
                    if let Some(f) = log_file.as_mut() {
                        let _ = f.write_all(&chunk);
                    }
                    let mut ring = lock(&shared.ring);
                    ring.extend(chunk.iter());
                    let excess = ring.len().saturating_sub(RING_BYTES);
                    ring.drain(..excess);
                    // No receivers is fine: nobody is watching.
                    let _ = shared.output.send(chunk);
                }
                data = input.recv() => {
                    match data {
                        Some(d) => { if wr.write_all(&d).await.is_err() { break; } }
                        None => return,
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The last `max` bytes of a file (all of it when shorter).
pub fn read_tail(path: &Path, max: usize) -> std::io::Result<Vec<u8>> {
    let mut f = crate::vm_dir::open_regular(path, std::fs::OpenOptions::new().read(true))?;
    let len = f.metadata()?.len();
    let start = len.saturating_sub(max as u64);
    f.seek(SeekFrom::Start(start))?;
    let mut out = Vec::with_capacity((len - start) as usize);
    f.read_to_end(&mut out)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    async fn recv_until(rx: &mut broadcast::Receiver<Bytes>, want: &str) -> String {
        let mut seen = String::new();
        while !seen.contains(want) {
            match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                Ok(Ok(b)) => seen.push_str(&String::from_utf8_lossy(&b)),
                other => panic!("waiting for {want:?}, got {other:?} after {seen:?}"),
            }
        }
        seen
    }

    #[tokio::test]
    async fn output_reaches_log_ring_and_every_reader_and_one_writer_types() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("serial.sock");
        let log = dir.path().join("console.log");
        std::fs::write(&log, "old boot\n")?;
        let listener = UnixListener::bind(&sock)?;
        let console = SerialConsole::start(sock.clone(), log.clone(), true);
        let (mut guest, _) = listener.accept().await?;

        let mut a = console.subscribe();
        assert_eq!(&a.scrollback[..], b"old boot\n");
        guest.write_all(b"hello\r\n").await?;
        recv_until(&mut a.live, "hello").await;
        let mut b = console.subscribe();
        assert_eq!(&b.scrollback[..], b"old boot\nhello\r\n");

        let w = console.try_writer().expect("first writer gets the turn");
        assert!(console.try_writer().is_none(), "only one writer at a time");
        w.write(Bytes::from_static(b"ls\n"))
            .await
            .map_err(std::io::Error::other)?;
        let mut got = [0u8; 3];
        guest.read_exact(&mut got).await?;
        assert_eq!(&got, b"ls\n");
        drop(w);
        assert!(console.try_writer().is_some(), "the turn passes on when dropped");
        let mut first = console.try_writer().expect("a writer again");
        let holder = tokio::spawn(async move {
            first.taken_over().await;
            drop(first);
        });
        let second = console
            .take_writer(Duration::from_secs(5))
            .await
            .expect("taking over succeeds once the holder lets go");
        holder.await.expect("holder");
        assert!(console.try_writer().is_none(), "the new writer holds the turn");
        drop(second);

        guest.write_all(b"world\r\n").await?;
        recv_until(&mut a.live, "world").await;
        recv_until(&mut b.live, "world").await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(std::fs::read_to_string(&log)?, "old boot\nhello\r\nworld\r\n");
        Ok(())
    }

    #[tokio::test]
    async fn a_reader_that_stops_reading_does_not_stall_the_guest_or_others() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("serial.sock");
        let listener = UnixListener::bind(&sock)?;
        let console = SerialConsole::start(sock, dir.path().join("log"), true);
        let (mut guest, _) = listener.accept().await?;
        let _stalled = console.subscribe();
        let mut live = console.subscribe().live;
        let line = vec![b'x'; 1000];
        let writer = tokio::spawn(async move {
            for _ in 0..(4 * READER_QUEUE) {
                guest.write_all(&line).await?;
            }
            guest.write_all(b"END\n").await?;
            Ok::<_, std::io::Error>(guest)
        });
        let mut tail = String::new();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), live.recv()).await {
                Ok(Ok(b)) => {
                    tail.push_str(&String::from_utf8_lossy(&b));
                    if tail.contains("END") {
                        break;
                    }
                    let keep = tail.len().saturating_sub(8);
                    tail.drain(..keep);
                }
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                other => panic!("live reader stalled: {other:?}"),
            }
        }
        assert!(tokio::time::timeout(Duration::from_secs(5), writer).await.is_ok());
        Ok(())
    }
}
