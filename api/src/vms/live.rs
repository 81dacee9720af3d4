//! vmm-manager's state of every VM, followed through its event stream (see
//! [`crate::vms::http::list`] for how listings use it).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use vmm_manager::client::VmmClient;
use vmm_manager::spec::{VmEvent, VmInfo, VmStatus};

/// vmm-manager's state of every VM, as last reported.
#[derive(Default)]
pub struct LiveVms {
    inner: RwLock<Live>,
}

#[derive(Default)]
struct Live {
    /// Whether the event stream is connected and the list was read after it was.
    synced: bool,
    /// Grows with every change of what [`LiveVms::snapshot`] would return.
    generation: u64,
    /// VM id → (sequence number of the last change, state; `None` once deleted).
    vms: HashMap<String, (u64, Option<VmStatus>)>,
}

/// The states of the VMs vmm-manager knows, with the generation they belong to.
pub struct Snapshot {
    pub generation: u64,
    pub statuses: HashMap<String, VmStatus>,
}

impl LiveVms {
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Live> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Live> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    /// The generation of the view, `None` while it is not trusted.
    pub fn generation(&self) -> Option<u64> {
        let live = self.read();
        live.synced.then_some(live.generation)
    }

    /// Every VM's state, `None` while the view is not trusted.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let live = self.read();
        live.synced.then(|| Snapshot {
            generation: live.generation,
            statuses: live
                .vms
                .iter()
                .filter_map(|(id, (_, s))| s.clone().map(|s| (id.clone(), s)))
                .collect(),
        })
    }

    /// Records a VM's state from an answer of vmm-manager to one of the api's calls.
    pub fn observe(&self, info: &VmInfo) {
        self.apply(&info.spec.id, info.status.seq, Some(info.status.clone()));
    }

    fn apply(&self, id: &str, seq: u64, status: Option<VmStatus>) {
        let mut live = self.write();
        let newer = live.vms.get(id).is_none_or(|(known, _)| seq > *known);
        if newer {
            live.vms.insert(id.to_string(), (seq, status));
            live.generation += 1;
        }
    }

    fn apply_event(&self, ev: VmEvent) {
        let status = ev.state.map(|state| VmStatus {
            state,
            reason: ev.reason,
            pid: ev.pid,
            since_ms: ev.at_ms,
            seq: ev.seq,
            jail: ev.jail,
        });
        self.apply(&ev.vm_id, ev.seq, status);
    }

    /// Starts over from a full list (read after subscribing to the events).
    fn replace(&self, infos: Vec<VmInfo>) {
        let mut live = self.write();
        live.vms = infos
            .into_iter()
            .map(|i| (i.spec.id, (i.status.seq, Some(i.status))))
            .collect();
        live.synced = true;
        live.generation += 1;
    }

    fn lost(&self) {
        let mut live = self.write();
        if live.synced {
            live.synced = false;
            live.generation += 1;
        }
    }
}

/// How long the event stream may stay silent: vmm-manager sends a keep-alive every
/// 15 s, so a longer silence means it is stuck, and the view is not trusted.
const IDLE: Duration = Duration::from_secs(45);

/// Keeps `live` current for as long as the api runs: subscribes to vmm-manager's events,
/// reads the full list, applies events until the stream ends, and starts again (after
/// 50 ms, doubling to 1 s while vmm-manager stays away).
pub async fn follow(vmm: VmmClient, live: Arc<LiveVms>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok(mut events) = vmm.events().await.map(|e| e.with_idle_timeout(IDLE)) {
            if let Ok(list) = vmm.list().await {
                live.replace(list);
                let since = std::time::Instant::now();
                while let Some(Ok(ev)) = events.next().await {
                    live.apply_event(ev);
                }
                tracing::debug!("vmm-manager's event stream ended; listing again");
                // A stream that ends at once (vmm-manager shutting down) is not a
                // reason to list again every 50 ms.
                if since.elapsed() > Duration::from_secs(1) {
                    backoff = Duration::from_millis(50);
                }
            }
        }
        live.lost();
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_manager::spec::VmState;

    fn status(state: VmState, seq: u64) -> VmStatus {
        VmStatus {
            state,
            reason: None,
            pid: None,
            since_ms: 0,
            seq,
            jail: None,
        }
    }

    #[test]
    fn an_older_change_never_replaces_a_newer_one() {
        let live = LiveVms::default();
        assert!(live.snapshot().is_none(), "not trusted before the first list");
        live.replace(vec![]);
        let g0 = live.generation().expect("synced");
        live.apply("a", 10, Some(status(VmState::Running, 10)));
        live.apply("a", 9, Some(status(VmState::Starting, 9)));
        let snap = live.snapshot().expect("synced");
        assert_eq!(snap.statuses["a"].state, VmState::Running);
        assert_eq!(snap.generation, g0 + 1, "the stale change did not count");
        live.apply("a", 11, None);
        assert!(!live.snapshot().expect("synced").statuses.contains_key("a"));
        live.apply("a", 10, Some(status(VmState::Running, 10)));
        assert!(
            !live.snapshot().expect("synced").statuses.contains_key("a"),
            "a late event does not bring a deleted VM back"
        );
        live.lost();
        assert!(live.generation().is_none());
    }
}
