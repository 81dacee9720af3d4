//! IPv4 address management for one network: which address each owner (a VM NIC, a service)
//! holds in the network's subnet.
//!
//! IPAM is authoritative and persistent. Its state is a JSON snapshot per network plus a
//! journal beside it (`<file>.journal`): every mutation appends one numbered JSON line to
//! the journal and syncs it (`fdatasync`) before it returns, so an address that was handed
//! out is never handed out again, even across a crash, a power cut or a restart. Opening
//! replays the journal over the snapshot (a torn last line, never acknowledged, is
//! dropped), then writes a new snapshot atomically (temporary file, fsync, rename, fsync of
//! the directory) and empties the journal; the same happens every [`COMPACT_AFTER`]
//! mutations. The network address, the gateway and the broadcast address are never handed
//! out, and new addresses come only from the configured range.
//!
//! The bookkeeping in memory is O(log n) per operation: free addresses are kept as a map of
//! free runs, so finding the lowest free address in a /16 does not scan anything. A
//! mutation writes O(1) bytes; a snapshot is O(n) in the number of allocations.
//!
//! One [`Ipam`] owns its file: open each state file once per process and share it through
//! [`SharedIpam`], which serializes concurrent requests.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Version of the state file's layout.
const STATE_VERSION: u32 = 1;
/// Journal entries after which the snapshot is rewritten and the journal emptied.
pub const COMPACT_AFTER: u64 = 4096;

/// What can go wrong managing a network's addresses.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(
        "subnet {subnet} is too small for a network: it needs a gateway and at least one address \
         for VMs besides its network and broadcast addresses; use a prefix of /30 or shorter"
    )]
    SubnetTooSmall { subnet: Ipv4Net },
    #[error("subnet {subnet} is too large: use a prefix of /8 or longer")]
    SubnetTooLarge { subnet: Ipv4Net },
    #[error(
        "gateway {gateway} cannot be the gateway of subnet {subnet}: it must lie inside the subnet \
         and be neither its network nor its broadcast address"
    )]
    InvalidGateway { gateway: Ipv4Addr, subnet: Ipv4Net },
    #[error("address range {start}-{end} is not valid for subnet {subnet}: {reason}")]
    InvalidRange {
        start: Ipv4Addr,
        end: Ipv4Addr,
        subnet: Ipv4Net,
        reason: &'static str,
    },
    #[error(
        "IPAM state file {path} belongs to subnet {found}, not {expected}: a network's subnet cannot \
         change while it has a state file; keep subnet {found}, or move the file aside (which forgets \
         every address handed out in the network)"
    )]
    SubnetMismatch {
        path: PathBuf,
        found: Ipv4Net,
        expected: Ipv4Net,
    },
    #[error(
        "gateway {gateway} of subnet {subnet} is already held by {owner} (IPAM state file {path}): \
         release that address first or choose another gateway"
    )]
    GatewayTaken {
        path: PathBuf,
        gateway: Ipv4Addr,
        subnet: Ipv4Net,
        owner: String,
    },
    #[error(
        "IPAM state file {path} is not valid: {reason}; restore it from a backup, or move it aside \
         (which forgets every address handed out in the network)"
    )]
    Corrupt { path: PathBuf, reason: String },
    #[error("could not {action} IPAM state file {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("an address owner must have a non-empty name")]
    EmptyOwner,
    #[error("MAC address {mac:?} is not valid: expected six hex octets separated by colons, e.g. 52:54:00:12:34:56")]
    InvalidMac { mac: String },
    #[error(
        "MAC address {mac} already has address {ip} in subnet {subnet}, held by {owner}: a MAC can \
         have one address per network; release {owner} first or use another MAC"
    )]
    MacInUse {
        mac: String,
        ip: Ipv4Addr,
        owner: String,
        subnet: Ipv4Net,
    },
    #[error("{ip} is outside subnet {subnet}: request an address inside the subnet, or none to get a free one")]
    OutOfSubnet { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error(
        "{ip} is reserved in subnet {subnet} (its network, gateway or broadcast address): request \
         another address, or none to get a free one"
    )]
    Reserved { ip: Ipv4Addr, subnet: Ipv4Net },
    #[error(
        "{ip} is outside the address range {start}-{end} of subnet {subnet}: request an address \
         inside the range, or none to get a free one"
    )]
    OutOfRange {
        ip: Ipv4Addr,
        start: Ipv4Addr,
        end: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error(
        "{ip} is already held by {owner}: request another address, or none to get a free one, \
         or release {owner} first"
    )]
    Taken { ip: Ipv4Addr, owner: String },
    #[error(
        "{owner} already holds {current} in subnet {subnet}, not {requested}: release it first to change its address"
    )]
    OwnerHasOtherAddress {
        owner: String,
        current: Ipv4Addr,
        requested: Ipv4Addr,
        subnet: Ipv4Net,
    },
    #[error(
        "{owner} already holds {ip} in subnet {subnet} with MAC {current}, not {requested}: release \
         it first to change its MAC"
    )]
    OwnerHasOtherMac {
        owner: String,
        ip: Ipv4Addr,
        current: String,
        requested: String,
        subnet: Ipv4Net,
    },
    #[error(
        "no free address left in subnet {subnet}: release addresses that are no longer used, or \
         give the network a wider range or subnet"
    )]
    Exhausted { subnet: Ipv4Net },
}

/// One address held by one owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub ip: Ipv4Addr,
    /// Who holds the address, e.g. `vm-1234/nic0`.
    pub owner: String,
    /// The MAC the address is reserved for in DHCP, lower-case, colon-separated.
    pub mac: Option<String>,
}

/// The authoritative, persistent address book of one IPv4 network.
#[derive(Debug)]
pub struct Ipam {
    path: PathBuf,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    /// First and last address new allocations may use (inclusive); never the network or
    /// broadcast address.
    first: Ipv4Addr,
    last: Ipv4Addr,
    by_ip: BTreeMap<Ipv4Addr, Holder>,
    by_owner: HashMap<String, Ipv4Addr>,
    by_mac: HashMap<String, Ipv4Addr>,
    free: FreeRuns,
    /// The journal, open for appending; its length in bytes and in entries.
    journal: Option<File>,
    journal_bytes: u64,
    journal_entries: u64,
    /// Number of the last mutation, in the journal or in the snapshot.
    seq: u64,
    /// Inside [`Ipam::begin_batch`]: entries are written but synced only by [`Ipam::commit`].
    batch: bool,
    unsynced: bool,
}

/// One line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct JournalEntry {
    seq: u64,
    #[serde(flatten)]
    change: Change,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Change {
    Allocate {
        ip: Ipv4Addr,
        owner: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        mac: Option<String>,
    },
    Release {
        owner: String,
    },
}

/// What the state file records for each address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Holder {
    owner: String,
    #[serde(default)]
    mac: Option<String>,
}

/// The state file as written.
#[derive(Serialize)]
struct StateFileOut<'a> {
    version: u32,
    /// The last journal entry the snapshot includes.
    seq: u64,
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    allocations: &'a BTreeMap<Ipv4Addr, Holder>,
}

