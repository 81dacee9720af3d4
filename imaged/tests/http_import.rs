//! Imports over HTTP from a server this test runs on loopback: digests, checksums,
//! coalescing (the server counts requests), resuming a cut download, and bad sources.
//! Each failure must leave nothing in the store.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::get;
use axum::Router;
use imaged::import::{ImportRequest, ImportState, ImportStatus, Importer};
use imaged::store::Sha256;
use imaged::store::Store;

/// How the server serves one file.
#[derive(Clone, Default)]
struct Served {
    bytes: Vec<u8>,
    /// Cut the connection half way through the first full answer.
    cut_first: bool,
    /// Pause this long between 64 KiB chunks.
    delay: Duration,
}

#[derive(Default)]
struct Server {
    files: Mutex<HashMap<String, Served>>,
    /// Per file: the Range header of each request ("" for none).
    requests: Mutex<HashMap<String, Vec<String>>>,
}

impl Server {
    fn add(&self, name: &str, s: Served) {
        self.files.lock().expect("lock").insert(name.into(), s);
    }
    fn requests(&self, name: &str) -> Vec<String> {
        self.requests
            .lock()
            .expect("lock")
            .get(name)
            .cloned()
            .unwrap_or_default()
    }
}

async fn serve_file(State(srv): State<Arc<Server>>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let n_before = {
        let mut r = srv.requests.lock().expect("lock");
        let list = r.entry(name.clone()).or_default();
        list.push(range.clone());
        list.len() - 1
    };
    let Some(file) = srv.files.lock().expect("lock").get(&name).cloned() else {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Body::from("no such file"))
            .expect("response");
    };
    let len = file.bytes.len();
    let start = range
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse::<usize>().ok())
        .unwrap_or(0);
    let body_bytes = file.bytes[start..].to_vec();
    let cut_at = (file.cut_first && n_before == 0).then_some(len / 2);
    let delay = file.delay;
    let stream = async_stream(body_bytes, cut_at, delay);
    let mut b = Response::builder()
        .header(header::CONTENT_LENGTH, len - start)
        .header(header::ETAG, "\"v1\"")
        .header(header::ACCEPT_RANGES, "bytes");
    if start > 0 {
        b = b
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{}/{len}", len - 1));
    }
    b.body(Body::from_stream(stream)).expect("response")
}

fn async_stream(
    bytes: Vec<u8>,
    cut_at: Option<usize>,
    delay: Duration,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    let chunks: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(|c| c.to_vec()).collect();
    futures_util::stream::unfold((chunks.into_iter(), 0usize), move |(mut it, sent)| async move {
        if let Some(cut) = cut_at {
            if sent >= cut {
                return Some((Err(std::io::Error::other("cut")), (it, usize::MAX)));
            }
        }
        if sent == usize::MAX {
            return None;
        }
        let c = it.next()?;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let n = c.len();
        Some((Ok(c), (it, sent + n)))
    })
}

async fn start_server() -> (Arc<Server>, String) {
    let srv = Arc::new(Server::default());
    let app = Router::new()
        .route("/files/{name}", get(serve_file))
        .with_state(srv.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (srv, format!("http://{addr}/files"))
}

/// A raw disk: an ext4 superblock magic and random-looking data, `mib` MiB.
fn disk_bytes(mib: usize, seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..mib << 20)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) >> 24) as u8 ^ seed)
        .collect();
    v[1080] = 0x53;
    v[1081] = 0xef;
    v
}

