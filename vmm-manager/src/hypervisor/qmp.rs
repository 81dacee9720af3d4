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

async fn execute_inner(socket: &Path, command: &str, arguments: Option<Value>) -> Result<Value, VmmError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| VmmError::Control(format!("{}: {e}", socket.display())))?;
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
