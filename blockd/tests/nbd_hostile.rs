//! The NBD server against hostile and broken peers, over socket pairs: refused
//! requests get error replies and leave the connection usable, protocol violations
//! end it, nothing panics, and every connection ends within a bound. Requests held
//! up in a device (a gate the test opens) show the transmission threads' rules: a
//! slow request does not hold up quick ones behind it, requests in flight still get
//! their replies when the export is removed or the client sends NBD_CMD_DISC and
//! stays connected. The last test is the stable stand-in for the cargo-fuzz targets
//! in `blockd/fuzz`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use blockd::device::{BlockDevice, MemoryDevice};
use blockd::nbd::proto::*;
use blockd::nbd::{ClientError, ExportOptions, NbdClient, NbdServer, ResizeRefused, Resizer, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

const SIZE: u64 = 1 << 20;

fn server(config: ServerConfig) -> NbdServer {
    let server = NbdServer::new(config);
    server
        .add_export("disk", Arc::new(MemoryDevice::new(SIZE)), ExportOptions::default())
        .expect("add");
    server
        .add_export(
            "ro",
            Arc::new(MemoryDevice::new(SIZE)),
            ExportOptions {
                read_only: true,
                ..Default::default()
            },
        )
        .expect("add");
    server
}

/// Connects a client over a socket pair to `server`; returns the client's end.
fn connect(server: &NbdServer) -> (UnixStream, tokio::task::JoinHandle<()>) {
    let (client, server_end) = UnixStream::pair().expect("socket pair");
    let s = server.clone();
    let task = tokio::spawn(async move { s.serve_connection(server_end).await });
    (client, task)
}

async fn read_greeting(c: &mut UnixStream) {
    let mut g = [0u8; GREETING_LEN];
    c.read_exact(&mut g).await.expect("greeting");
    assert_eq!(parse_greeting(&g), Ok(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES));
}

async fn read_option_reply(c: &mut UnixStream) -> (OptionReplyHeader, Vec<u8>) {
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    c.read_exact(&mut h).await.expect("option reply");
    let h = parse_option_reply_header(&h).expect("option reply header");
    let mut payload = vec![0; h.len as usize];
    c.read_exact(&mut payload).await.expect("option reply payload");
    (h, payload)
}

/// Handshake with NBD_OPT_GO; returns the transmission flags.
async fn go(c: &mut UnixStream, export: &str, structured: bool) -> u16 {
    read_greeting(c).await;
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    if structured {
        encode_option(&mut out, OPT_STRUCTURED_REPLY, &[]);
    }
    encode_option(&mut out, OPT_GO, &encode_info_request(export, &[]));
    c.write_all(&out).await.expect("send options");
    if structured {
        assert_eq!(read_option_reply(c).await.0.reply_type, REP_ACK);
    }
    let mut flags = None;
    loop {
        let (h, payload) = read_option_reply(c).await;
        match h.reply_type {
            REP_INFO => {
                if let Ok(Info::Export { flags: f, .. }) = parse_info_reply(&payload) {
                    flags = Some(f);
                }
            }
            REP_ACK => return flags.expect("NBD_INFO_EXPORT before the ACK"),
            other => panic!("unexpected reply {other:#x}"),
        }
    }
}

async fn send(c: &mut UnixStream, command: u16, flags: u16, cookie: u64, offset: u64, len: u32) {
    c.write_all(&encode_request(&Request {
        flags,
        command,
        cookie,
        offset,
        len,
    }))
    .await
    .expect("send request");
}

/// Reads a simple reply (and `data` bytes of read data when it succeeded).
async fn simple_reply(c: &mut UnixStream, data: usize) -> (u32, u64, Vec<u8>) {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    c.read_exact(&mut h).await.expect("reply");
    let ReplyHeader::Simple { error, cookie } = parse_reply_header(&h).expect("reply header") else {
        panic!("expected a simple reply")
    };
    let mut buf = vec![0; if error == 0 { data } else { 0 }];
    c.read_exact(&mut buf).await.expect("read data");
    (error, cookie, buf)
}

async fn expect_closed(c: &mut UnixStream) {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("the server should close the connection")
        .expect("read to end");
}

#[tokio::test]
async fn refused_requests_get_errors_and_the_connection_stays_usable() {
    let server = server(ServerConfig::default());
    let (mut c, task) = connect(&server);
    let flags = go(&mut c, "disk", false).await;
    assert_eq!(flags & TFLAG_READ_ONLY, 0);
    assert_ne!(flags & TFLAG_SEND_WRITE_ZEROES, 0);

    send(&mut c, CMD_READ, 0, 1, SIZE - 100, 4096).await;
    assert_eq!(simple_reply(&mut c, 4096).await.0, EINVAL, "read past the end");
    send(&mut c, CMD_READ, 0, 2, u64::MAX - 10, 4096).await;
    assert_eq!(simple_reply(&mut c, 4096).await.0, EINVAL, "offset overflow");
    send(&mut c, CMD_READ, 0, 3, 0, MAX_REQUEST_LEN + 1).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EINVAL, "read over 32 MiB");
    send(&mut c, 99, 0, 4, 0, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EINVAL, "unknown command");
    send(&mut c, CMD_READ, 0x100, 5, 0, 512).await;
    assert_eq!(simple_reply(&mut c, 512).await.0, EINVAL, "unknown flag");
    send(&mut c, CMD_BLOCK_STATUS, 0, 6, 0, 512).await;
    assert_eq!(
        simple_reply(&mut c, 0).await.0,
        EINVAL,
        "block status was not negotiated"
    );

    // An oversized write is refused, and its data skipped so the stream stays in step.
    let big = MAX_REQUEST_LEN + 4096;
    send(&mut c, CMD_WRITE, 0, 7, 0, big).await;
    let writer = {
        let zeros = vec![0x77u8; big as usize];
        let (mut r, mut w) = tokio::io::split(c);
        let feed = tokio::spawn(async move {
            w.write_all(&zeros).await.expect("write payload");
            w
        });
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        r.read_exact(&mut h).await.expect("reply");
        assert_eq!(
            parse_reply_header(&h),
            Ok(ReplyHeader::Simple {
                error: EINVAL,
                cookie: 7
            })
        );
        let w = feed.await.expect("feed");
        r.unsplit(w)
    };
    let mut c = writer;
    send(&mut c, CMD_WRITE, 0, 8, SIZE - 10, 20).await;
    c.write_all(&[1u8; 20]).await.expect("payload");
    assert_eq!(simple_reply(&mut c, 0).await.0, ENOSPC, "write past the end");

    // Still usable: a write and a read.
    send(&mut c, CMD_WRITE, CMD_FLAG_FUA, 9, 4096, 4).await;
    c.write_all(b"abcd").await.expect("payload");
    assert_eq!(simple_reply(&mut c, 0).await, (0, 9, vec![]));
    send(&mut c, CMD_READ, 0, 10, 4096, 4).await;
    assert_eq!(simple_reply(&mut c, 4).await, (0, 10, b"abcd".to_vec()));
    send(&mut c, CMD_FLUSH, 0, 11, 0, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, 0);

    // Bad magic ends the connection.
    c.write_all(&[0xde; REQUEST_LEN]).await.expect("garbage");
    expect_closed(&mut c).await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("connection ends")
        .expect("no panic");
}

