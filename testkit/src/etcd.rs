//! A real etcd (Debian's etcd-server) on loopback ports, for the state store's tests
//! and the api's tests on etcd: started, killed (-9) and restarted like a crash would.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A real etcd (Debian's etcd-server) on loopback, in a temporary data directory,
/// started and stopped by PID. Inside a test's private namespace fixed ports are free;
/// elsewhere pass ports from [`free_port`].
pub struct Etcd {
    pub dir: tempfile::TempDir,
    child: Option<Child>,
    pub client_port: u16,
    peer_port: u16,
    /// The address it listens on (loopback unless [`Etcd::start_on`] said otherwise).
    pub host: String,
}

/// A loopback TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl Etcd {
    pub fn start(client_port: u16, peer_port: u16) -> Etcd {
        Self::start_on("127.0.0.1", client_port, peer_port)
    }

    /// An etcd listening on `host` (an address inside the test's own namespace).
    pub fn start_on(host: &str, client_port: u16, peer_port: u16) -> Etcd {
        let dir = tempfile::Builder::new()
            .prefix("hearth-etcd-")
            .tempdir()
            .expect("tempdir");
        let mut etcd = Etcd {
            dir,
            child: None,
            client_port,
            peer_port,
            host: host.to_string(),
        };
        etcd.spawn();
        etcd
    }

    /// The api's `--store` value.
    pub fn store_url(&self) -> String {
        format!("etcd://{}:{}", self.host, self.client_port)
    }

    fn spawn(&mut self) {
        let client = format!("http://{}:{}", self.host, self.client_port);
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let log = std::fs::File::create(self.dir.path().join("etcd.log")).expect("etcd log");
        let child = Command::new("etcd")
            .args(["--name", "hearth-test", "--data-dir"])
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer, "--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("hearth-test={peer}")])
            .stdin(Stdio::null())
            .stdout(Stdio::from(log.try_clone().expect("log")))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn etcd (Debian package etcd-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.healthy() {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("etcd exited with {status}: {}", self.log());
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect((self.host.as_str(), self.client_port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n");
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.contains("\"health\":\"true\"")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// Kills etcd (-9), as a crash or a pulled cable would look to its clients.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signals only the etcd process this harness started.
            unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    /// Starts etcd again on the same data directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}
