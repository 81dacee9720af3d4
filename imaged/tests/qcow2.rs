//! hearth's qcow2 reader against qemu-img: every kind of qcow2 file qemu-img makes
//! (versions 2 and 3, small and large clusters, zlib compression, zero clusters,
//! extended L2 entries with subclusters, preallocated metadata) converts to exactly
//! the bytes `qemu-img convert -O raw` gives, sparse, with the digest of the qcow2
//! file. Images the reader leaves to qemu-img (zstd) still import; damaged or
//! hostile images give a clear error, never a panic, and leave no file behind.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod common;

use common::{run, s};
use imaged::import::{ImportRequest, Importer};
use imaged::qcow2;
use imaged::store::{hex, Sha256, Store};
use imaged::{ImageError, ImageInfo};
use socket_http::ApiError;

const MIB: u64 = 1 << 20;

/// A 40 MiB + 1.5 KiB raw disk: pseudo-random data in pieces of odd sizes at odd
/// places (some of it compressible, some not), zero runs inside the data, holes
/// between, and a last partial cluster.
fn sample_raw(path: &Path) -> Vec<u8> {
    let len = 40 * MIB + 1536;
    let mut disk = vec![0u8; len as usize];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    // `letters`: 16 distinct bytes, which deflate shrinks by about half.
    let mut fill = |range: std::ops::Range<u64>, letters: bool, disk: &mut Vec<u8>| {
        for b in &mut disk[range.start as usize..range.end as usize] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = if letters { b'a' + (x % 16) as u8 } else { x as u8 };
        }
    };
    fill(0..3 * MIB + 4096, true, &mut disk);
    fill(5 * MIB + 512..5 * MIB + 70_000, true, &mut disk);
    fill(9 * MIB..17 * MIB, false, &mut disk);
    fill(39 * MIB + 100..len, true, &mut disk);
    // Zeros inside the data: 64 KiB and 8 KiB runs.
    disk[(10 * MIB) as usize..(10 * MIB + 65536) as usize].fill(0);
    disk[(12 * MIB + 4096) as usize..(12 * MIB + 12288) as usize].fill(0);
    // An MBR signature, so it reads as a disk.
    disk[510] = 0x55;
    disk[511] = 0xaa;
    std::fs::write(path, &disk).expect("write raw");
    disk
}

fn sha_file(p: &Path) -> String {
    hex(&Sha256::digest(&std::fs::read(p).expect("read")))
}

/// Converts with hearth's reader; checks the result against qemu-img's own raw
/// conversion of the same file, the digest, and that holes stayed holes.
fn check_against_qemu_img(dir: &Path, q: &Path, label: &str) {
    let ours = dir.join(format!("{label}.ours.raw"));
    let theirs = dir.join(format!("{label}.qemu.raw"));
    run("qemu-img", &["convert", "-f", "qcow2", "-O", "raw", s(q), s(&theirs)]);
    let done = std::cell::Cell::new(0u64);
    let (size, digest) = qcow2::to_raw(q, &ours, true, &|n| done.set(n))
        .unwrap_or_else(|e| panic!("{label}: {e}"))
        .unwrap_or_else(|| panic!("{label}: left to qemu-img"));
    let want = std::fs::read(&theirs).expect("read");
    let got = std::fs::read(&ours).expect("read");
    assert_eq!(size, want.len() as u64, "{label}: virtual size");
    assert_eq!(got.len(), want.len(), "{label}: length");
    assert!(got == want, "{label}: bytes differ from qemu-img's conversion");
    assert_eq!(digest.as_deref(), Some(sha_file(q).as_str()), "{label}: digest");
    assert_eq!(done.get(), std::fs::metadata(q).expect("md").len(), "{label}: progress");
    let md = std::fs::metadata(&ours).expect("md");
    let nonzero = want.chunks(4096).filter(|c| c.iter().any(|&b| b != 0)).count() as u64;
    assert!(
        md.blocks() * 512 <= nonzero * 4096 + 64 * 1024,
        "{label}: {} bytes allocated for {} of data: zeros were written",
        md.blocks() * 512,
        nonzero * 4096
    );
    std::fs::remove_file(&ours).expect("rm");
    std::fs::remove_file(&theirs).expect("rm");
}