#[tokio::test]
async fn structured_read_errors_and_read_only_refusals() {
    let server = server(ServerConfig::default());
    let (mut c, _task) = connect(&server);
    let flags = go(&mut c, "ro", true).await;
    assert_ne!(flags & TFLAG_READ_ONLY, 0);
    assert_eq!(flags & TFLAG_SEND_TRIM, 0);
    send(&mut c, CMD_WRITE, 0, 1, 0, 3).await;
    c.write_all(b"abc").await.expect("payload");
    assert_eq!(simple_reply(&mut c, 0).await.0, EPERM);
    send(&mut c, CMD_TRIM, 0, 2, 0, 4096).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EPERM);
    send(&mut c, CMD_READ, 0, 3, SIZE, 1).await;
    let mut h = [0u8; STRUCTURED_HEADER_LEN];
    c.read_exact(&mut h).await.expect("chunk");
    let ReplyHeader::Structured {
        flags,
        chunk_type,
        cookie,
        len,
    } = parse_reply_header(&h).expect("header")
    else {
        panic!("reads get structured replies once negotiated")
    };
    assert_eq!((flags, chunk_type, cookie), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3));
    let mut p = vec![0; len as usize];
    c.read_exact(&mut p).await.expect("payload");
    assert_eq!(parse_structured_error(&p).expect("error chunk").0, EINVAL);
    send(&mut c, CMD_READ, 0, 4, 0, 8).await;
    c.read_exact(&mut h).await.expect("chunk");
    assert_eq!(
        parse_reply_header(&h),
        Ok(ReplyHeader::Structured {
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_OFFSET_DATA,
            cookie: 4,
            len: 16
        })
    );
    let mut p = [0u8; 16];
    c.read_exact(&mut p).await.expect("data");
    assert_eq!(p, [0u8; 16]);
}

