//! The control channel: JSON lines over a virtio-serial port (QEMU) or a vsock
//! listener (Cloud Hypervisor), whichever the VM has. Requests are carried out one at
//! a time.

use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::sync::Mutex;

use guest_agent::{Envelope, Response, SERIAL_PORT_NAME, VSOCK_PORT};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn answer(line: &str) -> Option<String> {
    let line = line.trim();
    if line.is_empty() {
        return None;
    }
    let response = match serde_json::from_str::<Envelope>(line) {
        Ok(env) => {
            let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
            match crate::ops::handle(env.request) {
                Ok(result) => Response {
                    id: env.id,
                    ok: true,
                    result,
                    error: None,
                },
                Err(e) => Response {
                    id: env.id,
                    ok: false,
                    result: serde_json::Value::Null,
                    error: Some(e),
                },
            }
        }
        Err(e) => {
            let id = serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["id"].as_u64())
                .unwrap_or(0);
            Response {
                id,
                ok: false,
                result: serde_json::Value::Null,
                error: Some(format!("bad request: {e}")),
            }
        }
    };
    serde_json::to_string(&response).ok()
}

/// Serves one stream until it ends.
fn serve_stream(read: impl std::io::Read, mut write: impl Write) -> std::io::Result<()> {
    let mut lines = BufReader::new(read);
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line)? == 0 {
            return Ok(());
        }
        if let Some(out) = answer(&line) {
            write.write_all(out.as_bytes())?;
            write.write_all(b"\n")?;
            write.flush()?;
        }
    }
}

/// The virtio-serial port's device, found by its name in sysfs.
fn serial_port() -> Option<String> {
    std::fs::read_dir("/sys/class/virtio-ports")
        .ok()?
        .flatten()
        .find_map(|e| {
            let name = std::fs::read_to_string(e.path().join("name")).ok()?;
            (name.trim() == SERIAL_PORT_NAME).then(|| format!("/dev/{}", e.file_name().to_string_lossy()))
        })
}

fn serve_serial(dev: String) {
    loop {
        match std::fs::OpenOptions::new().read(true).write(true).open(&dev) {
            Ok(f) => {
                let w = match f.try_clone() {
                    Ok(w) => w,
                    Err(_) => continue,
                };
                // A read returns 0 while the host has not connected: wait and read again.
                let _ = serve_stream(&f, w);
            }
            Err(e) => eprintln!("{dev}: {e}"),
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn vsock_listener() -> Option<i32> {
    // SAFETY: plain socket(2); the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: sockaddr_vm is plain old data; zeroed is valid before the fields are set.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = VSOCK_PORT;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_vm of `len` bytes; fd is ours.
    let ok = unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) } == 0
        // SAFETY: fd is a bound socket of ours.
        && unsafe { libc::listen(fd, 4) } == 0;
    if !ok {
        // SAFETY: fd is ours and closed once.
        unsafe { libc::close(fd) };
        return None;
    }
    Some(fd)
}

fn serve_vsock(fd: i32) {
    loop {
        // SAFETY: fd is a listening socket; no address is asked for.
        let conn = unsafe { libc::accept4(fd, std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
        if conn < 0 {
            std::thread::sleep(std::time::Duration::from_millis(100));
            continue;
        }
        std::thread::spawn(move || {
            // SAFETY: accept4 gave us this descriptor; the File owns and closes it.
            let f = unsafe { std::fs::File::from_raw_fd(conn) };
            if let Ok(w) = f.try_clone() {
                let _ = serve_stream(&f, w);
            }
        });
    }
}

/// Serves the channels the VM has, for ever.
pub fn serve() -> Result<(), String> {
    let serial = serial_port();
    let vsock = vsock_listener();
    if serial.is_none() && vsock.is_none() {
        return Err(format!(
            "no control channel: no virtio-serial port {SERIAL_PORT_NAME} and no vsock"
        ));
    }
    let mut threads = Vec::new();
    if let Some(dev) = serial {
        threads.push(std::thread::spawn(move || serve_serial(dev)));
    }
    if let Some(fd) = vsock {
        threads.push(std::thread::spawn(move || serve_vsock(fd)));
    }
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// The ACPI power button: the image has no systemd-logind (it needs D-Bus, which costs
/// boot time under emulation), so the agent turns the button into a clean shutdown.
/// PostgreSQL then stops with a checkpoint instead of being cut off when the host
/// forces the VM down after its stop timeout.
pub fn watch_power_button() {
    let devices = std::fs::read_to_string("/proc/bus/input/devices").unwrap_or_default();
    let Some(event) = devices.split("\n\n").find_map(|block| {
        if !block.contains("Power Button") {
            return None;
        }
        block
            .lines()
            .find(|l| l.starts_with("H: Handlers="))?
            .split_whitespace()
            .find(|h| h.starts_with("event"))
            .map(|h| format!("/dev/input/{h}"))
    }) else {
        eprintln!("no ACPI power button found");
        return;
    };
    std::thread::spawn(move || {
        use std::io::Read;
        let Ok(mut f) = std::fs::File::open(&event) else {
            eprintln!("{event}: cannot open");
            return;
        };
        // struct input_event: a timeval (16 bytes), type u16, code u16, value i32.
        let mut ev = [0u8; 24];
        while f.read_exact(&mut ev).is_ok() {
            let kind = u16::from_le_bytes([ev[16], ev[17]]);
            let code = u16::from_le_bytes([ev[18], ev[19]]);
            let value = i32::from_le_bytes([ev[20], ev[21], ev[22], ev[23]]);
            // EV_KEY, KEY_POWER, pressed.
            if kind == 1 && code == 116 && value == 1 {
                crate::console("HEARTH-AGENT power button: shutting down");
                let _ = std::process::Command::new("systemctl")
                    .args(["--no-block", "poweroff"])
                    .status();
            }
        }
    });
}
