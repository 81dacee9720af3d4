//! Failed authentications per client address, and the 429s past the limit.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed authentications per client address: after `limit` within [`FAILURE_WINDOW`],
/// further attempts from that address are refused with 429 until the window has passed.
pub struct AuthFailures {
    by_addr: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    limit: u32,
}

/// The default limit (`hearth-api --auth-failures-per-minute`).
pub const FAILURE_LIMIT: u32 = 10;

pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl AuthFailures {
    /// `limit` failures per minute and address; 0 turns the limit off.
    pub fn new(limit: u32) -> Self {
        Self {
            by_addr: Mutex::default(),
            limit,
        }
    }

    /// Seconds to wait when `addr` is over the limit.
    pub(crate) fn blocked(&self, addr: IpAddr) -> Option<u64> {
        let map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let (start, n) = map.get(&addr)?;
        let elapsed = start.elapsed();
        (self.limit > 0 && *n >= self.limit && elapsed < FAILURE_WINDOW)
            .then(|| (FAILURE_WINDOW - elapsed).as_secs().max(1))
    }

    pub(crate) fn record(&self, addr: IpAddr) {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (t, _)| t.elapsed() < FAILURE_WINDOW);
        }
        let e = map.entry(addr).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }
}