#[tokio::test]
async fn handshake_options_list_unsupported_and_oversized() {
    let server = server(ServerConfig::default());
    let (mut c, _t) = connect(&server);
    read_greeting(&mut c).await;
    let mut out = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    encode_option(&mut out, OPT_LIST, &[]);
    encode_option(&mut out, OPT_STARTTLS, &[]);
    encode_option(&mut out, 42, b"whatever");
    encode_option(&mut out, OPT_LIST, b"x");
    encode_option(&mut out, OPT_INFO, &encode_info_request("missing", &[]));
    encode_option(&mut out, OPT_INFO, &[0, 0, 0, 200]);
    encode_option(&mut out, OPT_GO, &[0, 0, 0, 0]);
    c.write_all(&out).await.expect("options");
    let mut names = Vec::new();
    loop {
        let (h, p) = read_option_reply(&mut c).await;
        if h.reply_type == REP_ACK {
            break;
        }
        assert_eq!(h.reply_type, REP_SERVER);
        names.push(parse_rep_server(&p).expect("server reply").0);
    }
    assert_eq!(names, ["disk", "ro"]);
    assert_eq!(read_option_reply(&mut c).await.0.reply_type, REP_ERR_UNSUP, "STARTTLS");
    assert_eq!(
        read_option_reply(&mut c).await.0.reply_type,
        REP_ERR_UNSUP,
        "unknown option"
    );
    assert_eq!(
        read_option_reply(&mut c).await.0.reply_type,
        REP_ERR_INVALID,
        "LIST with data"
    );
    assert_eq!(
        read_option_reply(&mut c).await.0.reply_type,
        REP_ERR_UNKNOWN,
        "unknown export"
    );
    assert_eq!(
        read_option_reply(&mut c).await.0.reply_type,
        REP_ERR_INVALID,
        "malformed INFO"
    );
    assert_eq!(
        read_option_reply(&mut c).await.0.reply_type,
        REP_ERR_INVALID,
        "GO without a request count"
    );

    // An option claiming 4 GiB of data: the server hangs up instead of reading it.
    let mut huge = IHAVEOPT.to_be_bytes().to_vec();
    huge.extend_from_slice(&OPT_GO.to_be_bytes());
    huge.extend_from_slice(&u32::MAX.to_be_bytes());
    c.write_all(&huge).await.expect("huge option");
    expect_closed(&mut c).await;

    // EXPORT_NAME of an unknown export also ends the connection, as the protocol says.
    let (mut c, _t) = connect(&server);
    read_greeting(&mut c).await;
    let mut out = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    encode_option(&mut out, OPT_EXPORT_NAME, b"missing");
    c.write_all(&out).await.expect("options");
    expect_closed(&mut c).await;

    // EXPORT_NAME of a known export: size, flags and (without NO_ZEROES) 124 zeroes.
    let (mut c, _t) = connect(&server);
    read_greeting(&mut c).await;
    let mut out = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    encode_option(&mut out, OPT_EXPORT_NAME, b"disk");
    c.write_all(&out).await.expect("options");
    let mut reply = [0u8; EXPORT_NAME_REPLY_LEN];
    c.read_exact(&mut reply).await.expect("export name reply");
    assert_eq!(u64::from_be_bytes(reply[..8].try_into().expect("8 bytes")), SIZE);
    send(&mut c, CMD_DISC, 0, 1, 0, 0).await;
    expect_closed(&mut c).await;
}

#[tokio::test]
async fn a_silent_peer_is_dropped_after_the_handshake_timeout() {
    let server = server(ServerConfig {
        handshake_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    });
    let (mut c, task) = connect(&server);
    read_greeting(&mut c).await;
    let started = tokio::time::Instant::now();
    expect_closed(&mut c).await;
    assert!(started.elapsed() < Duration::from_secs(2));
    task.await.expect("no panic");
}

