//! Persistent TAP devices, one per VM NIC, made through `/dev/net/tun` ioctls (netlink
//! cannot create TAPs; netd never shells out to `ip`).
//!
//! netd creates each TAP persistent and closes its descriptor: the device stays, with no
//! queue attached, until it is deleted. The VMM later attaches its own queues with
//! `TUNSETIFF` on the name. A multi-queue TAP only needs `IFF_MULTI_QUEUE` set when it is
//! created; its queues exist only while a VMM holds their descriptors, so netd opens none of
//! them. `queues` must match what the VMM will ask for: QEMU asks for a multi-queue TAP
//! when `queues > 1`, Cloud Hypervisor when it has more than one queue pair
//! (`num_queues > 2`).
//!
//! Existing devices are read from `/sys/class/net/<name>/tun_flags`, which shows the
//! network namespace sysfs was mounted in: netd and its sysfs must share one.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use libc::{c_char, c_int, c_short, c_ulong};
use sha2::{Digest, Sha256};

/// The clone device every TUN/TAP is made through.
const TUN_CLONE_DEVICE: &str = "/dev/net/tun";
/// Longest interface name the kernel accepts (`IFNAMSIZ` less the terminating NUL).
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;
/// Most queues a TAP can have (the kernel's `MAX_TAP_QUEUES`).
pub const MAX_QUEUES: u32 = 256;

/// The flags of every TAP netd makes: Ethernet frames, no packet-info header, and the
/// virtio-net header that QEMU and Cloud Hypervisor use for offloads.
const TAP_FLAGS: c_int = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
/// The flags `TUNSETIFF` takes that describe a device (as opposed to `IFF_PERSIST`, which
/// sysfs shows but only `TUNSETPERSIST` sets).
const DEVICE_FLAGS: c_int =
    libc::IFF_TUN | libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR | libc::IFF_MULTI_QUEUE;