fn sha(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

async fn wait(importer: &Importer, st: &ImportStatus) -> ImportStatus {
    for _ in 0..120 {
        let s = importer.status(&st.id, Duration::from_secs(1)).await.expect("status");
        if s.state != ImportState::Running {
            return s;
        }
    }
    panic!("import {} did not finish", st.id);
}

fn url_import(name: &str, url: String, sha256: Option<String>) -> ImportRequest {
    ImportRequest {
        name: name.into(),
        url: Some(url),
        sha256,
        ..Default::default()
    }
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_imports_verify_coalesce_and_resume() {
    let (srv, base) = start_server().await;
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Store::open(dir.path()).expect("store"));
    let importer = Arc::new(Importer::new(store.clone()));

    // Two imports of one URL at once: one download, both names, progress on the way.
    let disk = disk_bytes(8, 1);
    srv.add(
        "disk.raw",
        Served {
            bytes: disk.clone(),
            delay: Duration::from_millis(8),
            ..Default::default()
        },
    );
    let a = importer
        .start(url_import("alpha", format!("{base}/disk.raw"), Some(sha(&disk))))
        .expect("start");
    let b = importer
        .start(url_import(
            "beta",
            format!("{base}/disk.raw"),
            Some(format!("sha256:{}", sha(&disk))),
        ))
        .expect("start");
    assert_eq!(a.id, b.id, "the second import joins the first");
    let mut saw_progress = false;
    for _ in 0..100 {
        let s = importer.status(&a.id, Duration::ZERO).await.expect("status");
        if s.state != ImportState::Running {
            break;
        }
        if s.bytes_done > 0 && s.bytes_total == Some(disk.len() as u64) && s.phase == "downloading" {
            saw_progress = true;
            assert!(s.rate_bytes_per_second > 0.0);
            assert!(s.eta_seconds.is_some());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        saw_progress,
        "progress (bytes, total, rate, ETA) is reported while downloading"
    );
    let done = wait(&importer, &a).await;
    assert_eq!(done.state, ImportState::Succeeded, "{:?}", done.error);
    assert_eq!(done.requests, 2);
    assert_eq!(srv.requests("disk.raw").len(), 1, "one download for two imports");
    let img = done.image.expect("image");
    let disk_info = img.disk.clone().expect("disk");
    assert_eq!(disk_info.source_digest, format!("sha256:{}", sha(&disk)));
    assert_eq!(
        std::fs::read(&disk_info.path).expect("blob"),
        disk,
        "the stored disk is the file"
    );
    let (alpha, _) = store.resolve("alpha").expect("resolve").expect("alpha");
    let (beta, _) = store.resolve("beta").expect("resolve").expect("beta");
    assert_eq!(alpha.digest, beta.digest);
    assert!(
        entries(&dir.path().join("tmp")).is_empty(),
        "no partial files after success"
    );
    let blobs_before = entries(&dir.path().join("blobs/sha256"));

    // A wrong checksum: the import fails and caches nothing.
    srv.add(
        "other.raw",
        Served {
            bytes: disk_bytes(2, 7),
            ..Default::default()
        },
    );
    let st = importer
        .start(url_import("wrong", format!("{base}/other.raw"), Some("0".repeat(64))))
        .expect("start");
    let st = wait(&importer, &st).await;
    assert_eq!(st.state, ImportState::Failed);
    let err = st.error.expect("error");
    assert_eq!(err.code, "checksum_mismatch");
    assert!(err.message.contains("expected sha256:000"), "{}", err.message);
    assert_eq!(st.error_status, Some(422));
    assert!(store.resolve("wrong").expect("resolve").is_none());
    assert!(entries(&dir.path().join("tmp")).is_empty(), "the bad download is gone");
    assert_eq!(
        entries(&dir.path().join("blobs/sha256")),
        blobs_before,
        "no blob was added"
    );

    // Cut half way: the import resumes with a Range request and completes.
    let cut = disk_bytes(4, 3);
    srv.add(
        "cut.raw",
        Served {
            bytes: cut.clone(),
            cut_first: true,
            ..Default::default()
        },
    );
    let st = importer
        .start(url_import("resumed", format!("{base}/cut.raw"), Some(sha(&cut))))
        .expect("start");
    let st = wait(&importer, &st).await;
    assert_eq!(st.state, ImportState::Succeeded, "{:?}", st.error);
    let reqs = srv.requests("cut.raw");
    assert_eq!(reqs.len(), 2, "one cut request and one resume: {reqs:?}");
    assert_eq!(reqs[0], "");
    let resumed_at: u64 = reqs[1]
        .strip_prefix("bytes=")
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|s| s.parse().ok())
        .expect("a Range request");
    assert!(
        resumed_at > 0 && resumed_at <= cut.len() as u64 / 2,
        "resumed at {resumed_at}"
    );
    let img = st.image.expect("image");
    assert_eq!(std::fs::read(img.disk.expect("disk").path).expect("blob"), cut);

    // qcow2 over HTTP: converted to raw, named by the digest of the qcow2 file.
    let raw_path = dir.path().join("src.raw");
    let q_path = dir.path().join("src.qcow2");
    let raw = disk_bytes(3, 9);
    std::fs::write(&raw_path, &raw).expect("write");
    let out = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw_path)
        .arg(&q_path)
        .output()
        .expect("qemu-img");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let qcow2 = std::fs::read(&q_path).expect("read");
    std::fs::remove_file(&raw_path).expect("rm");
    std::fs::remove_file(&q_path).expect("rm");
    srv.add(
        "disk.qcow2",
        Served {
            bytes: qcow2.clone(),
            ..Default::default()
        },
    );
    let st = importer
        .start(url_import(
            "from-qcow2",
            format!("{base}/disk.qcow2"),
            Some(sha(&qcow2)),
        ))
        .expect("start");
    let st = wait(&importer, &st).await;
    assert_eq!(st.state, ImportState::Succeeded, "{:?}", st.error);
    let d = st.image.expect("image").disk.expect("disk");
    assert_eq!(d.source_format, imaged::format::SourceFormat::Qcow2);
    assert_eq!(d.virtual_size, raw.len() as u64);
    assert_eq!(
        std::fs::read(&d.path).expect("blob"),
        raw,
        "the stored disk is the raw conversion"
    );

    // Bad sources: each fails clearly and leaves nothing.
    srv.add(
        "notes.txt",
        Served {
            bytes: b"just some text, not a disk\n".repeat(100),
            ..Default::default()
        },
    );
    let mut vmdk = vec![0u8; 1 << 16];
    vmdk[..4].copy_from_slice(b"KDMV");
    srv.add(
        "disk.vmdk",
        Served {
            bytes: vmdk,
            ..Default::default()
        },
    );
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let cases = [
        (format!("{base}/missing.raw"), "source_error", 422, "404"),
        (
            format!("http://{closed}/disk.raw"),
            "source_unreachable",
            502,
            "cannot reach",
        ),
        (format!("{base}/notes.txt"), "not_a_disk_image", 422, "partition table"),
        (format!("{base}/disk.vmdk"), "unsupported_format", 422, "VMDK"),
    ];
    let blobs_before = entries(&dir.path().join("blobs/sha256"));
    for (url, code, status, words) in cases {
        let st = importer.start(url_import("bad", url.clone(), None)).expect("start");
        let st = wait(&importer, &st).await;
        assert_eq!(st.state, ImportState::Failed, "{url}");
        let err = st.error.expect("error");
        assert_eq!(err.code, code, "{url}: {}", err.message);
        assert_eq!(st.error_status, Some(status), "{url}");
        assert!(err.message.contains(words), "{url}: {}", err.message);
        assert!(entries(&dir.path().join("tmp")).is_empty(), "{url}: no partial file");
    }
    assert_eq!(entries(&dir.path().join("blobs/sha256")), blobs_before);
    assert!(store.resolve("bad").expect("resolve").is_none());

    // Refused before anything starts.
    for (req, what) in [
        (url_import("../x", format!("{base}/disk.raw"), None), "a name with .."),
        (url_import("a/b", format!("{base}/disk.raw"), None), "a name with /"),
        (url_import("ok", "ftp://example.invalid/x".into(), None), "an ftp URL"),
        (
            url_import("ok", format!("{base}/disk.raw"), Some("abc".into())),
            "a short checksum",
        ),
        (
            ImportRequest {
                name: "ok".into(),
                path: Some("relative/path".into()),
                ..Default::default()
            },
            "a relative path",
        ),
        (
            ImportRequest {
                name: "ok".into(),
                ..Default::default()
            },
            "no source",
        ),
    ] {
        assert!(importer.start(req).is_err(), "{what} is refused");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_imports_dedupe_and_refuse_what_is_not_a_disk() {
    let dir = tempfile::tempdir().expect("tmp");
    let store = Arc::new(Store::open(dir.path().join("store")).expect("store"));
    let importer = Arc::new(Importer::new(store.clone()));
    let src = dir.path().join("disk.raw");
    let disk = disk_bytes(2, 5);
    std::fs::write(&src, &disk).expect("write");
    let req = |name: &str, path: &Path| ImportRequest {
        name: name.into(),
        path: Some(path.to_path_buf()),
        ..Default::default()
    };
    let st = wait(&importer, &importer.start(req("one", &src)).expect("start")).await;
    assert_eq!(st.state, ImportState::Succeeded, "{:?}", st.error);
    let st2 = wait(&importer, &importer.start(req("two", &src)).expect("start")).await;
    assert_eq!(st2.state, ImportState::Succeeded);
    assert_eq!(st.image.expect("img").digest, st2.image.expect("img").digest);
    assert_eq!(entries(&dir.path().join("store/blobs/sha256")).len(), 1, "stored once");

    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "hello\n".repeat(1000)).expect("write");
    let st = wait(&importer, &importer.start(req("text", &text)).expect("start")).await;
    assert_eq!(st.error.expect("error").code, "not_a_disk_image");
    // A blank raw disk is accepted when the caller says it is raw.
    let blank = dir.path().join("blank.raw");
    std::fs::File::create(&blank)
        .and_then(|f| f.set_len(1 << 20))
        .expect("blank");
    let mut r = req("blank", &blank);
    r.format = Some("raw".into());
    let st = wait(&importer, &importer.start(r).expect("start")).await;
    assert_eq!(st.state, ImportState::Succeeded, "{:?}", st.error);
    let mut r = req("fmt", &blank);
    r.format = Some("vmdk".into());
    assert!(importer.start(r).is_err(), "an unknown format is refused at once");
    assert!(importer.start(req("gone", &dir.path().join("nope.raw"))).is_err());
    assert!(entries(&dir.path().join("store/tmp")).is_empty());
}