#[tokio::test]
async fn removing_an_export_closes_its_connections_only() {
    let server = server(ServerConfig::default());
    let (mut on_disk, _a) = connect(&server);
    go(&mut on_disk, "disk", true).await;
    let (mut on_ro, _b) = connect(&server);
    go(&mut on_ro, "ro", true).await;
    assert!(server.remove_export("disk"));
    assert!(!server.remove_export("disk"));
    expect_closed(&mut on_disk).await;
    send(&mut on_ro, CMD_FLUSH, 0, 1, 0, 0).await;
    assert_eq!(
        simple_reply(&mut on_ro, 0).await.0,
        0,
        "the other export's connection still works"
    );
    assert_eq!(server.export_names(), ["ro"]);
    server.shutdown();
    expect_closed(&mut on_ro).await;
}

/// A memory device whose reads or flushes wait at a gate the test opens.
#[derive(Debug)]
struct Gated {
    inner: MemoryDevice,
    hold_reads: bool,
    gate: Arc<Gate>,
}

#[derive(Debug, Default)]
struct Gate {
    open: Mutex<bool>,
    changed: Condvar,
    /// Requests that reached the gate.
    arrived: AtomicUsize,
}

impl Gate {
    fn pass(&self) {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock().expect("gate");
        while !*open {
            open = self.changed.wait(open).expect("gate");
        }
    }
    fn open(&self) {
        *self.open.lock().expect("gate") = true;
        self.changed.notify_all();
    }
    async fn wait_arrived(&self, n: usize) {
        for _ in 0..500 {
            if self.arrived.load(Ordering::SeqCst) >= n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{n} requests never reached the device");
    }
}

impl BlockDevice for Gated {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.hold_reads {
            self.gate.pass();
        }
        self.inner.read_at(buf, offset)
    }
    fn read_at_if_cached(&self, buf: &mut [u8], offset: u64) -> Option<std::io::Result<()>> {
        // A held read is one that waits for its disk.
        (!self.hold_reads).then(|| self.inner.read_at(buf, offset))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_at(buf, offset)
    }
    fn flush(&self) -> std::io::Result<()> {
        if !self.hold_reads {
            self.gate.pass();
        }
        Ok(())
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.discard(offset, len)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.inner.write_zeroes(offset, len, may_trim)
    }
}

/// A server with one export, "slow", whose reads (or flushes) wait at the gate.
fn gated_server(hold_reads: bool) -> (NbdServer, Arc<Gate>) {
    let gate = Arc::new(Gate::default());
    let server = NbdServer::new(ServerConfig::default());
    let device = Gated {
        inner: MemoryDevice::new(SIZE),
        hold_reads,
        gate: gate.clone(),
    };
    server
        .add_export("slow", Arc::new(device), ExportOptions::default())
        .expect("add");
    (server, gate)
}

#[tokio::test]
async fn a_slow_flush_does_not_hold_up_reads_behind_it() {
    let (server, gate) = gated_server(false);
    let (mut c, _task) = connect(&server);
    go(&mut c, "slow", false).await;
    send(&mut c, CMD_FLUSH, 0, 1, 0, 0).await;
    gate.wait_arrived(1).await;
    // The flush holds its thread; the read is answered by another meanwhile.
    send(&mut c, CMD_READ, 0, 2, 4096, 4096).await;
    let (error, cookie, _) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut c, 4096))
        .await
        .expect("the read is answered while the flush waits");
    assert_eq!((error, cookie), (0, 2));
    gate.open();
    assert_eq!(simple_reply(&mut c, 0).await.0, 0, "then the flush");
}

#[tokio::test]
async fn a_read_that_waits_for_its_disk_does_not_hold_up_quick_requests() {
    // Quick requests are served by one thread; a read that has to wait for the disk
    // (its data is not in memory) first hands the socket to another thread.
    let (server, gate) = gated_server(true);
    let (mut c, _task) = connect(&server);
    go(&mut c, "slow", false).await;
    send(&mut c, CMD_READ, 0, 1, 0, 4096).await;
    gate.wait_arrived(1).await;
    send(&mut c, CMD_WRITE, 0, 2, 8192, 4096).await;
    c.write_all(&[9u8; 4096]).await.expect("write data");
    let reply = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut c, 0))
        .await
        .expect("the write is answered while the read waits");
    assert_eq!(reply, (0, 2, Vec::new()));
    gate.open();
    let (error, cookie, data) = simple_reply(&mut c, 4096).await;
    assert_eq!((error, cookie, data.len()), (0, 1, 4096), "then the read");
}

