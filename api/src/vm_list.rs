//! `GET /v1/vms` without redoing the work on every request.
//!
//! A listing joins two sources: the VM records in the store and the live state
//! vmm-manager reports. Both are followed instead of re-read:
//! - [`LiveVms`] keeps vmm-manager's state of every VM, filled by one `GET /vms` and then
//!   kept current by vmm-manager's event stream (`GET /events`). Each change carries a
//!   sequence number, so an event that arrives after a newer answer to one of the api's
//!   own calls (which it also records, [`LiveVms::observe`]) cannot take the state back.
//!   While the stream is down the view is not trusted and listings ask vmm-manager
//!   directly, as they did before.
//! - [`ListCache`] keeps each project's rendered JSON (and its gzip form, made on first
//!   demand) together with the store's [`PrefixVersion`] of `vms/` and the live view's
//!   generation it was made from. A request reads the version (an in-memory lookup on
//!   the embedded store, one keys-only range request on etcd, so a write by any api is
//!   seen at once) and serves the cached bytes when nothing changed.
//!
//! Responses carry an `ETag`; `If-None-Match` gives `304 Not Modified`, which is what a
//! polling client (the web console) mostly gets.

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use socket_http::ApiError;
use vmm_manager::client::VmmClient;
use vmm_manager::spec::{VmEvent, VmInfo, VmStatus};

use crate::model::{Vm, VmRecord};
use crate::server::AppState;
use crate::store::{self, PrefixVersion};

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

/// The VMs of `project` (of every project with `None`) from the store's records and
/// the live view, or vmm-manager itself when the view is not trusted. Also returns the
/// generation of the live view used, `None` when vmm-manager was asked directly.
pub async fn views(state: &AppState, project: Option<&str>) -> Result<(Vec<Vm>, Option<u64>), ApiError> {
    let records: Vec<VmRecord> = store::list_json(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .map(|(r, _)| r)
        .filter(|r: &VmRecord| project.is_none_or(|p| r.project == p))
        .collect();
    let (statuses, reachable, generation) = match state.live.snapshot() {
        Some(s) => (s.statuses, true, Some(s.generation)),
        None => match state.vmm.list().await {
            Ok(list) => (list.into_iter().map(|i| (i.spec.id, i.status)).collect(), true, None),
            Err(_) => (HashMap::new(), false, None),
        },
    };
    let mut vms: Vec<Vm> = records
        .iter()
        .map(|r| Vm::from_record(r, statuses.get(&r.id), reachable))
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    Ok((vms, generation))
}

/// One project's listing, rendered.
pub struct Rendered {
    version: PrefixVersion,
    generation: u64,
    json: Bytes,
    gzip: OnceLock<Bytes>,
    etag: Option<HeaderValue>,
}

/// Each project's last rendered listing.
pub struct ListCache {
    /// Makes ETags of different api processes differ (generations restart at 0).
    nonce: u64,
    rendered: Mutex<HashMap<String, Arc<Rendered>>>,
}

impl Default for ListCache {
    fn default() -> Self {
        Self {
            nonce: rand::random(),
            rendered: Mutex::default(),
        }
    }
}

impl ListCache {
    /// `project`'s listing, from the cache when neither the records nor the live
    /// state changed since it was rendered.
    pub async fn get(&self, state: &AppState, project: &str) -> Result<Arc<Rendered>, ApiError> {
        let version = state.store.prefix_version("vms/").await?;
        if let Some(generation) = state.live.generation() {
            let cached = self
                .rendered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(project)
                .filter(|r| r.version == version && r.generation == generation)
                .cloned();
            if let Some(r) = cached {
                return Ok(r);
            }
        }
        let (vms, generation) = views(state, Some(project)).await?;
        let json = Bytes::from(serde_json::to_vec(&vms).map_err(|e| ApiError::internal(e.to_string()))?);
        let rendered = Arc::new(Rendered {
            version,
            generation: generation.unwrap_or(0),
            json,
            gzip: OnceLock::new(),
            etag: generation.and_then(|g| {
                HeaderValue::from_str(&format!(
                    "\"{:x}-{}-{}-{g}\"",
                    self.nonce, version.count, version.revision
                ))
                .ok()
            }),
        });
        if generation.is_some() {
            self.rendered
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(project.to_string(), rendered.clone());
        }
        Ok(rendered)
    }
}

/// Whether `Accept-Encoding` accepts gzip (`gzip` or `*`, not with `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let coding = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q == 0.0)
            });
            (coding.eq_ignore_ascii_case("gzip") || coding == "*") && !refused
        })
}

impl Rendered {
    fn gzip(&self) -> &Bytes {
        self.gzip.get_or_init(|| {
            let mut enc =
                flate2::write::GzEncoder::new(Vec::with_capacity(self.json.len() / 8), flate2::Compression::fast());
            // Writing into a Vec cannot fail.
            let _ = enc.write_all(&self.json);
            Bytes::from(enc.finish().unwrap_or_default())
        })
    }

    /// The response to a request with `headers`: 304 when its `If-None-Match` names
    /// this listing, gzip when it accepts that, else plain JSON.
    pub fn respond(&self, headers: &HeaderMap) -> Response {
        let mut out = HeaderMap::new();
        out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        out.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
        out.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        if let Some(etag) = &self.etag {
            out.insert(header::ETAG, etag.clone());
            let matched = headers
                .get_all(header::IF_NONE_MATCH)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|t| t.trim() == "*" || t.trim().as_bytes() == etag.as_bytes());
            if matched {
                out.remove(header::CONTENT_TYPE);
                return (StatusCode::NOT_MODIFIED, out).into_response();
            }
        }
        if accepts_gzip(headers) {
            out.insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
            (out, self.gzip().clone()).into_response()
        } else {
            (out, self.json.clone()).into_response()
        }
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

    #[test]
    fn gzip_is_chosen_only_when_accepted() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::ACCEPT_ENCODING, HeaderValue::from_str(v).expect("header"));
            m
        };
        assert!(accepts_gzip(&h("gzip, deflate")));
        assert!(accepts_gzip(&h("br;q=1.0, gzip;q=0.8")));
        assert!(accepts_gzip(&h("*")));
        assert!(!accepts_gzip(&h("gzip;q=0")));
        assert!(!accepts_gzip(&h("identity")));
        assert!(!accepts_gzip(&HeaderMap::new()));
    }
}
