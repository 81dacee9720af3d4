//! Requests to a database VM's guest agent, through vmm-manager's channel to it.

use std::time::Duration;

use guest_agent::{Request, Response};

use super::error::DatabaseError;
use super::record::DatabaseRecord;
use crate::daemons::upstream;
use crate::state::AppState;

/// Sends `request` and returns the agent's result.
pub async fn call(
    state: &AppState,
    rec: &DatabaseRecord,
    request: &Request,
    timeout: Duration,
) -> Result<serde_json::Value, DatabaseError> {
    let vm = rec.vm_id.as_deref().ok_or_else(|| DatabaseError::Busy {
        name: rec.name.clone(),
        phase: "without a VM".into(),
        action: "reach its agent",
    })?;
    let body = serde_json::to_value(request).map_err(|e| DatabaseError::Invalid(e.to_string()))?;
    let answer = state
        .vmm
        .agent(vm, &body, timeout)
        .await
        .map_err(|e| DatabaseError::Upstream(upstream(e).into()))?;
    let answer: Response = serde_json::from_value(answer).map_err(|e| DatabaseError::Agent {
        name: rec.name.clone(),
        reason: format!("unreadable answer: {e}"),
    })?;
    if answer.ok {
        Ok(answer.result)
    } else {
        Err(DatabaseError::Agent {
            name: rec.name.clone(),
            reason: answer.error.unwrap_or_else(|| "failed".into()),
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn vmm_manager_and_the_guest_agent_agree_on_the_channel() {
        assert_eq!(vmm_manager::spec::AGENT_SERIAL_PORT, guest_agent::SERIAL_PORT_NAME);
        assert_eq!(vmm_manager::spec::AGENT_VSOCK_PORT, guest_agent::VSOCK_PORT);
    }
}