#[tokio::test]
async fn requests_in_flight_are_answered_when_the_export_goes() {
    let (server, gate) = gated_server(true);
    let (mut c, task) = connect(&server);
    go(&mut c, "slow", false).await;
    send(&mut c, CMD_READ, 0, 7, 0, 65536).await;
    gate.wait_arrived(1).await;
    assert!(server.remove_export("slow"));
    // No new requests are read, but the one being served still gets its reply.
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open();
    let (error, cookie, data) = tokio::time::timeout(Duration::from_secs(5), simple_reply(&mut c, 65536))
        .await
        .expect("the reply comes");
    assert_eq!((error, cookie, data.len()), (0, 7, 65536));
    expect_closed(&mut c).await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("the connection ends")
        .expect("no panic");
}

#[tokio::test]
async fn disc_with_the_socket_left_open_ends_the_connection() {
    let (server, gate) = gated_server(false);
    let (mut c, task) = connect(&server);
    go(&mut c, "slow", false).await;
    // A flush in flight (its thread started another), then NBD_CMD_DISC while the
    // client keeps its end open: every thread must end, the flush answered first.
    send(&mut c, CMD_FLUSH, 0, 1, 0, 0).await;
    gate.wait_arrived(1).await;
    send(&mut c, CMD_DISC, 0, 2, 0, 0).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    gate.open();
    assert_eq!(
        simple_reply(&mut c, 0).await,
        (0, 1, Vec::new()),
        "the flush is answered"
    );
    expect_closed(&mut c).await;
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("every thread of the connection ended")
        .expect("no panic");
}

#[tokio::test]
async fn our_client_over_a_socket_pair() {
    let server = server(ServerConfig::default());
    let (client_end, server_end) = UnixStream::pair().expect("socket pair");
    let s = server.clone();
    tokio::spawn(async move { s.serve_connection(server_end).await });
    let client = NbdClient::connect_stream(client_end, "disk").await.expect("connect");
    client.write(0, &[9u8; 100_000], true).await.expect("write");
    assert_eq!(client.read(0, 100_000).await.expect("read"), vec![9u8; 100_000]);
    let err = client.read(SIZE, 1).await.expect_err("out of range");
    assert!(err.to_string().contains("error 22"), "{err}");
    assert!(!err.is_connection_error());
    // A peer that hangs up at once is an error, not a hang.
    let (gone, peer) = UnixStream::pair().expect("socket pair");
    drop(peer);
    assert!(NbdClient::connect_stream(gone, "x").await.is_err());
}

/// A resizer that records the sizes it is asked for and refuses more than `limit`.
#[derive(Debug)]
struct Recorder {
    asked: Mutex<Vec<u64>>,
    limit: u64,
}

impl Resizer for Recorder {
    fn resize(&self, size: u64) -> Result<(), ResizeRefused> {
        self.asked.lock().expect("asked").push(size);
        if size > self.limit {
            return Err(ResizeRefused {
                errno: ENOSPC,
                message: format!("only {} bytes fit", self.limit),
            });
        }
        Ok(())
    }
}

/// Reads a structured reply that must be an error; returns its value and message.
async fn structured_error(c: &mut UnixStream, want_cookie: u64) -> (u32, String) {
    let mut h = [0u8; STRUCTURED_HEADER_LEN];
    c.read_exact(&mut h).await.expect("chunk");
    let Ok(ReplyHeader::Structured {
        chunk_type,
        cookie,
        len,
        ..
    }) = parse_reply_header(&h)
    else {
        panic!("expected a structured reply")
    };
    assert_eq!((chunk_type, cookie), (REPLY_TYPE_ERROR, want_cookie));
    let mut p = vec![0; len as usize];
    c.read_exact(&mut p).await.expect("payload");
    parse_structured_error(&p).expect("error chunk")
}