/// What can go wrong creating or deleting a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("{name:?} is not a valid TAP name: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("TAP {name} cannot have {queues} queues: give between 1 and {MAX_QUEUES}")]
    InvalidQueues { name: String, queues: u32 },
    #[error(
        "network interface {name} exists but is not a TAP device; choose another name, or remove \
         that interface if it is left over"
    )]
    NotATap { name: String },
    #[error(
        "TAP {name} exists as a {existing} TAP, but a {wanted} one was asked for; delete it (when \
         no VM uses it) and create it again"
    )]
    QueueModeMismatch {
        name: String,
        existing: &'static str,
        wanted: &'static str,
    },
    #[error("TAP {name} is in use by a running VM or another process; stop that VM first")]
    Busy { name: String },
    #[error("cannot {action} TAP {name}: netd needs CAP_NET_ADMIN (run it as root)")]
    PermissionDenied { name: String, action: &'static str },
    #[error(
        "cannot open {TUN_CLONE_DEVICE} to manage TAP {name}: {source}; load the tun kernel module (modprobe tun)"
    )]
    NoTunDevice {
        name: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot {action} TAP {name}: {source}")]
    Io {
        name: String,
        action: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Creates the persistent TAP `name` for a NIC with `queues` queues (multi-queue when more
/// than one). Idempotent: a persistent TAP of that name with the same queue mode is left
/// as it is, even while a VM uses it.
pub fn create_tap(name: &str, queues: u32) -> Result<(), TapError> {
    check_name(name)?;
    if queues == 0 || queues > MAX_QUEUES {
        return Err(TapError::InvalidQueues {
            name: name.to_string(),
            queues,
        });
    }
    let multi_queue = queues > 1;
    let mut flags = TAP_FLAGS;
    if multi_queue {
        flags |= libc::IFF_MULTI_QUEUE;
    }
    match link_kind(name)? {
        LinkKind::Missing => {}
        LinkKind::Other => return Err(TapError::NotATap { name: name.to_string() }),
        LinkKind::Tun(existing) => {
            if existing & libc::IFF_TAP == 0 {
                return Err(TapError::NotATap { name: name.to_string() });
            }
            if (existing & libc::IFF_MULTI_QUEUE != 0) != multi_queue {
                return Err(TapError::QueueModeMismatch {
                    name: name.to_string(),
                    existing: queue_mode(!multi_queue),
                    wanted: queue_mode(multi_queue),
                });
            }
            if existing & libc::IFF_PERSIST != 0 {
                return Ok(());
            }
            // A process holds it without persistence; attaching with other flags would change
            // the offloads under its feet, so keep the ones it has.
            flags = existing & DEVICE_FLAGS;
        }
    }
    let queue = attach(name, flags, "create")?;
    set_persist(&queue, name, true)
    // Dropping `queue` closes it; the device stays because it is persistent.
}

/// Deletes the TAP `name`; a missing TAP is success. A multi-queue TAP that a running VM
/// still holds disappears when the VM closes its queues; a single-queue one in use is
/// refused with [`TapError::Busy`].
pub fn delete_tap(name: &str) -> Result<(), TapError> {
    check_name(name)?;
    let flags = match link_kind(name)? {
        LinkKind::Missing => return Ok(()),
        LinkKind::Other => return Err(TapError::NotATap { name: name.to_string() }),
        LinkKind::Tun(flags) if flags & libc::IFF_TAP == 0 => {
            return Err(TapError::NotATap { name: name.to_string() });
        }
        // Not persistent: it lives exactly as long as the process holding it.
        LinkKind::Tun(flags) if flags & libc::IFF_PERSIST == 0 => {
            return Err(TapError::Busy { name: name.to_string() });
        }
        LinkKind::Tun(flags) => flags & DEVICE_FLAGS,
    };
    // If the TAP vanished since, this makes a fresh one that goes away again below.
    let queue = attach(name, flags, "delete")?;
    set_persist(&queue, name, false)
    // Closing the last queue of a device that is not persistent destroys it.
}

/// Whether a TUN/TAP device called `name` exists.
pub fn tap_exists(name: &str) -> bool {
    check_name(name).is_ok() && sys_class_net(name).join("tun_flags").exists()
}

/// The TAP name of NIC `nic_index` of VM `vm_id`: `htap` and 10 hex digits of a hash of
/// both, 14 bytes, the same on every call and every host. Changing the scheme would orphan
/// the TAPs of existing VMs.
pub fn tap_name_for(vm_id: &str, nic_index: usize) -> String {
    let digest = nic_digest(b"hearth tap name", vm_id, nic_index);
    let hex: String = digest[..5].iter().map(|b| format!("{b:02x}")).collect();
    format!("htap{hex}")
}

/// The MAC address of NIC `nic_index` of VM `vm_id`: `52:54:00` (locally administered,
/// unicast, the prefix QEMU uses) and three bytes of a hash of both, stable like
/// [`tap_name_for`]. With 24 bits of hash, two NICs in one network share a MAC with a
/// chance of about n²/2²⁵; IPAM refuses a MAC that is already in use in its network.
pub fn mac_for(vm_id: &str, nic_index: usize) -> String {
    let d = nic_digest(b"hearth mac", vm_id, nic_index);
    format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
}

/// SHA-256 of an unambiguous encoding of `(domain, vm_id, nic_index)`.
fn nic_digest(domain: &[u8], vm_id: &str, nic_index: usize) -> [u8; 32] {
    let mut hash = Sha256::new();
    hash.update(domain);
    hash.update((vm_id.len() as u64).to_le_bytes());
    hash.update(vm_id.as_bytes());
    hash.update((nic_index as u64).to_le_bytes());
    hash.finalize().into()
}

/// Checks `name` as the kernel's `dev_valid_name` does, with the reason it fails.
fn check_name(name: &str) -> Result<(), TapError> {
    let reason = if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_NAME_LEN {
        Some("interface names are at most 15 bytes long")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are not interface names")
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace() || b == 0x0b)
    {
        Some("interface names cannot contain '/', ':', NUL or whitespace")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(TapError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

fn queue_mode(multi_queue: bool) -> &'static str {
    if multi_queue {
        "multi-queue"
    } else {
        "single-queue"
    }
}

/// What the interface called `name` is.
enum LinkKind {
    Missing,
    /// A TUN or TAP with its `tun_flags`.
    Tun(c_int),
    /// Some other kind of interface (a bridge, a veth…).
    Other,
}

fn sys_class_net(name: &str) -> PathBuf {
    PathBuf::from("/sys/class/net").join(name)
}

fn link_kind(name: &str) -> Result<LinkKind, TapError> {
    let dir = sys_class_net(name);
    let path = dir.join("tun_flags");
    let io_err = |source| TapError::Io {
        name: name.to_string(),
        action: "read the flags of",
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let hex = text.trim().trim_start_matches("0x");
            let flags = c_int::from_str_radix(hex, 16).map_err(|e| {
                io_err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{} holds {text:?}: {e}", path.display()),
                ))
            })?;
            Ok(LinkKind::Tun(flags))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.exists() {
                Ok(LinkKind::Other)
            } else {
                Ok(LinkKind::Missing)
            }
        }
        Err(e) => Err(io_err(e)),
    }
}

/// Opens a queue of the TUN/TAP `name` with `flags` (`TUNSETIFF`), creating the device if
/// it does not exist.
fn attach(name: &str, flags: c_int, action: &'static str) -> Result<File, TapError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(TUN_CLONE_DEVICE)
        .map_err(|source| match source.kind() {
            io::ErrorKind::PermissionDenied => TapError::PermissionDenied {
                name: name.to_string(),
                action,
            },
            _ => TapError::NoTunDevice {
                name: name.to_string(),
                source,
            },
        })?;

    // SAFETY: `ifreq` holds only integers, arrays and a union of such (and a pointer that
    // is never dereferenced here); all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // `check_name` bounds the name to IFNAMSIZ - 1 bytes, so the zeroed tail terminates it.
    for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
        *dst = src as c_char;
    }
    // Every TUN/TAP flag fits in the 16-bit `ifr_flags`, as the kernel's ABI has it.
    req.ifr_ifru.ifru_flags = flags as c_short;

    // SAFETY: `file` is an open descriptor of /dev/net/tun; TUNSETIFF reads and writes one
    // `struct ifreq`, and `req` is a valid, exclusively borrowed one that outlives the call.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(ioctl_error(name, action, io::Error::last_os_error()));
    }
    Ok(file)
}

