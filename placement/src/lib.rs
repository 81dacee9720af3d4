//! hearth's scheduler: given the hosts (their capacity, what is placed on them, their
//! state) and what a VM needs, it picks the host and says why, for the chosen host and
//! for every other one. Pure and synchronous: the api feeds it from the store and
//! records the [`Decision`] on the VM, so `GET /v1/vms/{id}` can show it.
//!
//! Rules, in order:
//! 1. a host that is not `ready` (cordoned, draining, lost) takes no new VM;
//! 2. `placement.host` names the only host that may be chosen;
//! 3. a host already holding a VM of the request's anti-affinity group is excluded;
//! 4. memory and disk are never overcommitted; vCPUs up to the host's allocatable
//!    vCPUs (the api allows a ratio of vCPUs per host CPU);
//! 5. among the hosts left, the one with the most room after placing the VM wins
//!    (spread): the smallest of its free vCPU, memory and disk fractions is compared,
//!    then the number of VMs it holds, then its name.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// How much of something a host has, or a VM needs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_bytes: u64,
}

impl Resources {
    fn plus(self, o: Resources) -> Resources {
        Resources {
            vcpus: self.vcpus.saturating_add(o.vcpus),
            memory_mib: self.memory_mib.saturating_add(o.memory_mib),
            disk_bytes: self.disk_bytes.saturating_add(o.disk_bytes),
        }
    }
}

/// A host as the scheduler sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Host {
    pub name: String,
    /// `None` when it takes new VMs; else why not ("cordoned", "lost: …").
    pub unavailable: Option<String>,
    /// What may be placed on it in all.
    pub allocatable: Resources,
    /// What the VMs placed on it take.
    pub used: Resources,
    pub vms: u32,
    /// The anti-affinity groups of the VMs on it.
    pub groups: BTreeSet<String>,
}

/// What a VM needs, and the user's rules.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Request {
    pub needs: Resources,
    /// Only this host.
    pub host: Option<String>,
    /// No two VMs of this group on one host.
    pub anti_affinity_group: Option<String>,
}

/// Why one host was or was not chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verdict {
    pub host: String,
    pub chosen: bool,
    /// In words: "most room after placing: 81% of memory free" or "cordoned".
    pub reason: String,
}

/// The scheduler's answer: the host (or none) and a verdict for every host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Decision {
    /// The chosen host; `None` when no host can take the VM.
    pub host: Option<String>,
    /// The chosen host's verdict first, then the others by name.
    pub verdicts: Vec<Verdict>,
}

