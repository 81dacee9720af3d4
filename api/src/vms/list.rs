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
use std::sync::{Arc, Mutex, OnceLock};

use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, StatusCode};
use vmm_manager::client::VmmClient;

use crate::hosts::error::HostError;
use crate::model::{Vm, VmRecord};
use crate::store::StateStore;
use crate::store::{self, PrefixVersion};
use crate::vms::error::VmError;
use crate::vms::live::LiveVms;

/// The VMs of `project` (of every project with `None`) from the store's records and
/// the live view, or vmm-manager itself when the view is not trusted. Also returns the
/// generation of the live view used, `None` when vmm-manager was asked directly.
/// What a listing reads: the VM records, vmm-manager's followed state, and vmm-manager
/// itself while that is not trusted.
#[derive(Clone, Copy)]
pub struct Sources<'a> {
    pub store: &'a dyn StateStore,
    pub live: &'a LiveVms,
    pub vmm: &'a VmmClient,
    /// For VMs on other hosts: their hosts' vmm-managers.
    pub remote: &'a dyn RemoteStates,
}

/// The VMs on other hosts and what a VM id's state is there (`Ok(None)`: its host's
/// vmm-manager does not know it), or why its host cannot be reached.
pub type RemoteVmStates = HashMap<String, Result<Option<vmm_manager::spec::VmStatus>, HostError>>;

/// What asks other hosts' vmm-managers (the api's state, in [`crate::hosts::daemons`]).
pub trait RemoteStates: Sync {
    /// The states of those of `records` that live on other hosts.
    fn remote_states<'a>(&'a self, records: &'a [VmRecord]) -> futures_util::future::BoxFuture<'a, RemoteVmStates>;
}

/// A VM whose host cannot be reached: `host_lost` (with the reason) when the host was
/// marked lost, else `unknown` saying why.
pub fn host_unreachable(mut vm: Vm, e: &HostError) -> Vm {
    if vm.state == "unknown" {
        vm.state = match e {
            HostError::Lost { .. } => "host_lost".into(),
            _ => "unknown".into(),
        };
        vm.reason = Some(e.to_string());
    }
    vm
}

pub async fn views(state: Sources<'_>, project: Option<&str>) -> Result<(Vec<Vm>, Option<u64>), VmError> {
    let records: Vec<VmRecord> = store::list_json(state.store, "vms/")
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
    let remote = state.remote.remote_states(&records).await;
    let mut vms: Vec<Vm> = records
        .iter()
        .map(|r| match remote.get(&r.id) {
            None => Vm::from_record(r, statuses.get(&r.id), reachable),
            Some(Ok(status)) => Vm::from_record(r, status.as_ref(), true),
            Some(Err(e)) => host_unreachable(Vm::from_record(r, None, false), e),
        })
        .collect();
    vms.sort_by(|a, b| a.name.cmp(&b.name));
    // Other hosts' VMs are not followed: such a listing is not cached.
    Ok((vms, generation.filter(|_| remote.is_empty())))
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
    pub async fn get(&self, state: Sources<'_>, project: &str) -> Result<Arc<Rendered>, VmError> {
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
        let json = Bytes::from(serde_json::to_vec(&vms).map_err(VmError::Render)?);
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
pub(crate) fn accepts_gzip(headers: &HeaderMap) -> bool {
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
