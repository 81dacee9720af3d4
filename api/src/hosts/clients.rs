//! Clients of a host's daemons, and the cache of other hosts' (what [`AppState`]
//! holds; [`super::daemons`] makes them).
//!
//! [`AppState`]: crate::state::AppState

use std::collections::BTreeMap;

/// The four daemons of one host, as clients.
#[derive(Clone)]
pub struct Daemons {
    pub vmm: vmm_manager::client::VmmClient,
    pub netd: netd::http::client::NetdClient,
    pub blockd: blockd::http::client::BlockdClient,
    pub images: imaged::client::ImagedClient,
}

/// Remote hosts' clients, kept per host and rebuilt when its record changes.
#[derive(Default)]
pub struct RemoteHosts {
    clients: std::sync::Mutex<BTreeMap<String, (u64, Daemons)>>,
}

impl RemoteHosts {
    /// The clients of `host` made from its record at `revision`, if kept.
    pub fn get(&self, host: &str, revision: u64) -> Option<Daemons> {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(host)
            .filter(|(r, _)| *r == revision)
            .map(|(_, d)| d.clone())
    }

    pub fn keep(&self, host: &str, revision: u64, daemons: Daemons) {
        self.clients
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(host.to_string(), (revision, daemons));
    }
}

/// This api's role in the cluster.
#[derive(Default)]
pub struct Presence {
    pub(super) leader: std::sync::atomic::AtomicBool,
}

impl Presence {
    /// Whether this api leads now.
    pub fn leads(&self) -> bool {
        self.leader.load(std::sync::atomic::Ordering::Relaxed)
    }
}