#[tokio::test]
async fn resize_requests_are_checked_before_the_resizer_sees_them() {
    let server = server(ServerConfig::default());
    let resizer = Arc::new(Recorder {
        asked: Mutex::default(),
        limit: 4 * SIZE,
    });
    let options = |read_only| ExportOptions {
        read_only,
        resizer: Some(resizer.clone() as Arc<dyn Resizer>),
        ..Default::default()
    };
    let device = || Arc::new(MemoryDevice::new(SIZE));
    server.add_export("grow", device(), options(false)).expect("add");
    server.add_export("ro-grow", device(), options(true)).expect("add");

    // Without a resizer an export does not offer resizing and refuses it; a read-only
    // one neither, and refuses it as it refuses writes.
    for (export, refusal) in [("disk", EINVAL), ("ro-grow", EPERM)] {
        let (mut c, _t) = connect(&server);
        assert_eq!(go(&mut c, export, false).await & TFLAG_SEND_RESIZE, 0, "{export}");
        send(&mut c, CMD_RESIZE, 0, 1, 2 * SIZE, 0).await;
        assert_eq!(simple_reply(&mut c, 0).await.0, refusal, "{export}");
    }

    let (mut c, _t) = connect(&server);
    assert_ne!(go(&mut c, "grow", false).await & TFLAG_SEND_RESIZE, 0);
    send(&mut c, CMD_RESIZE, 0, 1, 2 * SIZE, 512).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EINVAL, "a length with the new size");
    send(&mut c, CMD_RESIZE, CMD_FLAG_FUA, 2, 2 * SIZE, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EINVAL, "a flag");
    send(&mut c, CMD_RESIZE, 0, 3, SIZE / 2, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, EINVAL, "shrinking");
    send(&mut c, CMD_RESIZE, 0, 4, SIZE, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, 0, "the size it has");
    assert!(
        resizer.asked.lock().expect("asked").is_empty(),
        "none of those reached the resizer"
    );
    send(&mut c, CMD_RESIZE, 0, 5, 2 * SIZE, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await, (0, 5, vec![]));
    send(&mut c, CMD_RESIZE, 0, 6, 8 * SIZE, 0).await;
    assert_eq!(simple_reply(&mut c, 0).await.0, ENOSPC, "the resizer's refusal");
    assert_eq!(*resizer.asked.lock().expect("asked"), [2 * SIZE, 8 * SIZE]);
    send(&mut c, CMD_READ, 0, 7, 0, 512).await;
    assert_eq!(simple_reply(&mut c, 512).await.0, 0, "still usable");

    // With structured replies the refusals carry their reasons.
    let (mut c, _t) = connect(&server);
    go(&mut c, "grow", true).await;
    send(&mut c, CMD_RESIZE, 0, 1, 8 * SIZE, 0).await;
    let (errno, message) = structured_error(&mut c, 1).await;
    assert_eq!(errno, ENOSPC);
    assert_eq!(message, format!("only {} bytes fit", 4 * SIZE));
    send(&mut c, CMD_RESIZE, 0, 2, SIZE / 2, 0).await;
    let (errno, message) = structured_error(&mut c, 2).await;
    assert_eq!(errno, EINVAL);
    assert!(message.contains("never shrunk"), "{message}");

    // Our client: it asks only exports that offer resizing, and shows the reason.
    for (export, want) in [("disk", None), ("grow", Some(ENOSPC))] {
        let (client_end, server_end) = UnixStream::pair().expect("socket pair");
        let s = server.clone();
        tokio::spawn(async move { s.serve_connection(server_end).await });
        let client = NbdClient::connect_stream(client_end, export).await.expect("connect");
        let err = client.resize(8 * SIZE).await.expect_err("refused");
        match want {
            None => assert!(matches!(err, ClientError::ResizeUnsupported), "{err}"),
            Some(errno) => {
                assert!(
                    matches!(&err, ClientError::Request { errno: e, message, .. } if *e == errno && message.contains("fit")),
                    "{err}"
                )
            }
        }
    }
    assert_eq!(resizer.asked.lock().expect("asked").len(), 4);
}