/// The state file as read.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFileIn {
    version: u32,
    #[serde(default)]
    seq: u64,
    subnet: Ipv4Net,
    #[allow(dead_code)] // Informational: the gateway given to `open` is authoritative.
    gateway: Ipv4Addr,
    allocations: BTreeMap<Ipv4Addr, Holder>,
}

impl Ipam {
    /// Opens the address book of the network with `subnet` and `gateway` stored at `path`,
    /// creating the file (and its directory) when it does not exist yet.
    ///
    /// New addresses come from `range` (inclusive) when given, otherwise from the whole
    /// subnet; the network, gateway and broadcast addresses are never handed out. Addresses
    /// held from an earlier, wider range stay held after the range shrinks.
    pub fn open(
        path: &Path,
        subnet: Ipv4Net,
        gateway: Ipv4Addr,
        range: Option<(Ipv4Addr, Ipv4Addr)>,
    ) -> Result<Ipam, IpamError> {
        let subnet = subnet.trunc();
        if subnet.prefix_len() < 8 {
            return Err(IpamError::SubnetTooLarge { subnet });
        }
        if subnet.prefix_len() > 30 {
            return Err(IpamError::SubnetTooSmall { subnet });
        }
        let (network, broadcast) = (subnet.network(), subnet.broadcast());
        if !subnet.contains(&gateway) || gateway == network || gateway == broadcast {
            return Err(IpamError::InvalidGateway { gateway, subnet });
        }
        let (first, last) = pool_bounds(subnet, gateway, range)?;

        let mut ipam = Ipam {
            path: path.to_path_buf(),
            subnet,
            gateway,
            first,
            last,
            by_ip: BTreeMap::new(),
            by_owner: HashMap::new(),
            by_mac: HashMap::new(),
            free: FreeRuns::new(u32::from(first), u32::from(last)),
            journal: None,
            journal_bytes: 0,
            journal_entries: 0,
            seq: 0,
            batch: false,
            unsynced: false,
        };
        ipam.free.take(u32::from(gateway));

        match fs::read(path) {
            Ok(bytes) => ipam.restore(&bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IpamError::Io {
                    action: "read",
                    path: path.to_path_buf(),
                    source,
                })
            }
        }
        let journal = ipam.journal_path();
        match fs::read(&journal) {
            Ok(bytes) => ipam.replay(&bytes)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(IpamError::Io {
                    action: "read",
                    path: journal,
                    source,
                })
            }
        }
        ipam.compact()?;
        Ok(ipam)
    }

    /// The journal beside the snapshot.
    pub fn journal_path(&self) -> PathBuf {
        let mut name = self.path.clone().into_os_string();
        name.push(".journal");
        PathBuf::from(name)
    }

    /// Applies the journal's entries that the snapshot does not include yet.
    fn replay(&mut self, bytes: &[u8]) -> Result<(), IpamError> {
        let journal = self.journal_path();
        let corrupt = |reason: String| IpamError::Corrupt {
            path: journal.clone(),
            reason,
        };
        let mut lines = bytes.split_inclusive(|&b| b == b'\n').enumerate().peekable();
        while let Some((number, line)) = lines.next() {
            let last = lines.peek().is_none();
            // Only the last line can lack its newline. A crash while appending leaves it
            // torn; its mutation never returned, so it is dropped.
            let parsed = serde_json::from_slice::<JournalEntry>(line);
            let entry = match parsed {
                Ok(entry) if line.ends_with(b"\n") => entry,
                _ if last => {
                    tracing::warn!(path = %journal.display(), "dropping a torn last journal line");
                    break;
                }
                Ok(_) => return Err(corrupt(format!("line {} has no newline", number + 1))),
                Err(e) => return Err(corrupt(format!("line {} is not a journal entry: {e}", number + 1))),
            };
            if entry.seq <= self.seq {
                continue;
            }
            if entry.seq != self.seq + 1 {
                return Err(corrupt(format!(
                    "line {} has entry {} after entry {}",
                    number + 1,
                    entry.seq,
                    self.seq
                )));
            }
            match entry.change {
                Change::Allocate { ip, owner, mac } => {
                    if let Some(holder) = self.by_ip.get(&ip) {
                        return Err(corrupt(format!(
                            "entry {} gives {ip} to {owner:?}, but {:?} holds it",
                            entry.seq, holder.owner
                        )));
                    }
                    self.restore_one(ip, Holder { owner, mac }, &journal)?;
                }
                Change::Release { owner } => {
                    self.remove(&owner);
                }
            }
            self.seq = entry.seq;
        }
        Ok(())
    }

    /// Writes a snapshot of the state in memory, then empties the journal.
    fn compact(&mut self) -> Result<(), IpamError> {
        self.save()?;
        self.unsynced = false;
        let journal = self.journal_path();
        let io_err = |action: &'static str| {
            let path = journal.clone();
            move |source| IpamError::Io { action, path, source }
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&journal)
            .map_err(io_err("open"))?;
        file.set_len(0).map_err(io_err("empty"))?;
        file.sync_all().map_err(io_err("sync"))?;
        self.journal = Some(file);
        self.journal_bytes = 0;
        self.journal_entries = 0;
        Ok(())
    }

    /// Starts a batch: until [`Ipam::commit`], mutations are written to the journal but not
    /// synced, so that many of them cost one sync. Until the commit they may be lost in a
    /// crash, so nothing that depends on them may be reported done before it.
    pub fn begin_batch(&mut self) {
        self.batch = true;
    }

    /// Ends a batch: makes every mutation since [`Ipam::begin_batch`] durable.
    pub fn commit(&mut self) -> Result<(), IpamError> {
        self.batch = false;
        if !std::mem::take(&mut self.unsynced) {
            return Ok(());
        }
        let journal = self.journal_path();
        match &self.journal {
            Some(file) => file.sync_data().map_err(|source| IpamError::Io {
                action: "sync",
                path: journal,
                source,
            }),
            None => Ok(()),
        }
    }

    /// Makes `change` durable: appends it to the journal and syncs. On failure the journal
    /// is cut back to where it was, and the caller undoes the change in memory.
    fn log(&mut self, change: Change) -> Result<(), IpamError> {
        let entry = JournalEntry {
            seq: self.seq + 1,
            change,
        };
        let journal = self.journal_path();
        let io_err = |action: &'static str| {
            let path = journal.clone();
            move |source| IpamError::Io { action, path, source }
        };
        let mut line = serde_json::to_vec(&entry).map_err(|e| io_err("encode an entry of")(io::Error::other(e)))?;
        line.push(b'\n');
        let file = self
            .journal
            .as_mut()
            .ok_or_else(|| io_err("append to")(io::Error::other("the journal is not open")))?;
        let sync = !self.batch;
        if let Err(e) = file
            .write_all(&line)
            .and_then(|()| if sync { file.sync_data() } else { Ok(()) })
        {
            let _ = file.set_len(self.journal_bytes);
            return Err(io_err("append to")(e));
        }
        self.unsynced |= !sync;
        self.journal_bytes += line.len() as u64;
        self.journal_entries += 1;
        self.seq = entry.seq;
        if self.journal_entries >= COMPACT_AFTER {
            // The entry is durable already; a failed compaction is retried next time.
            if let Err(e) = self.compact() {
                tracing::warn!("cannot compact the IPAM journal: {e}");
            }
        }
        Ok(())
    }

    /// Loads the allocations of a state file into this (empty) address book.
    fn restore(&mut self, bytes: &[u8]) -> Result<(), IpamError> {
        let corrupt = |reason: String| IpamError::Corrupt {
            path: self.path.clone(),
            reason,
        };
        let state: StateFileIn = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
        if state.version != STATE_VERSION {
            return Err(corrupt(format!(
                "it has version {}, this netd understands only version {STATE_VERSION}",
                state.version
            )));
        }
        if state.subnet.trunc() != self.subnet {
            return Err(IpamError::SubnetMismatch {
                path: self.path.clone(),
                found: state.subnet,
                expected: self.subnet,
            });
        }
        self.seq = state.seq;
        let path = self.path.clone();
        for (ip, holder) in state.allocations {
            self.restore_one(ip, holder, &path)?;
        }
        Ok(())
    }

    /// Records an allocation read from `path`, checking it against the network.
    fn restore_one(&mut self, ip: Ipv4Addr, holder: Holder, path: &Path) -> Result<(), IpamError> {
        let corrupt = |reason: String| IpamError::Corrupt {
            path: path.to_path_buf(),
            reason,
        };
        if ip == self.gateway {
            return Err(IpamError::GatewayTaken {
                path: self.path.clone(),
                gateway: ip,
                subnet: self.subnet,
                owner: holder.owner,
            });
        }
        if !self.subnet.contains(&ip) || self.is_reserved(ip) {
            return Err(corrupt(format!(
                "{ip} (held by {:?}) is not an address of subnet {} that can be handed out",
                holder.owner, self.subnet
            )));
        }
        if holder.owner.is_empty() {
            return Err(corrupt(format!("{ip} is held by an owner with an empty name")));
        }
        if let Some(other) = self.by_owner.insert(holder.owner.clone(), ip) {
            return Err(corrupt(format!("{:?} holds both {other} and {ip}", holder.owner)));
        }
        if let Some(mac) = &holder.mac {
            if normalize_mac(mac).as_deref() != Some(mac.as_str()) {
                return Err(corrupt(format!("{ip} has an invalid MAC address {mac:?}")));
            }
            if let Some(other) = self.by_mac.insert(mac.clone(), ip) {
                return Err(corrupt(format!("MAC {mac} has both {other} and {ip}")));
            }
        }
        self.free.take(u32::from(ip));
        self.by_ip.insert(ip, holder);
        Ok(())
    }

    /// Gives `owner` an address and returns it.
    ///
    /// Idempotent: an owner that already holds an address gets it back. `requested` asks
    /// for a particular (static) address, which is either honoured or refused with the
    /// reason; without it the lowest free address of the range is handed out. `mac`, when
    /// given, ties the address to that MAC for DHCP (see [`Ipam::reservations`]).
    pub fn allocate(
        &mut self,
        owner: &str,
        mac: Option<&str>,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        if owner.is_empty() {
            return Err(IpamError::EmptyOwner);
        }
        let mac = mac
            .map(|m| normalize_mac(m).ok_or_else(|| IpamError::InvalidMac { mac: m.to_string() }))
            .transpose()?;

        if let Some(&current) = self.by_owner.get(owner) {
            return self.existing(owner, current, mac, requested);
        }
        if let Some(mac) = &mac {
            if let Some(&ip) = self.by_mac.get(mac) {
                return Err(IpamError::MacInUse {
                    mac: mac.clone(),
                    ip,
                    owner: self.owner_of(ip),
                    subnet: self.subnet,
                });
            }
        }

        let ip = match requested {
            Some(ip) => {
                self.check_requestable(ip)?;
                self.free.take(u32::from(ip));
                ip
            }
            None => self
                .free
                .take_lowest()
                .map(Ipv4Addr::from)
                .ok_or(IpamError::Exhausted { subnet: self.subnet })?,
        };
        self.insert(ip, owner, mac.clone());
        let change = Change::Allocate {
            ip,
            owner: owner.to_string(),
            mac,
        };
        if let Err(e) = self.log(change) {
            self.remove(owner);
            return Err(e);
        }
        Ok(ip)
    }

    /// The answer to `allocate` for an owner that already holds `current`.
    fn existing(
        &self,
        owner: &str,
        current: Ipv4Addr,
        mac: Option<String>,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, IpamError> {
        if let Some(requested) = requested.filter(|&r| r != current) {
            return Err(IpamError::OwnerHasOtherAddress {
                owner: owner.to_string(),
                current,
                requested,
                subnet: self.subnet,
            });
        }
        let held_mac = self.by_ip.get(&current).and_then(|h| h.mac.clone());
        match mac {
            Some(mac) if held_mac.as_deref() != Some(mac.as_str()) => Err(IpamError::OwnerHasOtherMac {
                owner: owner.to_string(),
                ip: current,
                current: held_mac.unwrap_or_else(|| "none".to_string()),
                requested: mac,
                subnet: self.subnet,
            }),
            _ => Ok(current),
        }
    }

    /// Checks that a free owner may have `ip` as a static address.
    fn check_requestable(&self, ip: Ipv4Addr) -> Result<(), IpamError> {
        let subnet = self.subnet;
        if !subnet.contains(&ip) {
            return Err(IpamError::OutOfSubnet { ip, subnet });
        }
        if self.is_reserved(ip) {
            return Err(IpamError::Reserved { ip, subnet });
        }
        if ip < self.first || ip > self.last {
            return Err(IpamError::OutOfRange {
                ip,
                start: self.first,
                end: self.last,
                subnet,
            });
        }
        if let Some(holder) = self.by_ip.get(&ip) {
            return Err(IpamError::Taken {
                ip,
                owner: holder.owner.clone(),
            });
        }
        Ok(())
    }

    /// Takes back the address `owner` holds and returns it; releasing an owner that holds
    /// nothing succeeds with `None`.
    pub fn release(&mut self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        let Some((ip, holder)) = self.remove(owner) else {
            return Ok(None);
        };
        if let Err(e) = self.log(Change::Release {
            owner: owner.to_string(),
        }) {
            self.free.take(u32::from(ip));
            self.insert(ip, owner, holder.mac);
            return Err(e);
        }
        Ok(Some(ip))
    }

    /// The address `owner` holds, if any.
    pub fn get(&self, owner: &str) -> Option<Ipv4Addr> {
        self.by_owner.get(owner).copied()
    }

    /// Every allocation, in address order.
    pub fn list(&self) -> Vec<Allocation> {
        self.by_ip
            .iter()
            .map(|(&ip, h)| Allocation {
                ip,
                owner: h.owner.clone(),
                mac: h.mac.clone(),
            })
            .collect()
    }

    /// `(mac, ip)` of every allocation that has a MAC, in address order: the static leases
    /// for the network's DHCP server.
    pub fn reservations(&self) -> Vec<(String, Ipv4Addr)> {
        self.by_ip
            .iter()
            .filter_map(|(&ip, h)| h.mac.clone().map(|mac| (mac, ip)))
            .collect()
    }

    /// The network's subnet.
    pub fn subnet(&self) -> Ipv4Net {
        self.subnet
    }

    /// The network's gateway address.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    /// The first and last address (inclusive) new allocations come from.
    pub fn range(&self) -> (Ipv4Addr, Ipv4Addr) {
        (self.first, self.last)
    }

    /// The state file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn is_reserved(&self, ip: Ipv4Addr) -> bool {
        ip == self.subnet.network() || ip == self.subnet.broadcast() || ip == self.gateway
    }

    fn in_pool(&self, ip: Ipv4Addr) -> bool {
        ip >= self.first && ip <= self.last && ip != self.gateway
    }

    fn owner_of(&self, ip: Ipv4Addr) -> String {
        self.by_ip.get(&ip).map(|h| h.owner.clone()).unwrap_or_default()
    }

    /// Records an allocation in memory; the caller has taken `ip` out of the free runs.
    fn insert(&mut self, ip: Ipv4Addr, owner: &str, mac: Option<String>) {
        if let Some(mac) = &mac {
            self.by_mac.insert(mac.clone(), ip);
        }
        self.by_owner.insert(owner.to_string(), ip);
        self.by_ip.insert(
            ip,
            Holder {
                owner: owner.to_string(),
                mac,
            },
        );
    }

    /// Forgets `owner`'s allocation in memory and returns its address to the free runs.
    fn remove(&mut self, owner: &str) -> Option<(Ipv4Addr, Holder)> {
        let ip = self.by_owner.remove(owner)?;
        let holder = self.by_ip.remove(&ip)?;
        if let Some(mac) = &holder.mac {
            self.by_mac.remove(mac);
        }
        if self.in_pool(ip) {
            self.free.give(u32::from(ip));
        }
        Some((ip, holder))
    }

    /// Replaces the state file atomically with the state in memory.
    fn save(&self) -> Result<(), IpamError> {
        let io_err = |action: &'static str, path: &Path| {
            let path = path.to_path_buf();
            move |source| IpamError::Io { action, path, source }
        };
        let state = StateFileOut {
            version: STATE_VERSION,
            seq: self.seq,
            subnet: self.subnet,
            gateway: self.gateway,
            allocations: &self.by_ip,
        };
        let mut json = serde_json::to_vec_pretty(&state).map_err(|e| IpamError::Io {
            action: "encode",
            path: self.path.clone(),
            source: io::Error::other(e),
        })?;
        json.push(b'\n');

        let dir = match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file_name = self.path.file_name().ok_or_else(|| IpamError::Io {
            action: "name",
            path: self.path.clone(),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        })?;
        let mut tmp_name = std::ffi::OsString::from(".");
        tmp_name.push(file_name);
        tmp_name.push(".tmp");
        let tmp = dir.join(tmp_name);

        fs::create_dir_all(&dir).map_err(io_err("create the directory of", &self.path))?;
        let mut file = File::create(&tmp).map_err(io_err("create", &tmp))?;
        file.write_all(&json).map_err(io_err("write", &tmp))?;
        file.sync_all().map_err(io_err("sync", &tmp))?;
        drop(file);
        fs::rename(&tmp, &self.path).map_err(io_err("replace", &self.path))?;
        // The rename itself is durable only once the directory is synced.
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("sync the directory of", &self.path))
    }
}

