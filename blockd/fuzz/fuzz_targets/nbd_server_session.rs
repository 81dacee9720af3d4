//! Arbitrary bytes as a client's side of an NBD session: the server runs its
//! handshake and transmission phase over a socket pair. It must never panic and
//! must finish (the input ends, so the session must end) within the time limit.
#![no_main]

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use blockd::device::MemoryDevice;
use blockd::nbd::{ExportOptions, NbdServer, ResizeRefused, Resizer, ServerConfig};
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    })
}

fn server() -> &'static NbdServer {
    static SERVER: OnceLock<NbdServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let s = NbdServer::new(ServerConfig {
            handshake_timeout: Duration::from_secs(1),
            ..ServerConfig::default()
        });
        s.add_export("disk", Arc::new(MemoryDevice::new(1 << 20)), ExportOptions::default())
            .expect("add");
        let ro = ExportOptions {
            read_only: true,
            description: "ro".into(),
            ..Default::default()
        };
        s.add_export("ro", Arc::new(MemoryDevice::new(64 << 10)), ro)
            .expect("add");
        let grow = ExportOptions {
            resizer: Some(Arc::new(Refuses)),
            ..Default::default()
        };
        s.add_export("grow", Arc::new(MemoryDevice::new(64 << 10)), grow)
            .expect("add");
        s
    })
}

/// Says yes to growth up to 1 MiB (without growing anything: the protocol is what is
/// fuzzed), no beyond.
#[derive(Debug)]
struct Refuses;

impl Resizer for Refuses {
    fn resize(&self, size: u64) -> Result<(), ResizeRefused> {
        if size > 1 << 20 {
            return Err(ResizeRefused {
                errno: 28,
                message: "too large".into(),
            });
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let input = data.to_vec();
    runtime().block_on(async move {
        let (client, server_end) = tokio::net::UnixStream::pair().expect("socket pair");
        let s = server().clone();
        let conn = tokio::spawn(async move { s.serve_connection(server_end).await });
        let (mut r, mut w) = tokio::io::split(client);
        let feed = tokio::spawn(async move {
            let _ = w.write_all(&input).await;
            let _ = w.shutdown().await;
        });
        let drain = tokio::spawn(async move {
            let mut sink = [0u8; 8192];
            while matches!(r.read(&mut sink).await, Ok(n) if n > 0) {}
        });
        match tokio::time::timeout(Duration::from_secs(5), conn).await {
            Err(_) => panic!("the session did not end after its input did"),
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(_) => {}
        }
        // Nothing of this input may outlive it (keeps the leak checker meaningful).
        let _ = tokio::time::timeout(Duration::from_secs(5), feed).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
    });
});