/// A deterministic xorshift generator: the test needs no dependency and a failure
/// can be replayed from the seed in its message.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// A well-formed session to mutate: handshake, then a mix of requests.
fn valid_session(rng: &mut Rng) -> Vec<u8> {
    let mut out = (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes().to_vec();
    if rng.below(2) == 0 {
        encode_option(&mut out, OPT_STRUCTURED_REPLY, &[]);
    }
    if rng.below(3) == 0 {
        encode_option(&mut out, OPT_LIST, &[]);
    }
    let export = ["disk", "ro", "", "grow"][rng.below(4)];
    if rng.below(4) == 0 {
        encode_option(&mut out, OPT_EXPORT_NAME, export.as_bytes());
    } else {
        encode_option(
            &mut out,
            OPT_GO,
            &encode_info_request(export, &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]),
        );
    }
    for cookie in 0..rng.below(12) as u64 {
        let command = [
            CMD_READ,
            CMD_WRITE,
            CMD_FLUSH,
            CMD_TRIM,
            CMD_WRITE_ZEROES,
            CMD_RESIZE,
            CMD_DISC,
        ][rng.below(7)];
        let len = [0, 1, 512, 4096, 65536][rng.below(5)];
        let offset = [0, 4096, SIZE - 512, SIZE, 2 * SIZE, 8 * SIZE][rng.below(6)];
        let flags = [0, CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF][rng.below(4)];
        out.extend_from_slice(&encode_request(&Request {
            flags,
            command,
            cookie,
            offset,
            len,
        }));
        if command == CMD_WRITE {
            out.extend(std::iter::repeat_n(cookie as u8, len as usize));
        }
    }
    out
}

fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(4) {
        if bytes.is_empty() {
            return;
        }
        let at = rng.below(bytes.len());
        match rng.below(5) {
            0 => bytes[at] ^= 1 << rng.below(8),
            1 => bytes[at] = rng.next() as u8,
            2 => bytes.truncate(at),
            3 => {
                // An interesting length in a length-like place.
                let v: u32 = [0, 1, 0xffff_ffff, MAX_REQUEST_LEN + 1, MAX_OPTION_LEN + 1][rng.below(5)];
                let end = (at + 4).min(bytes.len());
                bytes[at..end].copy_from_slice(&v.to_be_bytes()[..end - at]);
            }
            _ => {
                let n = rng.below(64);
                let junk: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                bytes.splice(at..at, junk);
            }
        }
    }
}

#[test]
fn random_and_mutated_streams_never_panic_and_always_end() {
    let panics = Arc::new(AtomicUsize::new(0));
    let hook_panics = panics.clone();
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        hook_panics.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut rng = Rng(seed);
    runtime.block_on(async {
        let server = server(ServerConfig {
            handshake_timeout: Duration::from_secs(2),
            ..ServerConfig::default()
        });
        let resizer = Arc::new(Recorder {
            asked: Mutex::default(),
            limit: 4 * SIZE,
        });
        let options = ExportOptions {
            resizer: Some(resizer.clone() as Arc<dyn Resizer>),
            ..Default::default()
        };
        server
            .add_export("grow", Arc::new(MemoryDevice::new(SIZE)), options)
            .expect("add");
        for i in 0..3000 {
            let mut input = match i % 3 {
                0 => (0..rng.below(512)).map(|_| rng.next() as u8).collect(),
                _ => valid_session(&mut rng),
            };
            if i % 3 != 1 {
                mutate(&mut rng, &mut input);
            }
            let (client, server_end) = UnixStream::pair().expect("socket pair");
            let s = server.clone();
            let conn = tokio::spawn(async move { s.serve_connection(server_end).await });
            let (mut r, mut w) = tokio::io::split(client);
            let feed = tokio::spawn(async move {
                let _ = w.write_all(&input).await;
                let _ = w.shutdown().await;
                w
            });
            let drain = tokio::spawn(async move {
                let mut sink = Vec::new();
                let _ = r.read_to_end(&mut sink).await;
            });
            let ended = tokio::time::timeout(Duration::from_secs(10), conn).await;
            let joined = ended.unwrap_or_else(|_| panic!("connection {i} (seed {seed:#x}) did not end within 10 s"));
            assert!(joined.is_ok(), "connection {i} (seed {seed:#x}) panicked");
            let _ = tokio::time::timeout(Duration::from_secs(10), feed).await;
            let _ = tokio::time::timeout(Duration::from_secs(10), drain).await;
        }
    });
    drop(std::panic::take_hook());
    assert_eq!(
        panics.load(Ordering::SeqCst),
        0,
        "a panic happened while serving hostile input"
    );
}
