//! The bus events are published on and subscribed to (see [`crate::events`]).

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

/// One event.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Event {
    /// Increases by one per event of this api process.
    pub seq: u64,
    pub at_ms: u64,
    /// `operation`, `vm`, `database` or `audit`.
    pub kind: String,
    pub project: String,
    pub data: serde_json::Value,
}

/// The api's event bus.
pub struct Events {
    tx: broadcast::Sender<Event>,
    seq: AtomicU64,
}

impl Default for Events {
    fn default() -> Self {
        Events {
            tx: broadcast::channel(4096).0,
            seq: AtomicU64::new(0),
        }
    }
}

impl Events {
    pub fn emit(&self, kind: &str, project: &str, data: serde_json::Value) {
        let ev = Event {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            at_ms: vmm_manager::spec::now_ms(),
            kind: kind.to_string(),
            project: project.to_string(),
            data,
        };
        // No subscriber is fine: events are for whoever listens now.
        let _ = self.tx.send(ev);
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