/// Makes the device behind `queue` persistent or not (`TUNSETPERSIST`).
fn set_persist(queue: &File, name: &str, persist: bool) -> Result<(), TapError> {
    let action = if persist { "make persistent" } else { "delete" };
    // SAFETY: `queue` is a /dev/net/tun descriptor attached to a device; TUNSETPERSIST
    // takes its argument by value and touches no memory of ours.
    let rc = unsafe { libc::ioctl(queue.as_raw_fd(), libc::TUNSETPERSIST, c_ulong::from(persist)) };
    if rc < 0 {
        return Err(ioctl_error(name, action, io::Error::last_os_error()));
    }
    Ok(())
}

fn ioctl_error(name: &str, action: &'static str, source: io::Error) -> TapError {
    let name = name.to_string();
    match source.raw_os_error() {
        Some(libc::EBUSY) => TapError::Busy { name },
        Some(libc::EPERM) | Some(libc::EACCES) => TapError::PermissionDenied { name, action },
        _ => TapError::Io { name, action, source },
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::ptr;

    use super::*;

    /// Runs `body` on a thread of its own in a fresh network namespace, with a private
    /// mount namespace in which /sys is a sysfs of that network namespace, so the test
    /// sees and touches only its own interfaces, never the host's. Needs root.
    fn in_private_netns<F: FnOnce() + Send + 'static>(body: F) {
        let thread = std::thread::spawn(move || {
            // SAFETY: unshare takes flags only; it moves this thread (alone) into new
            // network and mount namespaces.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET | libc::CLONE_NEWNS) };
            assert_eq!(rc, 0, "unshare (TAP tests need root): {}", io::Error::last_os_error());
            // SAFETY: the path is a NUL-terminated literal; the null source, type and data are
            // allowed when only changing propagation.
            let rc = unsafe {
                libc::mount(
                    ptr::null(),
                    c"/".as_ptr(),
                    ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    ptr::null(),
                )
            };
            assert_eq!(rc, 0, "make mounts private: {}", io::Error::last_os_error());
            // SAFETY: all strings are NUL-terminated literals; sysfs takes no data. The mount
            // lives in this thread's private mount namespace only.
            let rc = unsafe { libc::mount(c"sysfs".as_ptr(), c"/sys".as_ptr(), c"sysfs".as_ptr(), 0, ptr::null()) };
            assert_eq!(rc, 0, "mount sysfs: {}", io::Error::last_os_error());
            body();
        });
        if let Err(panic) = thread.join() {
            std::panic::resume_unwind(panic);
        }
    }

    fn tun_flags(name: &str) -> c_int {
        match link_kind(name).expect("read tun_flags") {
            LinkKind::Tun(flags) => flags,
            LinkKind::Missing => panic!("{name} is missing"),
            LinkKind::Other => panic!("{name} is not a TUN/TAP"),
        }
    }

    /// The TUN/TAP details `ip -d link` reports for `name`, as an independent check of
    /// what the kernel made (run from the test's thread, so in its namespace).
    fn ip_link_tun_info(name: &str) -> serde_json::Value {
        let out = std::process::Command::new("ip")
            .args(["-json", "-details", "link", "show", "dev", name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip link show {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip's JSON");
        assert_eq!(links[0]["linkinfo"]["info_kind"], "tun", "{links}");
        links[0]["linkinfo"]["info_data"].clone()
    }

    /// Attaches a queue the way a VMM does.
    fn vmm_queue(name: &str, multi_queue: bool) -> Result<File, TapError> {
        let mq = if multi_queue { libc::IFF_MULTI_QUEUE } else { 0 };
        attach(name, TAP_FLAGS | mq, "attach to")
    }

    #[test]
    fn single_queue_tap_is_created_persistent_and_deleted() {
        in_private_netns(|| {
            let name = "htaptest0";
            assert!(!tap_exists(name));
            create_tap(name, 1).expect("create");
            // The descriptor create_tap used is closed: the device stays because it is persistent.
            assert!(tap_exists(name));
            let flags = tun_flags(name);
            assert_eq!(flags & DEVICE_FLAGS, TAP_FLAGS, "flags {flags:#x}");
            assert_ne!(flags & libc::IFF_PERSIST, 0, "flags {flags:#x}");
            let info = ip_link_tun_info(name);
            assert_eq!(
                (
                    &info["type"],
                    &info["pi"],
                    &info["vnet_hdr"],
                    &info["multi_queue"],
                    &info["persist"]
                ),
                (&"tap".into(), &false.into(), &true.into(), &false.into(), &true.into()),
                "{info}"
            );

            // A VMM can attach its queue.
            let queue = vmm_queue(name, false).expect("VMM attaches");
            // Creating again while the VM runs changes nothing and does not fail.
            create_tap(name, 1).expect("create again while in use");
            assert!(matches!(delete_tap(name), Err(TapError::Busy { .. })));
            assert!(tap_exists(name));
            drop(queue);

            delete_tap(name).expect("delete");
            assert!(!tap_exists(name));
            delete_tap(name).expect("delete again");
        });
    }

    #[test]
    fn create_is_idempotent() {
        in_private_netns(|| {
            let name = "htaptest1";
            create_tap(name, 1).expect("create");
            create_tap(name, 1).expect("create again");
            assert_eq!(tun_flags(name) & DEVICE_FLAGS, TAP_FLAGS);
            delete_tap(name).expect("delete");
        });
    }

    #[test]
    fn multi_queue_tap_takes_several_queues() {
        in_private_netns(|| {
            let name = "htaptest2";
            create_tap(name, 4).expect("create");
            create_tap(name, 4).expect("create again");
            let flags = tun_flags(name);
            assert_eq!(
                flags & DEVICE_FLAGS,
                TAP_FLAGS | libc::IFF_MULTI_QUEUE,
                "flags {flags:#x}"
            );
            assert_ne!(flags & libc::IFF_PERSIST, 0);

            let queues: Vec<_> = (0..4).map(|_| vmm_queue(name, true).expect("queue")).collect();
            let info = ip_link_tun_info(name);
            assert_eq!(
                (
                    &info["type"],
                    &info["multi_queue"],
                    &info["persist"],
                    &info["numqueues"]
                ),
                (&"tap".into(), &true.into(), &true.into(), &4.into()),
                "{info}"
            );
            // A single-queue TAP of the same name cannot be had instead.
            assert!(matches!(create_tap(name, 1), Err(TapError::QueueModeMismatch { .. })));

            // Deleting while the VM holds its queues: gone once the VM closes them.
            delete_tap(name).expect("delete");
            assert!(tap_exists(name));
            drop(queues);
            assert!(!tap_exists(name));
        });
    }

    #[test]
    fn single_queue_tap_is_not_turned_into_multi_queue() {
        in_private_netns(|| {
            let name = "htaptest3";
            create_tap(name, 1).expect("create");
            let err = create_tap(name, 2).expect_err("queue mode differs");
            assert!(err.to_string().contains("single-queue"), "{err}");
            delete_tap(name).expect("delete");
        });
    }

    #[test]
    fn other_interfaces_are_never_taken_or_deleted() {
        in_private_netns(|| {
            assert!(matches!(create_tap("lo", 1), Err(TapError::NotATap { .. })));
            assert!(matches!(delete_tap("lo"), Err(TapError::NotATap { .. })));
            assert!(sys_class_net("lo").exists());
            assert!(!tap_exists("lo"));
        });
    }

    #[test]
    fn bad_names_and_queue_counts_are_refused() {
        // Validation happens before any device is touched, so no namespace is needed.
        for name in ["", "htap0123456789ab", "a/b", "a:b", "a b", ".", ".."] {
            assert!(
                matches!(create_tap(name, 1), Err(TapError::InvalidName { .. })),
                "{name:?}"
            );
            assert!(
                matches!(delete_tap(name), Err(TapError::InvalidName { .. })),
                "{name:?}"
            );
            assert!(!tap_exists(name));
        }
        let err = create_tap("htap0123456789ab", 1).expect_err("16 bytes");
        assert!(err.to_string().contains("15 bytes"), "{err}");
        assert!(matches!(create_tap("htapq", 0), Err(TapError::InvalidQueues { .. })));
        assert!(matches!(
            create_tap("htapq", MAX_QUEUES + 1),
            Err(TapError::InvalidQueues { .. })
        ));
    }

    #[test]
    fn longest_name_is_accepted() {
        in_private_netns(|| {
            let name = "htap0123456789a"; // 15 bytes
            create_tap(name, 1).expect("create");
            assert!(tap_exists(name));
            delete_tap(name).expect("delete");
        });
    }

    #[test]
    fn derived_names_and_macs_are_stable_bounded_and_distinct() {
        let name = tap_name_for("vm-1", 0);
        assert_eq!(name, tap_name_for("vm-1", 0));
        assert!(name.starts_with("htap") && name.len() == 14, "{name}");
        assert!(name[4..]
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert!(check_name(&tap_name_for(&"x".repeat(1000), usize::MAX)).is_ok());

        let mac = mac_for("vm-1", 0);
        assert_eq!(mac, mac_for("vm-1", 0));
        assert!(mac.starts_with("52:54:00:") && mac.len() == 17, "{mac}");

        // Different VMs, different NICs, and ids that only differ in where the index starts.
        let keys = [("vm-1", 0), ("vm-1", 1), ("vm-2", 0), ("vm-11", 0), ("vm-1", 10)];
        let names: HashSet<_> = keys.iter().map(|&(v, i)| tap_name_for(v, i)).collect();
        let macs: HashSet<_> = keys.iter().map(|&(v, i)| mac_for(v, i)).collect();
        assert_eq!((names.len(), macs.len()), (keys.len(), keys.len()));
    }
}
