//! Helpers shared by vmm-manager's integration tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Kills, on the way out (also when the test fails), every process whose command line
/// names this test's private directory: the VMMs it started. Waits (up to 10 s) until
/// they are gone, so what they held (a loop device, a socket) is free afterwards.
pub struct VmmReaper(pub PathBuf);

impl Drop for VmmReaper {
    fn drop(&mut self) {
        let marker = self.0.display().to_string();
        let mut killed = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) {
                if String::from_utf8_lossy(&cmd).contains(&marker) {
                    // SAFETY: signals a process started by this test (it names our tempdir).
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed.push(pid);
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        // A killed child of this process stays a zombie (its parent reaps it, or the
        // test process ends): gone is "no longer running", not "no /proc entry".
        let running = |pid: &i32| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
        };
        while killed.iter().any(running) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The tiny guest image's directory (`guest-images/tiny/build.sh`, which
/// `scripts/test.sh` runs), under `$HEARTH_TEST_IMAGES` (default
/// `/var/cache/hearth/images`).
pub fn tiny_image() -> PathBuf {
    let images = std::env::var_os("HEARTH_TEST_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/hearth/images".into());
    let dir = images.join("tiny");
    assert!(
        dir.join("vmlinux").exists(),
        "the tiny image is missing in {}: run guest-images/tiny/build.sh",
        dir.display()
    );
    dir
}

/// A loop device over a file (`losetup --find --show`), detached when dropped (also when
/// the test fails).
pub struct LoopDevice(pub String);

impl LoopDevice {
    pub fn attach(file: &Path) -> LoopDevice {
        let file = file.to_str().expect("utf-8 path");
        LoopDevice(testkit::run("losetup", &["--find", "--show", file]).trim().to_string())
    }

    /// Makes the device take its backing file's new size (`losetup --set-capacity`).
    pub fn set_capacity(&self) {
        testkit::run("losetup", &["--set-capacity", &self.0]);
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from(&self.0)
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
        // Detached at its last close, which can come a moment later (udev probing).
        let backing = format!("/sys/block/{}/loop/backing_file", self.0.trim_start_matches("/dev/"));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Path::new(&backing).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