#[test]
fn every_kind_of_qcow2_converts_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw);
    let variants: &[(&str, &[&str])] = &[
        ("v3-64k", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("zlib", &["-c"]),
        ("zlib-v2-4k", &["-c", "-o", "compat=0.10,cluster_size=4096"]),
        ("4k", &["-o", "cluster_size=4096"]),
        ("2m", &["-o", "cluster_size=2M"]),
        ("512", &["-o", "cluster_size=512"]),
        ("extl2", &["-o", "extended_l2=on,cluster_size=128k"]),
        ("extl2-zlib", &["-c", "-o", "extended_l2=on"]),
    ];
    for (label, opts) in variants {
        let q = dir.path().join(format!("{label}.qcow2"));
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        args.extend_from_slice(opts);
        args.extend_from_slice(&[s(&raw), s(&q)]);
        run("qemu-img", &args);
        check_against_qemu_img(dir.path(), &q, label);
        std::fs::remove_file(&q).expect("rm");
    }
}

/// Images written by a guest rather than converted: partial subclusters, zero
/// clusters over data, preallocated metadata, data rewritten after compression.
#[test]
fn guest_written_qcow2_converts_like_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "zero-flags",
            "",
            &[
                "write -P 0x11 0 4M",
                "write -z 1M 256k",
                "write -z -u 2M 128k",
                "write -P 0x22 3M 4k",
            ],
        ),
        (
            "subclusters",
            "extended_l2=on,cluster_size=64k",
            &[
                "write -P 0x33 4k 8k",
                "write -P 0x44 130k 2k",
                "write -P 0x55 1M 256k",
                "write -z 1M 8k",
                "write -z -u 1088k 4k",
            ],
        ),
        (
            "prealloc",
            "preallocation=metadata",
            &["write -P 0x66 512k 64k", "write -z 8M 1M"],
        ),
    ];
    for (label, opts, writes) in cases {
        let q = dir.path().join(format!("{label}.qcow2"));
        let mut create = vec!["create", "-f", "qcow2"];
        if !opts.is_empty() {
            create.extend_from_slice(&["-o", opts]);
        }
        create.extend_from_slice(&[s(&q), "16M"]);
        run("qemu-img", &create);
        for w in *writes {
            run("qemu-io", &["-f", "qcow2", "-c", w, s(&q)]);
        }
        check_against_qemu_img(dir.path(), &q, label);
    }
    // A compressed image a guest then partly overwrote: compressed clusters and plain
    // ones side by side, some compressed clusters freed.
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw);
    let q = dir.path().join("mixed.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)],
    );
    for w in ["write -P 0x77 1M 100k", "write -z 9M 64k", "discard 10M 1M"] {
        run("qemu-io", &["-f", "qcow2", "-c", w, s(&q)]);
    }
    check_against_qemu_img(dir.path(), &q, "mixed");
}

fn importer(dir: &Path) -> Arc<Importer> {
    Arc::new(Importer::new(Arc::new(Store::open(dir.join("store")).expect("store"))))
}

async fn import(importer: &Arc<Importer>, name: &str, path: PathBuf) -> Result<ImageInfo, ApiError> {
    importer
        .import_and_wait(ImportRequest {
            name: name.into(),
            path: Some(path),
            ..Default::default()
        })
        .await
}

fn tmp_files(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir.join("store/tmp"))
        .map(|d| d.map(|e| e.expect("entry").path()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn imports_zlib_by_path_and_zstd_through_qemu_img() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw_path = dir.path().join("disk.raw");
    let raw = sample_raw(&raw_path);
    let imp = importer(dir.path());
    for (label, opts) in [("zlib", "compression_type=zlib"), ("zstd", "compression_type=zstd")] {
        let q = dir.path().join(format!("{label}.qcow2"));
        run(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-f",
                "raw",
                "-O",
                "qcow2",
                "-o",
                opts,
                s(&raw_path),
                s(&q),
            ],
        );
        if label == "zstd" {
            let out = dir.path().join("zstd.raw");
            let r = qcow2::to_raw(&q, &out, true, &|_| {}).expect("zstd image opens");
            assert!(r.is_none(), "zstd clusters are left to qemu-img");
            assert!(!out.exists(), "nothing written for an image left to qemu-img");
        }
        let disk = import(&imp, label, q.clone())
            .await
            .unwrap_or_else(|e| panic!("{label}: {e:?}"))
            .disk
            .expect("disk");
        assert_eq!(disk.source_digest, format!("sha256:{}", sha_file(&q)), "{label}");
        assert_eq!(disk.virtual_size, raw.len() as u64);
        assert!(
            std::fs::read(&disk.path).expect("blob") == raw,
            "{label}: stored disk differs"
        );
    }
    assert!(
        tmp_files(dir.path()).is_empty(),
        "left behind: {:?}",
        tmp_files(dir.path())
    );
}