/// The first and last address (inclusive) new allocations may come from.
fn pool_bounds(
    subnet: Ipv4Net,
    gateway: Ipv4Addr,
    range: Option<(Ipv4Addr, Ipv4Addr)>,
) -> Result<(Ipv4Addr, Ipv4Addr), IpamError> {
    let lowest = u32::from(subnet.network()) + 1;
    let highest = u32::from(subnet.broadcast()) - 1;
    let Some((start, end)) = range else {
        return Ok((Ipv4Addr::from(lowest), Ipv4Addr::from(highest)));
    };
    let invalid = |reason| IpamError::InvalidRange {
        start,
        end,
        subnet,
        reason,
    };
    if !subnet.contains(&start) || !subnet.contains(&end) {
        return Err(invalid("both ends must lie inside the subnet"));
    }
    if start > end {
        return Err(invalid("its start comes after its end"));
    }
    let first = u32::from(start).max(lowest);
    let last = u32::from(end).min(highest);
    let gw = u32::from(gateway);
    if first > last || (first == last && first == gw) {
        return Err(invalid(
            "it holds no address that can be handed out besides the network, gateway and broadcast addresses",
        ));
    }
    Ok((Ipv4Addr::from(first), Ipv4Addr::from(last)))
}

/// A MAC address in canonical form (lower-case, colon-separated), or `None` when `mac` is
/// not six hex octets separated by colons or dashes.
fn normalize_mac(mac: &str) -> Option<String> {
    let octets: Vec<&str> = mac.split([':', '-']).collect();
    let valid = octets.len() == 6
        && octets
            .iter()
            .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()));
    valid.then(|| octets.join(":").to_ascii_lowercase())
}

