//! Console tickets: single-use, short-lived, bound to one VM, one key and one kind.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long a console ticket stays valid (`HEARTH_CONSOLE_TICKET_TTL_MS` shortens it for
/// tests; it is never longer).
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// What a ticket opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TicketKind {
    #[default]
    Serial,
    Vnc,
}

#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    pub(crate) vm: String,
    pub(crate) kind: TicketKind,
    pub(crate) write: bool,
    pub(crate) key_id: String,
    pub(crate) project: String,
    pub(crate) expires: Instant,
}

/// Outstanding console tickets, in memory: they live for seconds, and a restart of the
/// api simply makes clients ask again.
pub struct Tickets {
    open: Mutex<HashMap<String, Ticket>>,
    pub(crate) ttl: Duration,
}

impl Default for Tickets {
    fn default() -> Self {
        let ttl = std::env::var("HEARTH_CONSOLE_TICKET_TTL_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(Duration::from_millis)
            .map_or(TICKET_TTL, |t| t.min(TICKET_TTL));
        Self {
            open: Mutex::default(),
            ttl,
        }
    }
}

impl Tickets {
    pub(crate) fn issue(&self, ticket: Ticket) -> String {
        let token = crate::auth::keys::new_token();
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        open.retain(|_, t| t.expires > now);
        open.insert(token.clone(), ticket);
        token
    }

    /// Takes a ticket out (it works once, whatever happens next).
    pub(crate) fn redeem(&self, token: &str) -> Option<Ticket> {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).remove(token)
    }
}
