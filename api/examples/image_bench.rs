//! Image benchmarks for `scripts/bench.sh`, printed as a Markdown section:
//!
//! 1. A root disk from a 10 GiB image (1 GiB of it data): blockd's copy-on-write clone
//!    (the path `POST /v1/vms` takes) against a full copy (`cp --sparse=always`, the
//!    cheapest honest copy). On the work directory's file system (ext4 here: a qcow2
//!    overlay) and, when given, on an XFS mount (a reflink).
//! 2. Importing a qcow2 image (the same disk) by path with imaged's importer against
//!    `qemu-img convert -O raw` of the same file.
//!
//! 3. The same for a zlib-compressed qcow2 (the way cloud images ship) made from
//!    `COMPRESS_FROM`, a real guest disk, when given.
//!
//! Usage: image_bench WORK_DIR [XFS_DIR] [ROUNDS] [COMPRESS_FROM]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use blockd::pool_file::FilePool;
use blockd::service::{VolumeService, VolumeSource, VolumeSpec};
use imaged::import::{ImportRequest, ImportState, Importer};
use imaged::store::Store;

const GIB: u64 = 1 << 30;

fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// A 10 GiB sparse raw disk with 1 GiB of pseudo-random data in 16 spread-out pieces.
fn make_image(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create");
    f.set_len(10 * GIB).expect("len");
    let mut chunk = vec![0u8; 64 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for piece in 0..16u64 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        f.write_all_at(&chunk, piece * (10 * GIB / 16)).expect("write");
    }
    // An ext4 superblock magic, so the importer accepts it as a disk.
    f.write_all_at(&[0x53, 0xef], 1080).expect("magic");
    f.sync_all().expect("sync");
}

async fn clone_rounds(pool_dir: &Path, image: &Path, rounds: usize) -> (Vec<f64>, String) {
    let pool = FilePool::open(pool_dir).expect("pool");
    let how = if pool.reflink() { "reflink" } else { "qcow2 overlay" }.to_string();
    let svc = VolumeService::new(Arc::new(pool));
    let mut times = Vec::new();
    for i in 0..rounds {
        let name = format!("root-{i}");
        let spec = VolumeSpec {
            size_bytes: None,
            source: Some(VolumeSource::ImageClone {
                path: image.to_path_buf(),
                key: "sha256:bench".into(),
            }),
        };
        let t = Instant::now();
        svc.ensure(&name, spec).await.expect("clone");
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        svc.delete(&name).await.expect("delete");
    }
    (times, how)
}

fn copy_rounds(image: &Path, dir: &Path, rounds: usize) -> Vec<f64> {
    let mut times = Vec::new();
    for i in 0..rounds {
        let dst = dir.join(format!("copy-{i}.raw"));
        let t = Instant::now();
        run(
            "cp",
            &[
                "--reflink=never",
                "--sparse=always",
                image.to_str().expect("utf8"),
                dst.to_str().expect("utf8"),
            ],
        );
        run("sync", &["-f", dst.to_str().expect("utf8")]);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        std::fs::remove_file(&dst).expect("rm");
    }
    times
}

async fn import_once(qcow2: &Path, dir: &Path) -> f64 {
    let store_dir = dir.join("store");
    let _ = std::fs::remove_dir_all(&store_dir);
    let importer = Arc::new(Importer::new(Arc::new(Store::open(&store_dir).expect("store"))));
    let t = Instant::now();
    let st = importer
        .start(ImportRequest {
            name: "bench".into(),
            path: Some(qcow2.to_path_buf()),
            ..Default::default()
        })
        .expect("start");
    let st = loop {
        let s = importer
            .status(&st.id, std::time::Duration::from_secs(60))
            .await
            .expect("status");
        if s.state != ImportState::Running {
            break s;
        }
    };
    assert_eq!(st.state, ImportState::Succeeded, "{:?}", st.error);
    run("sync", &["-f", store_dir.to_str().expect("utf8")]);
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_dir_all(&store_dir).expect("rm");
    secs
}

fn convert_once(qcow2: &Path, dir: &Path) -> f64 {
    let dst = dir.join("converted.raw");
    let t = Instant::now();
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "qcow2",
            "-O",
            "raw",
            qcow2.to_str().expect("utf8"),
            dst.to_str().expect("utf8"),
        ],
    );
    run("sync", &["-f", dst.to_str().expect("utf8")]);
    let secs = t.elapsed().as_secs_f64();
    std::fs::remove_file(&dst).expect("rm");
    secs
}

