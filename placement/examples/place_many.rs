//! The scheduler alone: 1,000 VMs of mixed sizes placed one by one over 50 simulated
//! hosts, each decision seeing the ones before. Prints the median and the slowest
//! decision and how evenly the hosts filled (for `scripts/bench.sh`).

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use hearth_placement::{commit, place, Host, Request, Resources};

fn main() {
    let hosts_n = 50;
    let vms_n = 1000;
    let mut hosts: Vec<Host> = (0..hosts_n)
        .map(|i| Host {
            name: format!("host-{i:02}"),
            unavailable: (i % 17 == 16).then(|| "cordoned".to_string()),
            allocatable: Resources {
                vcpus: 64 + 32 * (i % 3),
                memory_mib: 65536 * (1 + u64::from(i % 4)),
                disk_bytes: (2u64 << 40) * (1 + u64::from(i % 2)),
            },
            used: Resources::default(),
            vms: 0,
            groups: BTreeSet::new(),
        })
        .collect();
    let mut times = Vec::with_capacity(vms_n);
    let mut placed = 0;
    for v in 0..vms_n {
        let req = Request {
            needs: Resources {
                vcpus: 1 + (v as u32 % 4),
                memory_mib: 512 << (v % 4),
                disk_bytes: (10u64 << 30) * (1 + (v as u64 % 3)),
            },
            host: None,
            anti_affinity_group: (v % 10 == 0).then(|| format!("group-{}", v % 30)),
        };
        let t = Instant::now();
        let d = place(&hosts, &req);
        times.push(t.elapsed());
        std::hint::black_box(&d);
        if let Some(h) = d.host {
            let i = hosts.iter().position(|x| x.name == h).expect("host");
            commit(&mut hosts[i], &req);
            placed += 1;
        }
    }
    times.sort();
    let median = times[times.len() / 2];
    let max = *times.last().unwrap_or(&Duration::ZERO);
    let counts: Vec<u32> = hosts
        .iter()
        .filter(|h| h.unavailable.is_none())
        .map(|h| h.vms)
        .collect();
    let (lo, hi) = (
        counts.iter().min().copied().unwrap_or(0),
        counts.iter().max().copied().unwrap_or(0),
    );
    println!(
        "placed {placed}/{vms_n} VMs over {hosts_n} hosts: median {:.1} µs, slowest {:.1} µs per decision; \
         {lo}..{hi} VMs per schedulable host",
        median.as_secs_f64() * 1e6,
        max.as_secs_f64() * 1e6
    );
}
