//! IPAM throughput: allocations per second in a /16, each one persisted (fsync) before
//! it returns, as netd does. Prints one JSON line. Used by scripts/bench.sh.

use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: u32 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2000);
    let dir = tempfile::tempdir()?;
    let mut ipam = netd::ipam::Ipam::open(
        &dir.path().join("ipam.json"),
        "10.0.0.0/16".parse()?,
        "10.0.0.1".parse()?,
        None,
    )?;
    let start = Instant::now();
    for i in 0..n {
        ipam.allocate(&format!("owner-{i}"), None, None)?;
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"allocations\": {n}, \"seconds\": {secs:.4}, \"per_second\": {:.1}}}",
        f64::from(n) / secs
    );
    Ok(())
}