/// The free addresses of a pool as runs `start -> end` (inclusive, as `u32`): the lowest
/// free address is the first run's start, and taking or giving back one address touches at
/// most two runs, so every operation is O(log runs).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FreeRuns {
    runs: BTreeMap<u32, u32>,
}

impl FreeRuns {
    fn new(first: u32, last: u32) -> FreeRuns {
        let mut runs = BTreeMap::new();
        if first <= last {
            runs.insert(first, last);
        }
        FreeRuns { runs }
    }

    /// Takes the lowest free address.
    fn take_lowest(&mut self) -> Option<u32> {
        let (start, end) = self.runs.pop_first()?;
        if start < end {
            self.runs.insert(start + 1, end);
        }
        Some(start)
    }

    /// Takes `ip` if it is free; returns whether it was.
    fn take(&mut self, ip: u32) -> bool {
        let Some((&start, &end)) = self.runs.range(..=ip).next_back() else {
            return false;
        };
        if ip > end {
            return false;
        }
        self.runs.remove(&start);
        if start < ip {
            self.runs.insert(start, ip - 1);
        }
        if ip < end {
            self.runs.insert(ip + 1, end);
        }
        true
    }

    /// Gives `ip` back, merging it with the runs next to it.
    fn give(&mut self, ip: u32) {
        let mut start = ip;
        let mut end = ip;
        if let Some((&s, &e)) = self.runs.range(..=ip).next_back() {
            if e >= ip {
                return; // Already free.
            }
            if ip.checked_sub(1) == Some(e) {
                self.runs.remove(&s);
                start = s;
            }
        }
        if let Some(next) = ip.checked_add(1) {
            if let Some(e) = self.runs.remove(&next) {
                end = e;
            }
        }
        self.runs.insert(start, end);
    }
}

