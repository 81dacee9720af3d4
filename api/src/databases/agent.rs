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

/// What `/metrics` shows of one database: its agent's `stats`, or why there are none.
pub struct Scraped {
    pub rec: DatabaseRecord,
    /// `None`: the agent did not answer (or the database is not running).
    pub stats: Option<serde_json::Value>,
}

/// Every ready database's statistics, asked of the agents at once (5 s each at most).
pub async fn scrape(state: &AppState) -> Vec<Scraped> {
    let records: Vec<DatabaseRecord> = super::record::list_all(state)
        .await
        .map(|v| v.into_iter().map(|(r, _)| r).collect())
        .unwrap_or_default();
    let asks = records.into_iter().map(|rec| async move {
        let stats = if rec.phase == super::record::DbPhase::Ready {
            call(state, &rec, &Request::Stats, Duration::from_secs(5)).await.ok()
        } else {
            None
        };
        Scraped { rec, stats }
    });
    futures_util::future::join_all(asks).await
}

#[cfg(test)]
mod tests {
    #[test]
    fn vmm_manager_and_the_guest_agent_agree_on_the_channel() {
        assert_eq!(vmm_manager::spec::AGENT_SERIAL_PORT, guest_agent::SERIAL_PORT_NAME);
        assert_eq!(vmm_manager::spec::AGENT_VSOCK_PORT, guest_agent::VSOCK_PORT);
    }
}
