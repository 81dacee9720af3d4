//! NBD over TLS (`NBD_OPT_STARTTLS`): blockd's server against libnbd's nbdinfo and
//! nbdcopy (`nbds://`, GnuTLS) and blockd's own client (rustls), with a CA and
//! certificates made by `openssl` for each test, on loopback TCP and Unix sockets.
//! What a user would notice: plaintext clients are refused when TLS is required,
//! data crosses TLS intact, a wrong CA or a missing client certificate fails the
//! connection, and removing the export ends a TLS connection like a plain one.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blockd::device::MemoryDevice;
use blockd::nbd::proto::*;
use blockd::nbd::{
    ClientError, ClientTls, ClientTlsFiles, ExportOptions, NbdAddress, NbdClient, NbdServer, ServerConfig, ServerTls,
    ServerTlsFiles,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SIZE: u64 = 32 << 20;

fn tool(name: &str, package: &str) -> PathBuf {
    let p = Path::new("/usr/bin").join(name);
    assert!(
        p.exists(),
        "{name} is not installed: install the Debian package {package}"
    );
    p
}

const OPENSSL_CONFIG: &str = "\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = hearth test CA
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost,IP:127.0.0.1
[client]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth
";

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new(tool("openssl", "openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and, signed by it, a server certificate (localhost, 127.0.0.1) and a client
/// certificate, as nbdkit's `--tls-certificates` directory lays them out.
fn make_pki(dir: &Path) {
    std::fs::create_dir_all(dir).expect("pki dir");
    std::fs::write(dir.join("openssl.cnf"), OPENSSL_CONFIG).expect("config");
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(
        dir,
        &[
            &[
                "req",
                "-x509",
                "-config",
                "openssl.cnf",
                "-extensions",
                "ca",
                "-days",
                "2",
            ],
            &ec[..],
            &["-keyout", "ca-key.pem", "-out", "ca-cert.pem"],
        ]
        .concat(),
    );
    for (who, cn, serial) in [("server", "localhost", "2"), ("client", "hearth-client", "3")] {
        let (key, csr, cert) = (
            format!("{who}-key.pem"),
            format!("{who}.csr"),
            format!("{who}-cert.pem"),
        );
        let subject = format!("/CN={cn}");
        openssl(
            dir,
            &[
                &["req", "-new", "-config", "openssl.cnf", "-subj", &subject],
                &ec[..],
                &["-keyout", &key, "-out", &csr],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca-cert.pem",
                "-CAkey",
                "ca-key.pem",
                "-set_serial",
                serial,
                "-days",
                "2",
                "-extfile",
                "openssl.cnf",
                "-extensions",
                who,
                "-out",
                &cert,
            ],
        );
    }
}

/// Copies the files named into a directory of their own (what one client holds).
fn client_dir(pki: &Path, name: &str, files: &[&str]) -> PathBuf {
    let dir = pki.parent().expect("parent").join(name);
    std::fs::create_dir_all(&dir).expect("client dir");
    for f in files {
        std::fs::copy(pki.join(f), dir.join(f)).expect("copy");
    }
    dir
}

fn server_tls(pki: &Path, required: bool, verify_peer: bool) -> ServerTls {
    ServerTls::load(&ServerTlsFiles {
        cert: pki.join("server-cert.pem"),
        key: pki.join("server-key.pem"),
        client_ca: verify_peer.then(|| pki.join("ca-cert.pem")),
        required,
    })
    .expect("server TLS")
}

fn client_tls(dir: &Path, with_cert: bool) -> ClientTls {
    ClientTls::load(&ClientTlsFiles {
        ca: dir.join("ca-cert.pem"),
        cert: with_cert.then(|| (dir.join("client-cert.pem"), dir.join("client-key.pem"))),
        server_name: None,
    })
    .expect("client TLS")
}

/// A server on its own runtime, on loopback TCP and a Unix socket, exporting "disk".
struct Fixture {
    runtime: tokio::runtime::Runtime,
    server: NbdServer,
    tcp: SocketAddr,
    unix: PathBuf,
    dir: tempfile::TempDir,
}

impl Fixture {
    /// `tls`: how the server is configured, from the fixture's own PKI.
    fn new(tls: impl FnOnce(&Path) -> Option<ServerTls>) -> Fixture {
        let dir = tempfile::Builder::new()
            .prefix("nbd-tls-")
            .tempdir_in("/dev/shm")
            .expect("temp dir");
        make_pki(&dir.path().join("pki"));
        let server = NbdServer::new(ServerConfig {
            tls: tls(&dir.path().join("pki")),
            ..ServerConfig::default()
        });
        server
            .add_export("disk", Arc::new(MemoryDevice::new(SIZE)), ExportOptions::default())
            .expect("export");
        let (runtime, tcp, unix) = common::serve_nbd(&server, dir.path());
        Fixture {
            runtime,
            server,
            tcp,
            unix,
            dir,
        }
    }

    fn pki(&self) -> PathBuf {
        self.dir.path().join("pki")
    }

    fn uri(&self, tls_dir: Option<&Path>) -> String {
        match tls_dir {
            None => format!("nbd://{}/disk", self.tcp),
            Some(d) => format!("nbds://{}/disk?tls-certificates={}", self.tcp, d.display()),
        }
    }

    fn unix_uri(&self, tls_dir: &Path) -> String {
        format!(
            "nbds+unix:///disk?socket={}&tls-certificates={}",
            self.unix.display(),
            tls_dir.display()
        )
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.server.shutdown();
    }
}

/// Runs nbdinfo on `uri`: its JSON on success, its stderr as the error.
fn nbdinfo(uri: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(tool("nbdinfo", "libnbd-bin"))
        .args(["--json", uri])
        .output()
        .expect("run nbdinfo");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("nbdinfo JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn export_size(info: &serde_json::Value) -> u64 {
    info["exports"][0]["export-size"].as_u64().expect("export-size")
}

fn nbdcopy(from: &str, to: &str) {
    let out = Command::new(tool("nbdcopy", "libnbd-bin"))
        .args([from, to])
        .output()
        .expect("run nbdcopy");
    assert!(
        out.status.success(),
        "nbdcopy {from} {to}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn required_tls_refuses_plaintext_and_carries_nbdcopy_data_intact() {
    let f = Fixture::new(|pki| Some(server_tls(pki, true, false)));
    let pki = f.pki();
    let trusting = client_dir(&pki, "trusting", &["ca-cert.pem"]);

    let refused = nbdinfo(&f.uri(None)).expect_err("a plaintext client must be refused");
    // libnbd reports NBD_REP_ERR_TLS_REQD to NBD_OPT_GO as "not supported".
    assert!(refused.contains("opt_go"), "nbdinfo said: {refused}");

    let info = nbdinfo(&f.uri(Some(&trusting))).expect("nbdinfo over TLS");
    assert_eq!(export_size(&info), SIZE);

    // Random data in over TCP+TLS, back out over Unix+TLS: byte-identical.
    let src = f.dir.path().join("src.img");
    let back = f.dir.path().join("back.img");
    let mut data = vec![0u8; SIZE as usize];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut r| r.read_exact(&mut data))
        .expect("random data");
    std::fs::File::create(&src)
        .and_then(|mut w| w.write_all(&data))
        .expect("write src");
    nbdcopy(src.to_str().expect("utf-8"), &f.uri(Some(&trusting)));
    std::fs::File::create(&back).expect("create back");
    nbdcopy(&f.unix_uri(&trusting), back.to_str().expect("utf-8"));
    assert!(
        std::fs::read(&back).expect("read back") == data,
        "data changed crossing TLS"
    );

    // A client trusting another CA does not accept the server.
    let other = f.dir.path().join("other-pki");
    make_pki(&other);
    let wrong = client_dir(&other, "wrong-ca", &["ca-cert.pem"]);
    let err = nbdinfo(&f.uri(Some(&wrong))).expect_err("a server the client cannot verify");
    assert!(!err.is_empty());
}

#[test]
fn tls_on_serves_plaintext_and_tls_clients_alike() {
    let f = Fixture::new(|pki| Some(server_tls(pki, false, false)));
    let trusting = client_dir(&f.pki(), "trusting", &["ca-cert.pem"]);
    assert_eq!(export_size(&nbdinfo(&f.uri(None)).expect("plaintext")), SIZE);
    assert_eq!(export_size(&nbdinfo(&f.uri(Some(&trusting))).expect("TLS")), SIZE);
    // Our client both ways too.
    f.runtime.block_on(async {
        let tls = client_tls(&f.pki(), false);
        let secure = NbdClient::connect_with(&NbdAddress::Tcp(f.tcp.to_string()), "disk", Some(&tls))
            .await
            .expect("TLS client");
        secure.write(4096, &[7u8; 8192], true).await.expect("write over TLS");
        let plain = NbdClient::connect(&NbdAddress::Unix(f.unix.clone()), "disk")
            .await
            .expect("plaintext client");
        assert_eq!(plain.read(4096, 8192).await.expect("read"), vec![7u8; 8192]);
    });
}

#[test]
fn client_certificates_are_required_when_the_server_verifies_peers() {
    let f = Fixture::new(|pki| Some(server_tls(pki, true, true)));
    let pki = f.pki();
    let without = client_dir(&pki, "without-cert", &["ca-cert.pem"]);
    let with = client_dir(&pki, "with-cert", &["ca-cert.pem", "client-cert.pem", "client-key.pem"]);
    nbdinfo(&f.uri(Some(&without))).expect_err("no client certificate");
    assert_eq!(
        export_size(&nbdinfo(&f.uri(Some(&with))).expect("with a certificate")),
        SIZE
    );

    f.runtime.block_on(async {
        let unix = NbdAddress::Unix(f.unix.clone());
        let err = NbdClient::connect_with(&unix, "disk", Some(&client_tls(&pki, false)))
            .await
            .expect_err("no client certificate");
        assert!(err.is_connection_error(), "{err}");
        let client = NbdClient::connect_with(&unix, "disk", Some(&client_tls(&pki, true)))
            .await
            .expect("with a certificate");
        client.write(0, &[1u8; 4096], false).await.expect("write");
        assert_eq!(client.read(0, 4096).await.expect("read"), vec![1u8; 4096]);
    });
}

#[test]
fn a_server_without_tls_says_so_to_a_tls_client() {
    let f = Fixture::new(|_| None);
    let trusting = client_dir(&f.pki(), "trusting", &["ca-cert.pem"]);
    nbdinfo(&f.uri(Some(&trusting))).expect_err("nbds:// to a plaintext server");
    f.runtime.block_on(async {
        let tls = client_tls(&f.pki(), false);
        let err = NbdClient::connect_with(&NbdAddress::Tcp(f.tcp.to_string()), "disk", Some(&tls))
            .await
            .expect_err("no TLS there");
        assert!(
            matches!(
                err,
                ClientError::OptionRefused {
                    option: OPT_STARTTLS,
                    reply_type: REP_ERR_UNSUP,
                    ..
                }
            ),
            "{err}"
        );
    });
}

async fn option(s: &mut tokio::net::TcpStream, option: u32, data: &[u8]) -> (u32, u32) {
    let mut out = Vec::new();
    encode_option(&mut out, option, data);
    s.write_all(&out).await.expect("send option");
    let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
    s.read_exact(&mut h).await.expect("option reply");
    let h = parse_option_reply_header(&h).expect("reply header");
    let mut payload = vec![0; h.len as usize];
    s.read_exact(&mut payload).await.expect("payload");
    (h.option, h.reply_type)
}

/// A raw TCP connection past the greeting, at the options.
async fn greeted(address: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(address).await.expect("connect");
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await.expect("greeting");
    s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
        .await
        .expect("flags");
    s
}

#[test]
fn before_required_tls_only_starttls_and_abort_are_served() {
    let f = Fixture::new(|pki| Some(server_tls(pki, true, false)));
    f.runtime.block_on(async {
        let mut s = greeted(f.tcp).await;
        assert_eq!(option(&mut s, OPT_LIST, &[]).await, (OPT_LIST, REP_ERR_TLS_REQD));
        let go = encode_info_request("disk", &[]);
        assert_eq!(option(&mut s, OPT_GO, &go).await, (OPT_GO, REP_ERR_TLS_REQD));
        assert_eq!(
            option(&mut s, OPT_STRUCTURED_REPLY, &[]).await,
            (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD)
        );
        assert_eq!(
            option(&mut s, OPT_STARTTLS, b"x").await,
            (OPT_STARTTLS, REP_ERR_INVALID)
        );
        // The old EXPORT_NAME cannot be refused with a reply: the server hangs up.
        let mut out = Vec::new();
        encode_option(&mut out, OPT_EXPORT_NAME, b"disk");
        s.write_all(&out).await.expect("send");
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .expect("the server should hang up")
            .expect("read");
        assert!(rest.is_empty(), "no export data before TLS: {rest:?}");
    });
}

#[test]
fn removing_the_export_ends_an_idle_tls_connection() {
    let f = Fixture::new(|pki| Some(server_tls(pki, true, false)));
    f.runtime.block_on(async {
        let tls = client_tls(&f.pki(), false);
        let client = NbdClient::connect_with(&NbdAddress::Tcp(f.tcp.to_string()), "disk", Some(&tls))
            .await
            .expect("connect");
        client.flush().await.expect("flush");
        assert!(f.server.remove_export("disk"));
        tokio::time::timeout(Duration::from_secs(5), async {
            while !client.is_closed() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the TLS connection should end with its export");
        assert!(client.read(0, 512).await.is_err());
    });
}

#[test]
fn bad_tls_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().expect("dir");
    make_pki(dir.path());
    let missing = ServerTls::load(&ServerTlsFiles {
        cert: dir.path().join("nope.pem"),
        key: dir.path().join("server-key.pem"),
        client_ca: None,
        required: true,
    })
    .expect_err("missing certificate");
    assert!(missing.to_string().contains("nope.pem"), "{missing}");
    let mismatched = ServerTls::load(&ServerTlsFiles {
        cert: dir.path().join("server-cert.pem"),
        key: dir.path().join("client-key.pem"),
        client_ca: None,
        required: true,
    })
    .expect_err("a key of another certificate");
    assert!(mismatched.to_string().contains("client-key.pem"), "{mismatched}");
    let not_a_cert = ClientTls::load(&ClientTlsFiles {
        ca: dir.path().join("openssl.cnf"),
        cert: None,
        server_name: None,
    })
    .expect_err("not PEM");
    assert!(not_a_cert.to_string().contains("openssl.cnf"), "{not_a_cert}");
}

#[test]
fn many_requests_in_flight_cross_tls_intact() {
    // Requests of many sizes in flight at once on one TLS connection: the server's
    // threads decrypt and seal concurrently, and every reply must reach its request.
    let f = Fixture::new(|pki| Some(server_tls(pki, true, false)));
    f.runtime.block_on(async {
        let tls = client_tls(&f.pki(), false);
        let client = Arc::new(
            NbdClient::connect_with(&NbdAddress::Tcp(f.tcp.to_string()), "disk", Some(&tls))
                .await
                .expect("connect"),
        );
        // 256 slots of 128 KiB; slot i gets (i % 31 + 1) * 4 KiB of byte i, zeros after.
        let slot = 128 << 10;
        let len = |i: usize| (i % 31 + 1) * 4096;
        let writes: Vec<_> = (0..256usize)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { c.write((i * slot) as u64, &vec![i as u8; len(i)], i % 7 == 0).await })
            })
            .collect();
        for w in writes {
            w.await.expect("task").expect("write over TLS");
        }
        let reads: Vec<_> = (0..256usize)
            .map(|i| {
                let c = client.clone();
                tokio::spawn(async move { (i, c.read((i * slot) as u64, len(i) + 4096).await) })
            })
            .collect();
        for r in reads {
            let (i, data) = r.await.expect("task");
            let data = data.expect("read over TLS");
            assert!(data[..len(i)].iter().all(|&b| b == i as u8), "slot {i} has other data");
            assert!(data[len(i)..].iter().all(|&b| b == 0), "slot {i} ran past its length");
        }
    });
}

#[test]
fn a_key_update_mid_transmission_is_answered_in_order() {
    // A TLS 1.3 client asks for new keys between requests; the server must take its
    // new receiving keys and send its KeyUpdate before any reply sealed with the new
    // sending keys, or the client cannot decrypt the next reply.
    use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
    let f = Fixture::new(|pki| Some(server_tls(pki, true, false)));
    f.runtime.block_on(async {
        let mut s = greeted(f.tcp).await;
        assert_eq!(option(&mut s, OPT_STARTTLS, &[]).await, (OPT_STARTTLS, REP_ACK));
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(f.pki().join("ca-cert.pem")).expect("CA") {
            roots.add(c.expect("CA cert")).expect("add CA");
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect("localhost".try_into().expect("name"), s)
            .await
            .expect("TLS handshake");
        // NBD_OPT_GO inside TLS: replies until NBD_REP_ACK.
        let mut out = Vec::new();
        encode_option(&mut out, OPT_GO, &encode_info_request("disk", &[]));
        tls.write_all(&out).await.expect("send GO");
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            tls.read_exact(&mut h).await.expect("GO reply");
            let h = parse_option_reply_header(&h).expect("reply header");
            let mut payload = vec![0; h.len as usize];
            tls.read_exact(&mut payload).await.expect("payload");
            if h.reply_type == REP_ACK {
                break;
            }
            assert_eq!(h.reply_type, REP_INFO, "GO refused");
        }
        let request = |command: u16, cookie: u64, len: u32| {
            encode_request(&Request {
                flags: 0,
                command,
                cookie,
                offset: 4096,
                len,
            })
            .to_vec()
        };
        let mut write = request(CMD_WRITE, 1, 4096);
        write.extend_from_slice(&[0x5a; 4096]);
        for (round, msg) in [write, request(CMD_READ, 2, 4096), request(CMD_READ, 3, 4096)]
            .into_iter()
            .enumerate()
        {
            if round > 0 {
                tls.get_mut().1.refresh_traffic_keys().expect("key update");
            }
            tls.write_all(&msg).await.expect("request");
            tls.flush().await.expect("flush");
            let mut reply = [0u8; SIMPLE_REPLY_LEN];
            tokio::time::timeout(Duration::from_secs(10), tls.read_exact(&mut reply))
                .await
                .expect("a reply after the key update")
                .expect("decryptable reply");
            assert_eq!(
                u32::from_be_bytes(reply[4..8].try_into().expect("4")),
                0,
                "error in reply {round}"
            );
            assert_eq!(
                u64::from_be_bytes(reply[8..16].try_into().expect("8")),
                round as u64 + 1
            );
            if round > 0 {
                let mut data = vec![0u8; 4096];
                tls.read_exact(&mut data).await.expect("read data");
                assert!(data.iter().all(|&b| b == 0x5a), "read {round} returned other data");
            }
        }
    });
}