/// An [`Ipam`] shared by concurrent requests: each operation holds the lock for its whole
/// duration, including writing the state file, so concurrent allocations never collide.
///
/// The operations block on file I/O; call them from `tokio::task::spawn_blocking` in async
/// code.
#[derive(Debug, Clone)]
pub struct SharedIpam(Arc<Mutex<Ipam>>);

impl SharedIpam {
    pub fn new(ipam: Ipam) -> SharedIpam {
        SharedIpam(Arc::new(Mutex::new(ipam)))
    }

    /// Locks the address book for several operations in a row.
    pub fn lock(&self) -> MutexGuard<'_, Ipam> {
        // Every mutation either completes or is rolled back before an error is returned,
        // and nothing in it panics, so the state behind a poisoned lock is still consistent.
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// See [`Ipam::allocate`].
    pub fn allocate(&self, owner: &str, mac: Option<&str>, requested: Option<Ipv4Addr>) -> Result<Ipv4Addr, IpamError> {
        self.lock().allocate(owner, mac, requested)
    }

    /// See [`Ipam::release`].
    pub fn release(&self, owner: &str) -> Result<Option<Ipv4Addr>, IpamError> {
        self.lock().release(owner)
    }

    /// See [`Ipam::get`].
    pub fn get(&self, owner: &str) -> Option<Ipv4Addr> {
        self.lock().get(owner)
    }

    /// See [`Ipam::list`].
    pub fn list(&self) -> Vec<Allocation> {
        self.lock().list()
    }

