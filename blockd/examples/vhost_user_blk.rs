//! Serves a raw image file on a vhost-user-blk socket until SIGINT or SIGTERM: blockd's
//! backend on its own, for benchmarks (`scripts/bench_vhost_user.sh`) and manual tests.
//!
//!     cargo run --release -p blockd --example vhost_user_blk -- \
//!         --socket /tmp/blk.sock --image disk.raw [--queues 2] [--read-only]

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use blockd::device::{BlockDevice, FileDevice};
use blockd::vhost_user::{VhostUserBlkExport, VhostUserBlkOptions};
use clap::Parser;

#[derive(Parser, Debug)]
struct Args {
    /// Socket the frontend (QEMU) connects to.
    #[arg(long)]
    socket: PathBuf,
    /// Raw image file or block device to serve.
    #[arg(long)]
    image: PathBuf,
    /// Request queues, one worker thread each.
    #[arg(long, default_value_t = 1)]
    queues: u16,
    /// Serve the image read-only.
    #[arg(long)]
    read_only: bool,
    /// Microseconds to keep polling a busy queue before interrupting the guest.
    #[arg(long, default_value_t = VhostUserBlkOptions::default().poll_us)]
    poll_us: u32,
    /// GET_ID answer.
    #[arg(long, default_value = "hearth")]
    serial: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let signals = block_termination_signals()?;
    let device: Arc<dyn BlockDevice> = Arc::new(
        FileDevice::open(&args.image, args.read_only).with_context(|| format!("opening {}", args.image.display()))?,
    );
    let options = VhostUserBlkOptions {
        num_queues: args.queues,
        serial: args.serial,
        poll_us: args.poll_us,
        ..Default::default()
    };
    let export = VhostUserBlkExport::start(&args.socket, device, options)
        .with_context(|| format!("serving on {}", args.socket.display()))?;
    eprintln!("serving {} on {}", args.image.display(), args.socket.display());
    let mut signal: libc::c_int = 0;
    // SAFETY: `signals` is an initialised sigset; `signal` is a live c_int to write to.
    let r = unsafe { libc::sigwait(&signals, &mut signal) };
    if r != 0 {
        anyhow::bail!("sigwait failed: {}", std::io::Error::from_raw_os_error(r));
    }
    export.stop().context("stopping the export")?;
    Ok(())
}

/// Blocks SIGINT and SIGTERM in this thread (and so in every thread started after) so
/// that `sigwait` receives them.
fn block_termination_signals() -> anyhow::Result<libc::sigset_t> {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a live sigset_t; these calls only write to it and to this thread's
    // signal mask.
    let r = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if r != 0 {
        anyhow::bail!("pthread_sigmask failed: {}", std::io::Error::from_raw_os_error(r));
    }
    Ok(set)
}