/// Writes `bytes` at `off` of a copy of `q` and returns the copy.
fn damaged(q: &Path, name: &str, edits: &[(u64, &[u8])], truncate: Option<u64>) -> PathBuf {
    let p = q.with_file_name(name);
    std::fs::copy(q, &p).expect("copy");
    let f = std::fs::OpenOptions::new().write(true).open(&p).expect("open");
    for (off, bytes) in edits {
        f.write_all_at(bytes, *off).expect("write");
    }
    if let Some(len) = truncate {
        f.set_len(len).expect("truncate");
    }
    p
}

fn be64_at(p: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .expect("open")
        .read_exact_at(&mut b, off)
        .expect("read");
    u64::from_be_bytes(b)
}

#[tokio::test]
async fn damaged_and_hostile_qcow2_fail_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("disk.raw");
    sample_raw(&raw);
    let q = dir.path().join("good.qcow2");
    run("qemu-img", &["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&q)]);
    let qc = dir.path().join("good-zlib.qcow2");
    run(
        "qemu-img",
        &["convert", "-c", "-f", "raw", "-O", "qcow2", s(&raw), s(&qc)],
    );
    let len = std::fs::metadata(&q).expect("md").len();
    let l1 = be64_at(&q, 40);
    let first_l2 = be64_at(&q, l1) & 0x00ff_ffff_ffff_fe00;
    // The first data cluster's L2 entry, pointed past the end of the file.
    let past_end = (len + (1 << 30)).to_be_bytes();
    // A compressed cluster's stream overwritten with garbage.
    let cl1 = be64_at(&qc, 40);
    let cl2 = be64_at(&qc, cl1) & 0x00ff_ffff_ffff_fe00;
    let centry = be64_at(&qc, cl2);
    assert!(
        centry & (1 << 62) != 0,
        "the first cluster of the zlib image is compressed"
    );
    let coff = centry & ((1u64 << 54) - 1);
    // 4 KiB clusters: one L2 table per 2 MiB, so the L1 table has several entries.
    let q4 = dir.path().join("good-4k.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&raw),
            s(&q4),
        ],
    );
    let l1_4k = be64_at(&q4, 40);
    let first_l1 = be64_at(&q4, l1_4k).to_be_bytes();
    let backing = dir.path().join("backing.qcow2");
    run(
        "qemu-img",
        &["create", "-f", "qcow2", "-F", "qcow2", "-b", s(&q), s(&backing)],
    );
    let cases: Vec<(&str, PathBuf, &str)> = vec![
        (
            "cut in half",
            damaged(&q, "cut.qcow2", &[], Some(len / 2)),
            "past the end",
        ),
        ("header only", damaged(&q, "hdr.qcow2", &[], Some(64)), "cut short"),
        (
            "cluster bits 31",
            damaged(&q, "bits.qcow2", &[(20, &31u32.to_be_bytes())], None),
            "cluster size",
        ),
        (
            "L1 table past the end",
            damaged(&q, "l1.qcow2", &[(40, &(len * 4096).to_be_bytes())], None),
            "L1 table",
        ),
        (
            "L1 too small",
            damaged(&q, "l1size.qcow2", &[(36, &0u32.to_be_bytes())], None),
            "L1 table has 0 entries",
        ),
        (
            "data past the end",
            damaged(&q, "l2.qcow2", &[(first_l2, &past_end)], None),
            "past the end",
        ),
        (
            "garbage compressed cluster",
            damaged(&qc, "zlib-bad.qcow2", &[(coff, &[0xff; 64])], None),
            "does not inflate",
        ),
        (
            "marked corrupt",
            damaged(&q, "corrupt.qcow2", &[(79, &[2])], None),
            "qemu-img check",
        ),
        ("backing file", backing, "backing file"),
        (
            "one L2 table named twice",
            damaged(&q4, "l2twice.qcow2", &[(l1_4k + 8, &first_l1)], None),
            "also another part's table",
        ),
        (
            "a virtual size of 4 EiB",
            damaged(&q, "huge.qcow2", &[(24, &(1u64 << 62).to_be_bytes())], None),
            "more than hearth handles",
        ),
    ];
    let imp = importer(dir.path());
    for (label, p, says) in cases {
        let out = dir.path().join("out.raw");
        let e = qcow2::to_raw(&p, &out, true, &|_| {}).expect_err(label);
        assert!(e.to_string().contains(says), "{label}: {e}");
        assert!(
            matches!(e, ImageError::NotADisk(_) | ImageError::Unsupported(_)),
            "{label}: {e:?}"
        );
        let _ = std::fs::remove_file(&out);
        let err = import(&imp, "bad", p).await.expect_err(label).body;
        assert!(err.message.contains(says), "{label}: {}", err.message);
        assert!(
            tmp_files(dir.path()).is_empty(),
            "{label} left {:?}",
            tmp_files(dir.path())
        );
    }
    assert!(imp.store().list().expect("list").is_empty(), "nothing was stored");
}

