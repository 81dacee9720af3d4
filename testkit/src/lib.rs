//! Test support shared by hearth's crates, as a dev-dependency only.
//!
//! [`DebianGuest`] runs a script as root in a throw-away Debian guest: the image
//! `guest-images/debian/build.sh` makes boots under QEMU/TCG on a qcow2 overlay (the
//! image is never written), with a read-only ext4 "payload" disk holding what the test
//! put there (binaries, .debs, images) mounted at `/payload`. systemd runs
//! `/payload/run.sh` once the system is up and powers the guest off when it exits.
//! The tests use it for what these hosts cannot do: a real device-mapper (Debian's
//! cloud kernel has dm-thin-pool; the hosts have no device-mapper at all).

pub mod etcd;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Debian guest being prepared: fill its payload, then [`DebianGuest::run`] a script.
pub struct DebianGuest {
    image: PathBuf,
    work: tempfile::TempDir,
    /// The guest's memory (QEMU's `-m`).
    pub memory: String,
    /// How long the guest may take from start to power-off before the test fails.
    pub timeout: Duration,
}

/// What a guest's run left: its serial console and how long it took.
pub struct GuestRun {
    pub console: String,
    pub elapsed: Duration,
}

impl GuestRun {
    /// Asserts that a test binary run in the guest passed: the script printed `marker`
    /// and the binary's exit status 0 on a line of its own, and the binary reported each
    /// of `tests` and `test result: ok. N passed; 0 failed` (N = how many). Panics with
    /// the end of the console otherwise.
    pub fn assert_tests_passed(&self, marker: &str, tests: &[&str]) {
        let log = &self.console;
        let verdict = log
            .lines()
            .find_map(|l| l.trim().strip_prefix(marker))
            .unwrap_or_else(|| panic!("the guest script did not finish; its console:\n{}", tail(log, 150)));
        assert_eq!(
            verdict.trim(),
            "0",
            "the tests failed in the guest:\n{}",
            tail(log, 150)
        );
        assert!(
            // (lvm2's own messages, for one, may share the line that names a test.)
            tests.iter().all(|t| log.contains(&format!("test {t} ...")))
                && log.contains(&format!("test result: ok. {} passed; 0 failed", tests.len())),
            "the guest's test run did not report {tests:?} as passed:\n{}",
            tail(log, 150)
        );
    }
}

impl DebianGuest {
    /// The debian image under `$HEARTH_TEST_IMAGES` (default `/var/cache/hearth/images`).
    pub fn new() -> DebianGuest {
        let image = images_dir().join("debian");
        assert!(
            image.join("image.json").is_file(),
            "the debian image is missing in {}: run guest-images/debian/build.sh (scripts/test.sh does)",
            image.display()
        );
        let work = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(work.path().join("payload")).expect("payload dir");
        DebianGuest {
            image,
            work,
            memory: "1024M".into(),
            timeout: Duration::from_secs(15 * 60),
        }
    }

    /// The directory that becomes `/payload` in the guest.
    pub fn payload(&self) -> PathBuf {
        self.work.path().join("payload")
    }

    /// Copies a file, or a directory with what is in it, to `/payload/<name>`.
    pub fn copy_in(&self, src: &Path, name: &str) {
        copy_tree(src, &self.payload().join(name));
    }