impl Decision {
    /// One line for an error message when nothing was chosen: each host and why.
    pub fn summary(&self) -> String {
        self.verdicts
            .iter()
            .map(|v| format!("{}: {}", v.host, v.reason))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

fn mib(bytes: u64) -> u64 {
    bytes / (1024 * 1024)
}

/// Why `host` cannot take `req`, or `None` when it can.
fn refusal(host: &Host, req: &Request) -> Option<String> {
    if let Some(why) = &host.unavailable {
        return Some(why.clone());
    }
    if let Some(wanted) = &req.host {
        if *wanted != host.name {
            return Some(format!("placement names host {wanted}"));
        }
    }
    if let Some(group) = &req.anti_affinity_group {
        if host.groups.contains(group) {
            return Some(format!("already holds a VM of anti-affinity group {group}"));
        }
    }
    let after = host.used.plus(req.needs);
    let (a, u, n) = (host.allocatable, host.used, req.needs);
    if after.memory_mib > a.memory_mib {
        return Some(format!(
            "needs {} MiB of memory, {} MiB free",
            n.memory_mib,
            a.memory_mib.saturating_sub(u.memory_mib)
        ));
    }
    if after.vcpus > a.vcpus {
        return Some(format!(
            "needs {} vCPUs, {} of {} allocatable free",
            n.vcpus,
            a.vcpus.saturating_sub(u.vcpus),
            a.vcpus
        ));
    }
    if after.disk_bytes > a.disk_bytes {
        return Some(format!(
            "needs {} MiB of disk, {} MiB free",
            mib(n.disk_bytes),
            mib(a.disk_bytes.saturating_sub(u.disk_bytes))
        ));
    }
    None
}

/// The free share of `total` after `used` (1.0 when there is no such resource asked
/// for and none to have).
fn free_share(total: u64, used: u64) -> f64 {
    if total == 0 {
        return 1.0;
    }
    total.saturating_sub(used) as f64 / total as f64
}

/// The tightest resource after placing: its free share and its name.
fn room(host: &Host, req: &Request) -> (f64, &'static str) {
    let after = host.used.plus(req.needs);
    let a = host.allocatable;
    [
        (free_share(a.memory_mib, after.memory_mib), "memory"),
        (free_share(u64::from(a.vcpus), u64::from(after.vcpus)), "vCPUs"),
        (free_share(a.disk_bytes, after.disk_bytes), "disk"),
    ]
    .into_iter()
    .fold((f64::INFINITY, "memory"), |best, x| if x.0 < best.0 { x } else { best })
}

/// Picks the host for `req` among `hosts` (see the module's rules) and explains it.
pub fn place(hosts: &[Host], req: &Request) -> Decision {
    let mut verdicts = Vec::with_capacity(hosts.len());
    // (room, vms, index) of the best so far.
    let mut best: Option<(f64, u32, usize)> = None;
    let mut fits: Vec<(usize, f64, &'static str)> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        match refusal(h, req) {
            Some(reason) => verdicts.push(Verdict {
                host: h.name.clone(),
                chosen: false,
                reason,
            }),
            None => {
                let (share, tightest) = room(h, req);
                fits.push((i, share, tightest));
                let better = match best {
                    None => true,
                    Some((s, vms, j)) => {
                        share > s || (share == s && (h.vms < vms || (h.vms == vms && h.name < hosts[j].name)))
                    }
                };
                if better {
                    best = Some((share, h.vms, i));
                }
            }
        }
    }
    let chosen = best.map(|(_, _, i)| i);
    let percent = |s: f64| (s * 100.0).round() as u32;
    for (i, share, tightest) in fits {
        let h = &hosts[i];
        let (is_chosen, reason) = if Some(i) == chosen {
            let why = if req.host.is_some() {
                "the host placement names".to_string()
            } else {
                format!("most room after placing: {}% of its {tightest} free", percent(share))
            };
            (true, why)
        } else {
            let best = chosen.map(|c| hosts[c].name.as_str()).unwrap_or_default();
            (
                false,
                format!(
                    "fits, with less room than {best}: {}% of its {tightest} free after",
                    percent(share)
                ),
            )
        };
        verdicts.push(Verdict {
            host: h.name.clone(),
            chosen: is_chosen,
            reason,
        });
    }
    verdicts.sort_by(|a, b| b.chosen.cmp(&a.chosen).then_with(|| a.host.cmp(&b.host)));
    Decision {
        host: chosen.map(|i| hosts[i].name.clone()),
        verdicts,
    }
}

/// Adds a placed VM to its host, as the next decision must see it.
pub fn commit(host: &mut Host, req: &Request) {
    host.used = host.used.plus(req.needs);
    host.vms += 1;
    if let Some(g) = &req.anti_affinity_group {
        host.groups.insert(g.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn host(name: &str, vcpus: u32, memory_mib: u64) -> Host {
        Host {
            name: name.into(),
            unavailable: None,
            allocatable: Resources {
                vcpus,
                memory_mib,
                disk_bytes: 100 * GIB,
            },
            used: Resources::default(),
            vms: 0,
            groups: BTreeSet::new(),
        }
    }

    fn needs(vcpus: u32, memory_mib: u64) -> Request {
        Request {
            needs: Resources {
                vcpus,
                memory_mib,
                disk_bytes: GIB,
            },
            ..Default::default()
        }
    }

    fn reason<'a>(d: &'a Decision, host: &str) -> &'a str {
        &d.verdicts.iter().find(|v| v.host == host).expect("verdict").reason
    }

    #[test]
    fn vms_spread_over_hosts_and_every_host_gets_a_reason() {
        let mut hosts = vec![host("a", 8, 8192), host("b", 8, 8192), host("c", 16, 16384)];
        let req = needs(2, 2048);
        let mut placed = Vec::new();
        for _ in 0..8 {
            let d = place(&hosts, &req);
            assert_eq!(d.verdicts.len(), 3, "{d:?}");
            assert!(d.verdicts[0].chosen && d.verdicts.iter().filter(|v| v.chosen).count() == 1);
            let h = d.host.clone().expect("placed");
            let i = hosts.iter().position(|x| x.name == h).expect("host");
            commit(&mut hosts[i], &req);
            placed.push(h);
        }
        // c is twice the size: it goes first, and ends with twice as many.
        assert_eq!(placed[0], "c");
        let count = |h: &str| placed.iter().filter(|p| *p == h).count();
        assert_eq!((count("a"), count("b"), count("c")), (2, 2, 4), "{placed:?}");
        let d = place(&hosts, &req);
        assert_eq!(reason(&d, "c"), "most room after placing: 38% of its memory free");
        assert_eq!(
            reason(&d, "a"),
            "fits, with less room than c: 25% of its memory free after"
        );
    }

    #[test]
    fn rules_exclude_hosts_with_the_reason_said() {
        let mut hosts = vec![
            host("a", 8, 4096),
            host("b", 2, 65536),
            host("c", 8, 65536),
            host("d", 8, 65536),
        ];
        hosts[2].unavailable = Some("cordoned".into());
        hosts[3].groups.insert("db".into());
        let mut req = needs(4, 8192);
        req.anti_affinity_group = Some("db".into());
        let d = place(&hosts, &req);
        assert_eq!(d.host, None);
        assert_eq!(reason(&d, "a"), "needs 8192 MiB of memory, 4096 MiB free");
        assert_eq!(reason(&d, "b"), "needs 4 vCPUs, 2 of 2 allocatable free");
        assert_eq!(reason(&d, "c"), "cordoned");
        assert_eq!(reason(&d, "d"), "already holds a VM of anti-affinity group db");
        assert!(d.summary().contains("a: needs 8192 MiB"), "{}", d.summary());

        let mut req = needs(1, 512);
        req.host = Some("a".into());
        let d = place(&hosts, &req);
        assert_eq!(d.host.as_deref(), Some("a"));
        assert_eq!(reason(&d, "a"), "the host placement names");
        assert_eq!(reason(&d, "b"), "placement names host a");
        req.needs.disk_bytes = 200 * GIB;
        assert_eq!(
            reason(&place(&hosts, &req), "a"),
            "needs 204800 MiB of disk, 102400 MiB free"
        );
    }

    #[test]
    fn an_anti_affinity_group_spreads_over_distinct_hosts() {
        let mut hosts = vec![host("a", 64, 65536), host("b", 8, 4096), host("c", 8, 4096)];
        let mut req = needs(1, 512);
        req.anti_affinity_group = Some("pg".into());
        let mut got = BTreeSet::new();
        for _ in 0..3 {
            let h = place(&hosts, &req).host.expect("placed");
            let i = hosts.iter().position(|x| x.name == h).expect("host");
            commit(&mut hosts[i], &req);
            assert!(got.insert(h), "two VMs of one group on one host");
        }
        assert_eq!(place(&hosts, &req).host, None, "a fourth has nowhere to go");
    }
}