    /// See [`Ipam::reservations`].
    pub fn reservations(&self) -> Vec<(String, Ipv4Addr)> {
        self.lock().reservations()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().expect("test subnet")
    }

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().expect("test address")
    }

    fn open_24(dir: &Path) -> Ipam {
        Ipam::open(&dir.join("net.json"), net("10.0.0.0/24"), ip("10.0.0.1"), None).expect("open")
    }

    #[test]
    fn hands_out_lowest_free_address_skipping_network_and_gateway() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        assert_eq!(ipam.allocate("a", None, None).expect("a"), ip("10.0.0.2"));
        assert_eq!(ipam.allocate("b", None, None).expect("b"), ip("10.0.0.3"));
        assert_eq!(ipam.release("a").expect("release"), Some(ip("10.0.0.2")));
        assert_eq!(ipam.allocate("c", None, None).expect("c"), ip("10.0.0.2"));
    }

    #[test]
    fn gateway_in_the_middle_is_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let mut ipam = Ipam::open(&path, net("10.0.0.0/29"), ip("10.0.0.3"), None).expect("open");
        let got: Vec<_> = (0..5)
            .map(|i| ipam.allocate(&format!("vm{i}"), None, None).expect("allocate"))
            .collect();
        assert_eq!(
            got,
            ["10.0.0.1", "10.0.0.2", "10.0.0.4", "10.0.0.5", "10.0.0.6"].map(ip)
        );
    }

    #[test]
    fn exhausting_a_29_gives_an_error_and_release_makes_room() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let mut ipam = Ipam::open(&path, net("192.168.7.0/29"), ip("192.168.7.1"), None).expect("open");
        let got: HashSet<_> = (0..5)
            .map(|i| ipam.allocate(&format!("vm{i}"), None, None).expect("allocate"))
            .collect();
        assert_eq!(got.len(), 5);
        for reserved in ["192.168.7.0", "192.168.7.1", "192.168.7.7"] {
            assert!(!got.contains(&ip(reserved)), "{reserved} handed out");
        }
        let err = ipam
            .allocate("vm5", None, None)
            .expect_err("a /29 has 5 addresses for VMs");
        assert!(matches!(err, IpamError::Exhausted { subnet } if subnet == net("192.168.7.0/29")));
        assert!(err.to_string().contains("192.168.7.0/29"), "{err}");
        ipam.release("vm2").expect("release");
        assert_eq!(
            ipam.allocate("vm5", None, None).expect("after release"),
            ip("192.168.7.4")
        );
    }

    #[test]
    fn static_address_is_honoured_or_refused_with_the_reason() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let range = Some((ip("10.0.0.10"), ip("10.0.0.100")));
        let mut ipam = Ipam::open(&path, net("10.0.0.0/24"), ip("10.0.0.1"), range).expect("open");

        assert_eq!(
            ipam.allocate("db", None, Some(ip("10.0.0.50"))).expect("static"),
            ip("10.0.0.50")
        );
        assert!(matches!(
            ipam.allocate("x", None, Some(ip("10.0.1.5"))),
            Err(IpamError::OutOfSubnet { .. })
        ));
        for reserved in ["10.0.0.0", "10.0.0.1", "10.0.0.255"] {
            assert!(
                matches!(
                    ipam.allocate("x", None, Some(ip(reserved))),
                    Err(IpamError::Reserved { .. })
                ),
                "{reserved}"
            );
        }
        assert!(matches!(
            ipam.allocate("x", None, Some(ip("10.0.0.101"))),
            Err(IpamError::OutOfRange { .. })
        ));
        match ipam.allocate("x", None, Some(ip("10.0.0.50"))) {
            Err(IpamError::Taken { ip: taken, owner }) => {
                assert_eq!((taken, owner.as_str()), (ip("10.0.0.50"), "db"));
            }
            other => panic!("expected Taken, got {other:?}"),
        }
        // Nothing was handed out by the refusals.
        assert_eq!(ipam.list().len(), 1);
        assert_eq!(ipam.get("x"), None);
        // Dynamic allocations go around the static one and stay inside the range.
        assert_eq!(ipam.allocate("y", None, None).expect("dynamic"), ip("10.0.0.10"));
    }

    #[test]
    fn allocate_is_idempotent_per_owner() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        let mac = Some("52:54:00:AA:BB:CC");
        let first = ipam.allocate("vm1/nic0", mac, None).expect("first");
        assert_eq!(ipam.allocate("vm1/nic0", mac, None).expect("again"), first);
        assert_eq!(ipam.allocate("vm1/nic0", None, None).expect("no mac"), first);
        assert_eq!(
            ipam.allocate("vm1/nic0", None, Some(first)).expect("same static"),
            first
        );
        assert!(matches!(
            ipam.allocate("vm1/nic0", None, Some(ip("10.0.0.77"))),
            Err(IpamError::OwnerHasOtherAddress { .. })
        ));
        assert!(matches!(
            ipam.allocate("vm1/nic0", Some("52:54:00:00:00:01"), None),
            Err(IpamError::OwnerHasOtherMac { .. })
        ));
        assert_eq!(ipam.list().len(), 1);
        assert_eq!(ipam.get("vm1/nic0"), Some(first));
    }

    #[test]
    fn macs_are_validated_normalized_and_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        for bad in [
            "",
            "52:54:00:aa:bb",
            "52:54:00:aa:bb:cg",
            "5254.00aa.bbcc",
            "52:54:00:aa:bb:ccc",
        ] {
            assert!(
                matches!(ipam.allocate("a", Some(bad), None), Err(IpamError::InvalidMac { .. })),
                "{bad:?}"
            );
        }
        let a = ipam.allocate("a", Some("52-54-00-AA-BB-CC"), None).expect("a");
        assert_eq!(ipam.reservations(), vec![("52:54:00:aa:bb:cc".to_string(), a)]);
        assert!(matches!(
            ipam.allocate("b", Some("52:54:00:aa:bb:cc"), None),
            Err(IpamError::MacInUse { .. })
        ));
        let b = ipam.allocate("b", None, None).expect("b without mac");
        assert_eq!(ipam.reservations().len(), 1, "b has no MAC, so no reservation");
        assert_ne!(a, b);
        assert!(matches!(ipam.allocate("", None, None), Err(IpamError::EmptyOwner)));
    }

    #[test]
    fn release_of_unknown_owner_succeeds_with_none() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        assert_eq!(ipam.release("nobody").expect("release"), None);
    }

    #[test]
    fn allocations_survive_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("state").join("net.json");
        let (subnet, gw) = (net("10.9.0.0/16"), ip("10.9.0.1"));
        let mut ipam = Ipam::open(&path, subnet, gw, None).expect("open");
        ipam.allocate("a", Some("52:54:00:00:00:0a"), None).expect("a");
        ipam.allocate("b", None, Some(ip("10.9.200.7"))).expect("b");
        ipam.allocate("c", None, None).expect("c");
        ipam.release("a").expect("release a");
        let before = ipam.list();
        drop(ipam);

        let mut ipam = Ipam::open(&path, subnet, gw, None).expect("reopen");
        assert_eq!(ipam.list(), before);
        assert_eq!(ipam.get("b"), Some(ip("10.9.200.7")));
        // The released address is free again, the held ones are not.
        assert_eq!(ipam.allocate("d", None, None).expect("d"), ip("10.9.0.2"));
        assert!(matches!(
            ipam.allocate("e", None, Some(ip("10.9.200.7"))),
            Err(IpamError::Taken { .. })
        ));
    }

    #[test]
    fn mutations_go_to_the_journal_and_reopening_folds_them_into_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        ipam.allocate("vm1", Some("52:54:00:00:00:01"), None).expect("allocate");
        let journal = fs::read_to_string(dir.path().join("net.json.journal")).expect("journal");
        let entry: serde_json::Value = serde_json::from_str(journal.trim_end()).expect("one JSON line");
        assert_eq!(entry["seq"], 1);
        assert_eq!(entry["allocate"]["owner"], "vm1");
        assert_eq!(entry["allocate"]["ip"], "10.0.0.2");
        drop(ipam);

        let _ipam = open_24(dir.path());
        let text = fs::read_to_string(dir.path().join("net.json")).expect("read");
        let json: serde_json::Value = serde_json::from_str(&text).expect("json");
        assert_eq!(json["subnet"], "10.0.0.0/24");
        assert_eq!(json["seq"], 1);
        assert_eq!(json["allocations"]["10.0.0.2"]["owner"], "vm1");
        assert_eq!(json["allocations"]["10.0.0.2"]["mac"], "52:54:00:00:00:01");
        assert_eq!(fs::read(dir.path().join("net.json.journal")).expect("journal").len(), 0);
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .expect("read_dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["net.json", "net.json.journal"], "no temporary file is left");
    }

    #[test]
    fn a_torn_last_journal_line_is_dropped_and_a_torn_middle_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        ipam.allocate("a", None, None).expect("a");
        ipam.allocate("b", None, None).expect("b");
        drop(ipam);
        let journal = dir.path().join("net.json.journal");
        let whole = fs::read(&journal).expect("journal");
        // The crash came while "c" was being written: its call never returned.
        let mut torn = whole.clone();
        torn.extend_from_slice(br#"{"seq":3,"allocate":{"ip":"10.0.0.4","ow"#);
        fs::write(&journal, &torn).expect("write");
        let mut ipam = open_24(dir.path());
        assert_eq!(ipam.get("a"), Some(ip("10.0.0.2")));
        assert_eq!(ipam.get("b"), Some(ip("10.0.0.3")));
        assert_eq!(ipam.get("c"), None);
        assert_eq!(ipam.allocate("c", None, None).expect("c"), ip("10.0.0.4"));
        drop(ipam);

        let mut broken = b"{\"seq\":99,garbage\n".to_vec();
        broken.extend_from_slice(&whole);
        fs::write(&journal, broken).expect("write");
        let err = Ipam::open(&dir.path().join("net.json"), net("10.0.0.0/24"), ip("10.0.0.1"), None)
            .expect_err("a damaged journal is refused");
        assert!(err.to_string().contains("line 1"), "{err}");
    }

    #[test]
    fn a_journal_already_folded_into_the_snapshot_is_not_applied_twice() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        ipam.allocate("a", None, None).expect("a");
        ipam.release("a").expect("release");
        assert_eq!(ipam.allocate("b", None, None).expect("b"), ip("10.0.0.2"));
        drop(ipam);
        let journal = dir.path().join("net.json.journal");
        let entries = fs::read(&journal).expect("journal");
        // Reopening writes the snapshot and empties the journal; a crash between the two
        // leaves both, which must give the same state.
        drop(open_24(dir.path()));
        fs::write(&journal, entries).expect("restore the journal");
        let ipam = open_24(dir.path());
        assert_eq!(ipam.get("b"), Some(ip("10.0.0.2")));
        assert_eq!(ipam.get("a"), None);
    }

    #[test]
    fn a_batch_is_written_at_once_and_durable_after_commit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam = open_24(dir.path());
        ipam.begin_batch();
        for owner in ["a", "b", "c"] {
            ipam.allocate(owner, None, None).expect("allocate");
        }
        ipam.release("b").expect("release");
        ipam.commit().expect("commit");
        ipam.allocate("d", None, None).expect("outside the batch");
        drop(ipam);
        let ipam = open_24(dir.path());
        let held: Vec<_> = ipam.list().into_iter().map(|a| (a.owner, a.ip.to_string())).collect();
        assert_eq!(
            held,
            [
                ("a".to_owned(), "10.0.0.2".to_owned()),
                ("d".to_owned(), "10.0.0.3".to_owned()),
                ("c".to_owned(), "10.0.0.4".to_owned())
            ]
        );
    }

    #[test]
    fn the_journal_is_compacted_after_many_mutations() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ipam =
            Ipam::open(&dir.path().join("net.json"), net("10.0.0.0/16"), ip("10.0.0.1"), None).expect("open");
        for n in 0..COMPACT_AFTER + 3 {
            ipam.allocate(&format!("o{n}"), None, None).expect("allocate");
        }
        let journal = fs::read_to_string(dir.path().join("net.json.journal")).expect("journal");
        assert_eq!(journal.lines().count(), 3, "compacted, then three more entries");
        drop(ipam);
        let ipam = Ipam::open(&dir.path().join("net.json"), net("10.0.0.0/16"), ip("10.0.0.1"), None).expect("open");
        assert_eq!(ipam.list().len() as u64, COMPACT_AFTER + 3);
    }

    #[test]
    fn reopen_with_another_subnet_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        drop(open_24(dir.path()));
        let err = Ipam::open(&path, net("10.0.1.0/24"), ip("10.0.1.1"), None).expect_err("other subnet");
        assert!(matches!(err, IpamError::SubnetMismatch { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains("10.0.0.0/24") && msg.contains("10.0.1.0/24"), "{msg}");
    }

    #[test]
    fn reopen_with_a_gateway_someone_holds_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let mut ipam = open_24(dir.path());
        ipam.allocate("a", None, None).expect("a"); // 10.0.0.2
        drop(ipam);
        let err = Ipam::open(&path, net("10.0.0.0/24"), ip("10.0.0.2"), None).expect_err("gateway held");
        assert!(
            matches!(err, IpamError::GatewayTaken { ref owner, .. } if owner == "a"),
            "{err:?}"
        );
    }

    #[test]
    fn corrupt_state_file_is_reported_not_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let cases = [
            "not json",
            r#"{"version":1,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","allocations":{"10.0.0.255":{"owner":"a"}}}"#,
            r#"{"version":1,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","allocations":{"10.0.0.2":{"owner":"a"},"10.0.0.3":{"owner":"a"}}}"#,
            r#"{"version":1,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","allocations":{"10.0.0.2":{"owner":"a","mac":"zz"}}}"#,
            r#"{"version":2,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","allocations":{}}"#,
            r#"{"version":1,"subnet":"10.0.0.0/24","gateway":"10.0.0.1","allocations":{},"extra":1}"#,
        ];
        for text in cases {
            fs::write(&path, text).expect("write");
            let err = Ipam::open(&path, net("10.0.0.0/24"), ip("10.0.0.1"), None).expect_err(text);
            assert!(matches!(err, IpamError::Corrupt { .. }), "{text}: {err:?}");
            assert_eq!(fs::read_to_string(&path).expect("read"), text, "file was changed");
        }
    }

    #[test]
    fn unusable_subnets_gateways_and_ranges_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let open = |subnet: &str, gw: &str, range: Option<(&str, &str)>| {
            Ipam::open(&path, net(subnet), ip(gw), range.map(|(a, b)| (ip(a), ip(b))))
        };
        assert!(matches!(
            open("10.0.0.0/31", "10.0.0.1", None),
            Err(IpamError::SubnetTooSmall { .. })
        ));
        assert!(matches!(
            open("10.0.0.0/32", "10.0.0.0", None),
            Err(IpamError::SubnetTooSmall { .. })
        ));
        assert!(matches!(
            open("10.0.0.0/7", "10.0.0.1", None),
            Err(IpamError::SubnetTooLarge { .. })
        ));
        assert!(matches!(
            open("10.0.0.0/24", "10.0.1.1", None),
            Err(IpamError::InvalidGateway { .. })
        ));
        assert!(matches!(
            open("10.0.0.0/24", "10.0.0.0", None),
            Err(IpamError::InvalidGateway { .. })
        ));
        assert!(matches!(
            open("10.0.0.0/24", "10.0.0.255", None),
            Err(IpamError::InvalidGateway { .. })
        ));
        let bad_ranges = [
            ("10.0.0.20", "10.0.0.10"),
            ("10.0.0.10", "10.0.1.10"),
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.255", "10.0.0.255"),
        ];
        for range in bad_ranges {
            assert!(
                matches!(
                    open("10.0.0.0/24", "10.0.0.1", Some(range)),
                    Err(IpamError::InvalidRange { .. })
                ),
                "{range:?}"
            );
        }
        assert!(!path.exists(), "a refused open must not create the state file");
        // A /30 has exactly one address besides the gateway.
        let mut ipam = open("10.0.0.0/30", "10.0.0.1", None).expect("/30");
        assert_eq!(ipam.allocate("a", None, None).expect("a"), ip("10.0.0.2"));
        assert!(matches!(
            ipam.allocate("b", None, None),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn range_limits_dynamic_addresses_and_reserved_ends_are_skipped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        // A range covering the whole subnet still never yields network, gateway, broadcast.
        let whole = Some((ip("10.0.0.0"), ip("10.0.0.7")));
        let mut ipam = Ipam::open(&path, net("10.0.0.0/29"), ip("10.0.0.6"), whole).expect("open");
        let got: Vec<_> = (0..5).map(|i| ipam.allocate(&format!("{i}"), None, None)).collect();
        let got: Vec<_> = got.into_iter().map(|r| r.expect("allocate")).collect();
        assert_eq!(
            got,
            ["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4", "10.0.0.5"].map(ip)
        );
        assert!(ipam.allocate("5", None, None).is_err());

        let path2 = dir.path().join("net2.json");
        let range = Some((ip("10.1.0.5"), ip("10.1.0.6")));
        let mut ipam = Ipam::open(&path2, net("10.1.0.0/24"), ip("10.1.0.1"), range).expect("open");
        assert_eq!(ipam.range(), (ip("10.1.0.5"), ip("10.1.0.6")));
        assert_eq!(ipam.allocate("a", None, None).expect("a"), ip("10.1.0.5"));
        assert_eq!(ipam.allocate("b", None, None).expect("b"), ip("10.1.0.6"));
        assert!(matches!(
            ipam.allocate("c", None, None),
            Err(IpamError::Exhausted { .. })
        ));
    }

    #[test]
    fn shrinking_the_range_keeps_addresses_already_held() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let mut ipam = open_24(dir.path());
        ipam.allocate("old", None, Some(ip("10.0.0.200"))).expect("old");
        drop(ipam);
        let range = Some((ip("10.0.0.10"), ip("10.0.0.20")));
        let mut ipam = Ipam::open(&path, net("10.0.0.0/24"), ip("10.0.0.1"), range).expect("reopen");
        assert_eq!(ipam.get("old"), Some(ip("10.0.0.200")));
        assert_eq!(ipam.release("old").expect("release"), Some(ip("10.0.0.200")));
        assert!(matches!(
            ipam.allocate("new", None, Some(ip("10.0.0.200"))),
            Err(IpamError::OutOfRange { .. })
        ));
    }

    #[test]
    fn concurrent_allocations_are_all_distinct_and_persisted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("net.json");
        let (subnet, gw) = (net("172.16.0.0/22"), ip("172.16.0.1"));
        let shared = SharedIpam::new(Ipam::open(&path, subnet, gw, None).expect("open"));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    (0..25)
                        .map(|i| {
                            let owner = format!("t{t}-{i}");
                            let ip = shared.allocate(&owner, None, None).expect("allocate");
                            // Asking again from another thread's point of view changes nothing.
                            assert_eq!(shared.allocate(&owner, None, None).expect("again"), ip);
                            ip
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all = HashSet::new();
        for t in threads {
            for ip in t.join().expect("thread") {
                assert!(all.insert(ip), "{ip} handed out twice");
                assert!(ip != gw && ip != subnet.network() && ip != subnet.broadcast());
            }
        }
        assert_eq!(all.len(), 200);
        let before = shared.list();
        drop(shared);
        let reopened = Ipam::open(&path, subnet, gw, None).expect("reopen");
        assert_eq!(reopened.list(), before);
    }

    #[test]
    fn free_runs_find_lowest_fast_and_merge_on_give() {
        // A /16's worth of addresses in memory only: every one is handed out once, in order.
        let mut free = FreeRuns::new(1, 65534);
        for expected in 1..=65534 {
            assert_eq!(free.take_lowest(), Some(expected));
        }
        assert_eq!(free.take_lowest(), None);
        for ip in [5, 7, 6, 100, 99, 101] {
            free.give(ip);
        }
        assert_eq!(free.runs, BTreeMap::from([(5, 7), (99, 101)]));
        free.give(6); // already free
        assert_eq!(free.runs, BTreeMap::from([(5, 7), (99, 101)]));
        assert!(free.take(6));
        assert!(!free.take(6));
        assert_eq!(free.runs, BTreeMap::from([(5, 5), (7, 7), (99, 101)]));
        assert_eq!(free.take_lowest(), Some(5));
    }

    // Property test: random allocate / release / reopen sequences on a /27 checked against
    // a simple model of who holds what.

    const PROP_SUBNET: &str = "10.20.30.32/27"; // .32 network, .63 broadcast
    const PROP_GATEWAY: &str = "10.20.30.33";
    const OWNERS: u8 = 40; // more owners than addresses, so the pool runs out

    #[derive(Debug, Clone)]
    enum Op {
        /// Owner index, whether to pass a MAC, requested address as an offset from .24 (so
        /// some fall outside the subnet on both sides).
        Allocate(u8, bool, Option<u8>),
        Release(u8),
        Reopen,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0..OWNERS, any::<bool>(), proptest::option::of(0u8..48)).prop_map(|(o, m, r)| Op::Allocate(o, m, r)),
            3 => (0..OWNERS).prop_map(Op::Release),
            1 => Just(Op::Reopen),
        ]
    }

    fn prop_mac(owner: u8) -> String {
        format!("52:54:00:00:01:{owner:02x}")
    }

    /// What `allocate` must answer, worked out from the model independently of `Ipam`.
    fn expected_allocate(
        model: &BTreeMap<Ipv4Addr, (String, Option<String>)>,
        range: (Ipv4Addr, Ipv4Addr),
        owner: &str,
        mac: Option<&str>,
        requested: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, &'static str> {
        let subnet = net(PROP_SUBNET);
        if let Some((&held, (_, held_mac))) = model.iter().find(|(_, (o, _))| o == owner) {
            return match (requested, mac) {
                (Some(r), _) if r != held => Err("OwnerHasOtherAddress"),
                (_, Some(m)) if held_mac.as_deref() != Some(m) => Err("OwnerHasOtherMac"),
                _ => Ok(held),
            };
        }
        let reserved = |a: Ipv4Addr| a == subnet.network() || a == subnet.broadcast() || a == ip(PROP_GATEWAY);
        let in_range = |a: Ipv4Addr| a >= range.0 && a <= range.1;
        match requested {
            Some(r) if !subnet.contains(&r) => Err("OutOfSubnet"),
            Some(r) if reserved(r) => Err("Reserved"),
            Some(r) if !in_range(r) => Err("OutOfRange"),
            Some(r) if model.contains_key(&r) => Err("Taken"),
            Some(r) => Ok(r),
            None => (u32::from(range.0)..=u32::from(range.1))
                .map(Ipv4Addr::from)
                .find(|&a| !reserved(a) && !model.contains_key(&a))
                .ok_or("Exhausted"),
        }
    }

    fn error_kind(e: &IpamError) -> &'static str {
        match e {
            IpamError::OwnerHasOtherAddress { .. } => "OwnerHasOtherAddress",
            IpamError::OwnerHasOtherMac { .. } => "OwnerHasOtherMac",
            IpamError::OutOfSubnet { .. } => "OutOfSubnet",
            IpamError::Reserved { .. } => "Reserved",
            IpamError::OutOfRange { .. } => "OutOfRange",
            IpamError::Taken { .. } => "Taken",
            IpamError::Exhausted { .. } => "Exhausted",
            _ => "other",
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn random_operations_keep_ipam_consistent(
            narrow in any::<bool>(),
            ops in proptest::collection::vec(op(), 1..120),
        ) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("net.json");
            let subnet = net(PROP_SUBNET);
            let gateway = ip(PROP_GATEWAY);
            let range = narrow.then(|| (ip("10.20.30.33"), ip("10.20.30.50")));
            let mut ipam = Ipam::open(&path, subnet, gateway, range).expect("open");
            let pool = ipam.range();
            let mut model: BTreeMap<Ipv4Addr, (String, Option<String>)> = BTreeMap::new();

            for op in ops {
                match op {
                    Op::Allocate(o, with_mac, requested) => {
                        let owner = format!("vm{o}");
                        let mac = with_mac.then(|| prop_mac(o));
                        let requested = requested.map(|off| Ipv4Addr::from(u32::from(ip("10.20.30.24")) + u32::from(off)));
                        let want = expected_allocate(&model, pool, &owner, mac.as_deref(), requested);
                        let got = ipam.allocate(&owner, mac.as_deref(), requested);
                        match (&want, &got) {
                            (Ok(w), Ok(g)) => {
                                prop_assert_eq!(w, g);
                                model.entry(*g).or_insert((owner, mac));
                            }
                            (Err(w), Err(g)) => prop_assert_eq!(*w, error_kind(g)),
                            _ => prop_assert!(false, "{:?}: expected {:?}, got {:?}", op, want, got),
                        }
                    }
                    Op::Release(o) => {
                        let owner = format!("vm{o}");
                        let held = model.iter().find(|(_, (h, _))| *h == owner).map(|(&a, _)| a);
                        if let Some(a) = held {
                            model.remove(&a);
                        }
                        prop_assert_eq!(ipam.release(&owner).expect("release"), held);
                    }
                    Op::Reopen => {
                        let before = ipam.list();
                        drop(ipam);
                        ipam = Ipam::open(&path, subnet, gateway, range).expect("reopen");
                        prop_assert_eq!(ipam.list(), before);
                    }
                }

                let list = ipam.list();
                let owners: HashSet<_> = list.iter().map(|a| a.owner.clone()).collect();
                prop_assert_eq!(owners.len(), list.len(), "an owner holds two addresses");
                let ips: HashSet<_> = list.iter().map(|a| a.ip).collect();
                prop_assert_eq!(ips.len(), list.len(), "an address is held twice");
                for a in &list {
                    prop_assert!(a.ip != subnet.network() && a.ip != subnet.broadcast() && a.ip != gateway);
                    prop_assert!(a.ip >= pool.0 && a.ip <= pool.1, "{} outside {:?}", a.ip, pool);
                    prop_assert_eq!(ipam.get(&a.owner), Some(a.ip));
                }
                let modelled: Vec<_> = model
                    .iter()
                    .map(|(&ip, (owner, mac))| Allocation { ip, owner: owner.clone(), mac: mac.clone() })
                    .collect();
                prop_assert_eq!(list, modelled);
            }
        }
    }
}