    /// Copies the `.deb`s of `dir` to `/payload/debs` (for `dpkg -i /payload/debs/*.deb`),
    /// after checking that one of them starts with each of `needed` (a package name and
    /// `_`). `fetch` says how to get them when they are not there.
    pub fn copy_debs(&self, dir: &Path, needed: &[&str], fetch: &str) {
        let debs: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        let debs: Vec<PathBuf> = debs
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "deb"))
            .collect();
        for package in needed {
            assert!(
                debs.iter().any(|p| p
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")))),
                "no {package}_*.deb in {}: {fetch}",
                dir.display()
            );
        }
        let out = self.payload().join("debs");
        std::fs::create_dir_all(&out).expect("mkdir debs");
        for deb in debs {
            std::fs::copy(&deb, out.join(deb.file_name().expect("name"))).expect("copy .deb");
        }
    }

    /// Boots the guest with `script` as `/payload/run.sh` and waits until it has powered
    /// off. Panics (with the end of its console) when QEMU fails or the guest takes
    /// longer than [`DebianGuest::timeout`]; QEMU is killed then, also when the test
    /// fails otherwise. The script's output reaches the console if it writes to
    /// `/dev/ttyS0`.
    pub fn run(&self, script: &str) -> GuestRun {
        let work = self.work.path();
        let payload = self.payload();
        std::fs::write(payload.join("run.sh"), script).expect("run.sh");
        let payload_img = work.join("payload.img");
        let root = work.join("root.qcow2");
        let p = |p: &Path| p.to_str().expect("utf8").to_string();
        let size = tree_size(&payload) + 128 * (1 << 20);
        run(
            "mkfs.ext4",
            &["-q", "-d", &p(&payload), &p(&payload_img), &format!("{}k", size / 1024)],
        );
        let backing = p(&self.image.join("disk.raw"));
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-F", "raw", "-b", &backing, &p(&root)],
        );

        let cmdline = std::fs::read_to_string(self.image.join("cmdline")).expect("cmdline");
        // systemd-run-generator turns systemd.run= into a unit that runs once the system
        // is up, then powers off; cloud-init has nothing to do here.
        let append = format!(
            "{} cloud-init=disabled systemd.run=\"/bin/sh -c 'mkdir -p /payload && mount -o ro /dev/vdb /payload && exec /bin/sh /payload/run.sh'\" systemd.run_success_action=poweroff systemd.run_failure_action=poweroff",
            cmdline.trim()
        );
        let serial = work.join("serial.log");
        let qemu = Command::new("qemu-system-x86_64")
            .args([
                "-machine",
                "q35",
                "-accel",
                "tcg",
                "-cpu",
                "max",
                "-smp",
                "2",
                "-m",
                &self.memory,
            ])
            .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
            .arg("-kernel")
            .arg(self.image.join("vmlinuz"))
            .arg("-initrd")
            .arg(self.image.join("initrd.img"))
            .args(["-append", &append])
            .arg("-drive")
            .arg(format!("file={},format=qcow2,if=virtio", p(&root)))
            .arg("-drive")
            .arg(format!("file={},format=raw,if=virtio,readonly=on", p(&payload_img)))
            .arg("-serial")
            .arg(format!("file:{}", p(&serial)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("qemu.stderr")).expect("stderr file"))
            .spawn()
            .expect("start qemu-system-x86_64");
        let mut qemu = KillOnDrop(qemu);
        let started = Instant::now();
        let status = loop {
            if let Some(status) = qemu.0.try_wait().expect("wait for qemu") {
                break status;
            }
            assert!(
                started.elapsed() < self.timeout,
                "the guest did not finish within {:?}; its console so far:\n{}",
                self.timeout,
                tail(&std::fs::read_to_string(&serial).unwrap_or_default(), 80)
            );
            std::thread::sleep(Duration::from_millis(500));
        };
        let console = std::fs::read_to_string(&serial).expect("serial log");
        let stderr = std::fs::read_to_string(work.join("qemu.stderr")).unwrap_or_default();
        assert!(
            status.success(),
            "qemu exited with {status}: {stderr}\n{}",
            tail(&console, 80)
        );
        GuestRun {
            console,
            elapsed: started.elapsed(),
        }
    }
}

impl Default for DebianGuest {
    fn default() -> Self {
        Self::new()
    }
}

