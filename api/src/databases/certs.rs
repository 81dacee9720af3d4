//! Renewing servers' certificates before they expire: a task that looks, soon after the
//! api starts and then every hour, for ready databases whose certificate ends within
//! [`RENEW_BEFORE_DAYS`], and gives each a new one ([`super::change::rotate_certificate`]:
//! the seed, then a reload in the running server; no restart).

use std::sync::Arc;
use std::time::Duration;

use super::record::{DatabaseRecord, DbPhase};
use crate::state::AppState;

/// A certificate is renewed this long before it expires.
pub const RENEW_BEFORE_DAYS: u64 = 30;
/// The first look, after the api starts (the VMs it found settle first).
const FIRST_LOOK: Duration = Duration::from_secs(20);
const EVERY: Duration = Duration::from_secs(3600);

/// Whether `rec`'s certificate is due for renewal at `now_ms`.
pub fn due(rec: &DatabaseRecord, now_ms: u64) -> bool {
    rec.phase == DbPhase::Ready && rec.cert_expires_ms().saturating_sub(now_ms) < RENEW_BEFORE_DAYS * 86_400_000
}

/// Renews every due certificate, for ever. A database whose VM does not run gets
/// its new certificate in its seed (it serves it from its next boot).
pub async fn renew_periodically(state: Arc<AppState>) {
    tokio::time::sleep(FIRST_LOOK).await;
    loop {
        renew_due(&state).await;
        tokio::time::sleep(EVERY).await;
    }
}

async fn renew_due(state: &AppState) {
    let records = match super::record::list_all(state).await {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("cannot list databases for certificate renewal: {e}");
            return;
        }
    };
    let now = vmm_manager::spec::now_ms();
    for (rec, rev) in records.into_iter().filter(|(r, _)| due(r, now)) {
        let (project, name, expires) = (rec.project.clone(), rec.name.clone(), rec.cert_expires_ms());
        match super::change::rotate_certificate(state, rec, rev).await {
            Ok(db) => tracing::info!(
                project,
                name,
                old_expiry_ms = expires,
                new_expiry_ms = db.certificate_expires_at_ms,
                "renewed a database's server certificate"
            ),
            Err(e) => tracing::warn!(project, name, "cannot renew a database's server certificate: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(expires_ms: u64) -> DatabaseRecord {
        serde_json::from_value(serde_json::json!({
            "id": "i", "name": "n", "project": "p", "version": "15", "vcpus": 1,
            "memory_mib": 512, "storage_bytes": 1, "network": "default",
            "allowed_cidrs": [], "extensions": [], "parameters": {}, "hypervisor": null,
            "phase": "ready", "vm_name": "db-n", "volume": "db-n-data",
            "password_verifier": "v", "generation": 1, "created_at_ms": 0,
            "cert_not_after_ms": expires_ms,
        }))
        .expect("record")
    }

    #[test]
    fn a_certificate_is_renewed_within_thirty_days_of_its_end() {
        let day = 86_400_000;
        let now = 1000 * day;
        assert!(!due(&rec(now + 31 * day), now));
        assert!(due(&rec(now + 29 * day), now));
        assert!(due(&rec(now - day), now), "an expired one too");
        let mut creating = rec(now);
        creating.phase = DbPhase::Creating;
        assert!(!due(&creating, now), "only ready databases");
        // A record from before renewal: a year from its creation.
        let mut old = rec(0);
        old.cert_not_after_ms = None;
        old.created_at_ms = now - 340 * day;
        assert!(due(&old, now));
        old.created_at_ms = now - 300 * day;
        assert!(!due(&old, now));
    }
}