/// Interleaved rounds of imaged's import and qemu-img's conversion, the order flipped
/// every round, after the source file is on disk (its own writeback would otherwise
/// slow whichever runs first): medians (s).
async fn import_rounds(qcow2: &Path, work: &Path, rounds: usize) -> (f64, f64) {
    run("sync", &["-f", qcow2.to_str().expect("utf8")]);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 1 {
            theirs.push(convert_once(qcow2, work));
        }
        ours.push(import_once(qcow2, work).await);
        if round % 2 == 0 {
            theirs.push(convert_once(qcow2, work));
        }
    }
    (median(&mut ours), median(&mut theirs))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let work = PathBuf::from(args.get(1).expect("usage: image_bench WORK_DIR [XFS_DIR] [ROUNDS]"));
    let xfs = args.get(2).filter(|s| !s.is_empty()).map(PathBuf::from);
    let rounds: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(5);
    std::fs::create_dir_all(&work).expect("work dir");
    let image = work.join("image.raw");
    eprintln!("making a 10 GiB image with 1 GiB of data");
    make_image(&image);

    let mut rows = Vec::new();
    let (mut t, how) = clone_rounds(&work.join("pool"), &image, rounds).await;
    rows.push((
        format!("blockd clone ({how}, ext4)"),
        median(&mut t),
        t[0],
        t[t.len() - 1],
    ));
    if let Some(x) = &xfs {
        let ximg = x.join("image.raw");
        run(
            "cp",
            &[
                "--sparse=always",
                image.to_str().expect("utf8"),
                ximg.to_str().expect("utf8"),
            ],
        );
        let (mut t, how) = clone_rounds(&x.join("pool"), &ximg, rounds).await;
        rows.push((
            format!("blockd clone ({how}, XFS)"),
            median(&mut t),
            t[0],
            t[t.len() - 1],
        ));
        std::fs::remove_file(&ximg).expect("rm");
    }
    let mut c = copy_rounds(&image, &work, rounds.min(3));
    rows.push((
        "full copy (cp --sparse=always, ext4)".into(),
        median(&mut c),
        c[0],
        c[c.len() - 1],
    ));

    let qcow2 = work.join("image.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            image.to_str().expect("utf8"),
            qcow2.to_str().expect("utf8"),
        ],
    );
    std::fs::remove_file(&image).expect("rm");
    let qsize = std::fs::metadata(&qcow2).expect("md").len();
    let (mo, mt) = import_rounds(&qcow2, &work, rounds).await;
    std::fs::remove_file(&qcow2).expect("rm");
    let mib = qsize as f64 / (1 << 20) as f64;
    let compressed = match args.get(4).filter(|s| !s.is_empty()) {
        Some(from) => {
            let cq = work.join("compressed.qcow2");
            eprintln!("compressing {from} to qcow2 (zlib)");
            run(
                "qemu-img",
                &[
                    "convert",
                    "-c",
                    "-f",
                    "raw",
                    "-O",
                    "qcow2",
                    from,
                    cq.to_str().expect("utf8"),
                ],
            );
            let csize = std::fs::metadata(&cq).expect("md").len() as f64 / (1 << 20) as f64;
            let (o, t) = import_rounds(&cq, &work, rounds).await;
            std::fs::remove_file(&cq).expect("rm");
            Some((from.clone(), csize, o, t))
        }
        None => None,
    };

    println!("\n## Images: root disks by clone, and qcow2 import\n");
    println!(
        "A 10 GiB raw image holding 1 GiB of data; {rounds} rounds (full copies: {}; imports interleaved with \
         qemu-img, the order flipped every round).\n",
        rounds.min(3)
    );
    println!("| root disk from the image | median ms | min | max |\n|---|---|---|---|");
    for (label, m, lo, hi) in &rows {
        println!("| {label} | {m:.1} | {lo:.1} | {hi:.1} |");
    }
    println!("\nGoal: a clone in under 50 ms regardless of the image's size.\n");
    println!(
        "Import of the same disk as qcow2 ({mib:.0} MiB file): imaged by path (one read of the file: SHA-256 of it on \
         one thread while its clusters are written to a sparse raw file) against `qemu-img convert -O raw`, both synced \
         to disk.\n"
    );
    println!("| import | median s | throughput | vs qemu-img |\n|---|---|---|---|");
    println!("| imaged | {mo:.2} | {:.0} MiB/s | {:.2}x |", mib / mo, mt / mo);
    println!("| qemu-img convert | {mt:.2} | {:.0} MiB/s | 1x |", mib / mt);
    if let Some((from, csize, o, t)) = compressed {
        println!(
            "\nA zlib-compressed qcow2 ({csize:.0} MiB file, `qemu-img convert -c` of {from}), the way cloud \
             images ship; the same two imports:\n"
        );
        println!("| import (compressed) | median s | throughput | vs qemu-img |\n|---|---|---|---|");
        println!("| imaged | {o:.2} | {:.0} MiB/s | {:.2}x |", csize / o, t / o);
        println!("| qemu-img convert | {t:.2} | {:.0} MiB/s | 1x |", csize / t);
    }
    println!("\nGoal: at least 0.9x qemu-img.");
}