/// Random damage to the header and tables of small images: every result is a
/// conversion, a hand-over to qemu-img or an error; never a panic or a hang.
#[test]
fn mutated_headers_and_tables_never_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("small.raw");
    let mut disk = vec![0u8; 2 << 20];
    for (i, b) in disk.iter_mut().enumerate().step_by(7) {
        *b = (i % 251) as u8;
    }
    std::fs::write(&raw, &disk).expect("write");
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut converted, mut errors, mut handed_over) = (0, 0, 0);
    for (label, opts) in [
        ("v3", "cluster_size=4096"),
        ("v2", "compat=0.10,cluster_size=4096"),
        ("ext", "extended_l2=on,cluster_size=16k"),
    ] {
        let q = dir.path().join(format!("{label}.qcow2"));
        run(
            "qemu-img",
            &["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, s(&raw), s(&q)],
        );
        let good = std::fs::read(&q).expect("read");
        // Where the tables are: mutate there more than anywhere else.
        let l1 = u64::from_be_bytes(good[40..48].try_into().expect("8")) as usize;
        for _ in 0..300 {
            let mut bad = good.clone();
            for _ in 0..1 + next() % 4 {
                let at = match next() % 3 {
                    0 => (next() % 112) as usize,
                    1 => l1 + (next() % 64) as usize,
                    _ => (next() % bad.len() as u64) as usize,
                };
                let at = at.min(bad.len() - 1);
                bad[at] = next() as u8;
            }
            if next() % 8 == 0 {
                bad.truncate((next() % bad.len() as u64) as usize);
            }
            let p = dir.path().join("bad.qcow2");
            std::fs::write(&p, &bad).expect("write");
            let out = dir.path().join("bad.raw");
            match qcow2::to_raw(&p, &out, true, &|_| {}) {
                Ok(Some(_)) => converted += 1,
                Ok(None) => handed_over += 1,
                Err(e) => {
                    assert!(!e.to_string().is_empty());
                    errors += 1;
                }
            }
            let _ = std::fs::remove_file(&out);
        }
    }
    eprintln!("mutations: {converted} converted, {handed_over} left to qemu-img, {errors} refused");
    assert!(errors > 0 && converted > 0, "the mutations reach both outcomes");
}

/// A "bomb": a 16 TiB image whose L2 tables name one data cluster over and over, so
/// 8 TiB of data comes out of a file of a few dozen MiB. The import is refused before
/// anything is written, with the sizes in the message (this host has less free space).
#[test]
fn an_image_with_more_data_than_free_space_is_refused_up_front() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = dir.path().join("bomb.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", s(&q), "16T"],
    );
    // One cluster of data per 512 GiB region: 16 L2 tables.
    let writes: Vec<String> = (0..16u64)
        .map(|k| format!("write -q -P 0x5a {}G 2M", k * 512))
        .collect();
    let mut args = vec!["-f", "qcow2"];
    for w in &writes {
        args.extend_from_slice(&["-c", w]);
    }
    args.push(s(&q));
    run("qemu-io", &args);
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&q)
        .expect("open");
    let l1 = be64_at(&q, 40);
    for k in 0..16u64 {
        let l2 = be64_at(&q, l1 + 8 * k) & 0x00ff_ffff_ffff_fe00;
        let entry = be64_at(&q, l2).to_be_bytes();
        let table: Vec<u8> = entry.iter().copied().cycle().take(2 << 20).collect();
        f.write_all_at(&table, l2).expect("write L2");
    }
    drop(f);
    let free = {
        let st = rustix::fs::statvfs(dir.path()).expect("statvfs");
        st.f_bavail * st.f_frsize
    };
    assert!(free < 8 << 40, "this test needs a host with less than 8 TiB free");
    let out = dir.path().join("bomb.raw");
    let e = qcow2::to_raw(&q, &out, true, &|_| {}).expect_err("refused");
    assert!(
        e.to_string().contains(&format!("holds {} bytes of data", 8u64 << 40)),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
}
