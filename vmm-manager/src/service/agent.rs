//! The guest agent's control channel, as vmm-manager carries it: one JSON request line
//! out, the line with the same `id` back. Under QEMU the VM directory's `agent.sock` is
//! a virtio-serial port's chardev (one client at a time, so requests to one VM take
//! turns); under Cloud Hypervisor it is the vsock device's socket, where the host says
//! `CONNECT <port>` first. The request is opaque here: the api and the agent agree on it.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::{ServiceError, VmService};
use crate::spec::{HypervisorKind, VmState, AGENT_VSOCK_PORT};

fn channel_error(id: &str, what: impl std::fmt::Display) -> ServiceError {
    ServiceError::Agent(format!("VM {id}'s guest agent: {what}"))
}

impl VmService {
    /// Sends `request` (a JSON object) to the VM's guest agent and returns its answer.
    pub async fn agent(&self, id: &str, mut request: Value, timeout: Duration) -> Result<Value, ServiceError> {
        let vm = self.vm(id)?;
        if !vm.spec.agent_channel {
            return Err(ServiceError::State {
                id: id.to_string(),
                state: "without an agent channel",
                action: "talk to a guest agent",
            });
        }
        let state = super::lock(&vm.status).state;
        if state != VmState::Running {
            return Err(ServiceError::State {
                id: id.to_string(),
                state: state.as_str(),
                action: "talk to its guest agent",
            });
        }
        // One conversation per VM at a time (QEMU's chardev takes one client).
        let _turn = vm.agent.lock().await;
        let seq = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        request["id"] = Value::from(seq);
        let line = format!("{request}\n");
        let talk = async {
            let stream = tokio::net::UnixStream::connect(vm.dir.agent_socket())
                .await
                .map_err(|e| channel_error(id, format!("cannot connect: {e}")))?;
            crate::jail::Jailer::check_peer(&vm.dir, &stream).map_err(|e| channel_error(id, e))?;
            let (read, mut write) = stream.into_split();
            let mut read = BufReader::new(read);
            let mut answer = String::new();
            if vm.spec.hypervisor == HypervisorKind::CloudHypervisor {
                write
                    .write_all(format!("CONNECT {AGENT_VSOCK_PORT}\n").as_bytes())
                    .await
                    .map_err(|e| channel_error(id, e))?;
                read.read_line(&mut answer).await.map_err(|e| channel_error(id, e))?;
                if !answer.starts_with("OK ") {
                    return Err(channel_error(id, "the agent is not listening (vsock refused)"));
                }
            }
            write
                .write_all(line.as_bytes())
                .await
                .map_err(|e| channel_error(id, e))?;
            loop {
                answer.clear();
                if read.read_line(&mut answer).await.map_err(|e| channel_error(id, e))? == 0 {
                    return Err(channel_error(id, "the channel closed before an answer"));
                }
                // A late answer to an earlier, abandoned request is skipped.
                match serde_json::from_str::<Value>(answer.trim()) {
                    Ok(v) if v["id"].as_u64() == Some(seq) => return Ok(v),
                    _ => continue,
                }
            }
        };
        match tokio::time::timeout(timeout, talk).await {
            Ok(r) => r,
            Err(_) => Err(channel_error(
                id,
                format!("no answer within {} s (is the agent running?)", timeout.as_secs()),
            )),
        }
    }
}
