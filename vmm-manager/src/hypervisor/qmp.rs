//! A minimal QMP client: one connection per command (the QMP chardev accepts one
//! client at a time, and short connections survive vmm-manager restarts untouched).

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::VmmError;

/// Runs `command` (with optional `arguments`) on the QMP socket and returns its `return`.
pub async fn execute(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
    tokio::time::timeout(Duration::from_secs(10), execute_inner(socket, command, arguments))
        .await
        .map_err(|_| VmmError::Control(format!("QMP {command} timed out")))?
}

/// QEMU serves one QMP client at a time and listens with a short backlog: while
/// another client (a user's tool, a monitor) holds it, a connect can find the backlog
/// full (EAGAIN). That is retried for a moment, not taken for a dead VMM.
async fn connect(socket: &Path) -> Result<UnixStream, VmmError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => return Err(VmmError::Control(format!("{}: {e}", socket.display()))),
        }
    }
}

async fn execute_inner(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
    let stream = connect(socket).await?;
    check_peer(socket, &stream)?;
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd).lines();
    // Greeting, then capabilities negotiation.
    read_reply(&mut lines, "greeting").await?;
    wr.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
    read_reply(&mut lines, "qmp_capabilities").await?;
    let mut msg = json!({"execute": command});
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    let mut line = serde_json::to_vec(&msg).map_err(|e| VmmError::Control(e.to_string()))?;
    line.push(b'\n');
    wr.write_all(&line).await?;
    let reply = read_reply(&mut lines, command).await?;
    if let Some(err) = reply.get("error") {
        return Err(VmmError::Refused {
            action: command.to_string(),
            message: err
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown QMP error")
                .to_string(),
        });
    }
    Ok(reply.get("return").cloned().unwrap_or(Value::Null))
}

/// Reads the next non-event message.
async fn read_reply(
    lines: &mut tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    what: &str,
) -> Result<Value, VmmError> {
    loop {
        let line = lines
            .next_line()
            .await?
            .ok_or_else(|| VmmError::Control(format!("QMP closed while waiting for {what}")))?;
        let v: Value =
            serde_json::from_str(&line).map_err(|e| VmmError::Control(format!("bad QMP message {line:?}: {e}")))?;
        if v.get("event").is_none() {
            return Ok(v);
        }
    }
}

/// Runs `command` with a file descriptor handed to QEMU first (`getfd` named `fdname`,
/// the descriptor passed with `SCM_RIGHTS`), on one connection: a jailed QEMU cannot
/// open the host's files itself, and fd names live as long as their connection.
pub async fn execute_with_fd(
    socket: &Path,
    fd: std::os::fd::OwnedFd,
    fdname: &str,
    command: &str,
    arguments: Value,
) -> Result<Value, VmmError> {
    let (socket, fdname, command) = (socket.to_path_buf(), fdname.to_string(), command.to_string());
    tokio::task::spawn_blocking(move || execute_with_fd_blocking(&socket, &fd, &fdname, &command, arguments))
        .await
        .map_err(|e| VmmError::Control(format!("QMP: {e}")))?
}

fn execute_with_fd_blocking(
    socket: &Path,
    fd: &std::os::fd::OwnedFd,
    fdname: &str,
    command: &str,
    arguments: Value,
) -> Result<Value, VmmError> {
    use std::io::{BufRead, Write};
    use std::os::fd::AsRawFd;
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let stream = loop {
        match std::os::unix::net::UnixStream::connect(socket) {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(VmmError::Control(format!("{}: {e}", socket.display()))),
        }
    };
    check_peer(socket, &stream)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut lines = std::io::BufReader::new(stream.try_clone()?).lines();
    let mut reply = |what: &str| -> Result<Value, VmmError> {
        loop {
            let line = lines
                .next()
                .ok_or_else(|| VmmError::Control(format!("QMP closed while waiting for {what}")))??;
            let v: Value =
                serde_json::from_str(&line).map_err(|e| VmmError::Control(format!("bad QMP message {line:?}: {e}")))?;
            if v.get("event").is_none() {
                if let Some(err) = v.get("error") {
                    return Err(VmmError::Refused {
                        action: what.to_string(),
                        message: err
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or("unknown QMP error")
                            .to_string(),
                    });
                }
                return Ok(v.get("return").cloned().unwrap_or(Value::Null));
            }
        }
    };
    reply("greeting")?;
    (&stream).write_all(b"{\"execute\":\"qmp_capabilities\"}\n")?;
    reply("qmp_capabilities")?;

    let getfd = format!("{}\n", json!({"execute": "getfd", "arguments": {"fdname": fdname}}));
    let mut iov = libc::iovec {
        iov_base: getfd.as_ptr() as *mut libc::c_void,
        iov_len: getfd.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    // u64s: aligned for a cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; every pointer set below outlives the sendmsg call,
    // and the control buffer is CMSG_SPACE bytes for one descriptor.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, fd.as_raw_fd());
        libc::sendmsg(stream.as_raw_fd(), &msg, 0)
    };
    if sent < 0 || sent as usize != getfd.len() {
        return Err(VmmError::Control(format!(
            "passing a descriptor to QEMU: {}",
            std::io::Error::last_os_error()
        )));
    }
    reply("getfd")?;
    let line = format!("{}\n", json!({"execute": command, "arguments": arguments}));
    (&stream).write_all(line.as_bytes())?;
    reply(command)
}

/// A jailed QEMU makes its QMP socket in a directory it may write: what answers there
/// must be a process of the VM's own user (a link it put in the socket's place could
/// point vmm-manager at another VM's QEMU). Without a jail record, anyone root trusts.
fn check_peer(socket: &Path, stream: &impl std::os::fd::AsRawFd) -> Result<(), VmmError> {
    let Some(dir) = socket.parent() else { return Ok(()) };
    let vm = crate::vm_dir::VmDir { dir: dir.to_path_buf() };
    if crate::jail::Jailer::info_of(&vm).is_none() {
        return Ok(());
    }
    if std::fs::symlink_metadata(socket).is_ok_and(|m| m.file_type().is_symlink()) {
        return Err(VmmError::Control(format!(
            "{} is a symbolic link, not the VMM's socket",
            socket.display()
        )));
    }
    crate::jail::Jailer::check_peer(&vm, stream).map_err(|e| VmmError::Control(format!("{}: {e}", socket.display())))
}