/// The start of a script for [`DebianGuest::run`]: its output goes to the console, and
/// the payload's `.deb`s are installed as a user installs them, without starting the
/// services they bring (policy-rc.d) and without triggers (no initramfs rebuild in a
/// throw-away guest). When dpkg fails its log is shown and `<marker>dpkg` printed.
/// `body` follows.
pub fn script_installing_debs(marker: &str, body: &str) -> String {
    format!(
        r#"#!/bin/sh
exec >/dev/ttyS0 2>&1
printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
if ! dpkg --no-triggers -i /payload/debs/*.deb >/tmp/dpkg.log 2>&1; then
    cat /tmp/dpkg.log
    echo "{marker}dpkg"
    exit 1
fi
{body}"#
    )
}

/// 64 KiB of a fixed pseudo-random pattern, for a host to put on a disk and a guest to
/// find there (or the other way round).
pub fn host_pattern() -> Vec<u8> {
    (0..65536u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// The MD5 of `bytes` in hex, as `md5sum` (which a guest also has) prints it.
pub fn md5_hex(bytes: &[u8]) -> String {
    use std::io::Write;
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("md5sum");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(bytes)
        .expect("feed md5sum");
    let out = child.wait_with_output().expect("md5sum output");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// `$HEARTH_TEST_IMAGES`, where the guest images are (default `/var/cache/hearth/images`).
pub fn images_dir() -> PathBuf {
    std::env::var_os("HEARTH_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/images".into())
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A child process killed (by its PID) and reaped when dropped, also when the test fails.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs `prog` with `args` and returns what it printed; panics with its stderr when it
/// fails.
pub fn run(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog} ({e}); scripts/test.sh installs it"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn copy_tree(src: &Path, dst: &Path) {
    if src.is_dir() {
        std::fs::create_dir_all(dst).expect("mkdir");
        for entry in std::fs::read_dir(src).expect("read dir").flatten() {
            copy_tree(&entry.path(), &dst.join(entry.file_name()));
        }
    } else {
        std::fs::copy(src, dst).unwrap_or_else(|e| panic!("copy {}: {e}", src.display()));
    }
}

fn tree_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                tree_size(&path)
            } else {
                e.metadata().map(|m| m.len()).unwrap_or(0)
            }
        })
        .sum()
}

/// Removes the cgroups a test's vmm-manager made under its own cgroup, in every
/// hierarchy (`<own cgroup>/<name>/<vm>`), on drop: what a killed VMM left behind.
pub struct CgroupCleanup(pub String);

impl CgroupCleanup {
    /// The cgroup name (`--cgroup-name`) for the VMs of a test whose data or run
    /// directory is `dir`: its own, so the test can remove it.
    pub fn name_for(dir: &std::path::Path) -> String {
        format!(
            "hearth-{}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        )
    }

    /// The directories named `name` under this process's cgroup in each hierarchy.
    pub fn dirs(name: &str) -> Vec<std::path::PathBuf> {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut out = Vec::new();
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(point) = left.split(' ').nth(4) else { continue };
            let mut r = right.split(' ');
            let fstype = r.next().unwrap_or_default();
            let opts = r.nth(1).unwrap_or_default();
            let path = own.lines().find_map(|l| {
                let mut p = l.splitn(3, ':');
                let (id, ctrls, path) = (p.next()?, p.next()?, p.next()?);
                let hit = match fstype {
                    "cgroup2" => id == "0" && ctrls.is_empty(),
                    "cgroup" => ctrls.split(',').any(|c| {
                        !c.is_empty()
                            && opts
                                .split(',')
                                .any(|o| o == c || o == format!("name={}", c.trim_start_matches("name=")))
                    }),
                    _ => false,
                };
                hit.then(|| path.to_string())
            });
            if let Some(path) = path {
                out.push(
                    std::path::Path::new(point)
                        .join(path.trim_start_matches('/'))
                        .join(name),
                );
            }
        }
        out
    }
}

impl Drop for CgroupCleanup {
    fn drop(&mut self) {
        for dir in Self::dirs(&self.0) {
            if !dir.exists() {
                continue;
            }
            // A VMM killed a moment ago may still be leaving its cgroup.
            for _ in 0..100 {
                if let Ok(entries) = std::fs::read_dir(&dir) {
                    for e in entries.flatten() {
                        if e.path().is_dir() {
                            let _ = std::fs::remove_dir(e.path());
                        }
                    }
                }
                if std::fs::remove_dir(&dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }
}
