//! This api's part in the cluster: it registers its host, holds the host's lease
//! (`hosts-alive/<name>`, renewed every [`RENEW_EVERY`], lapsing after [`LEASE_TTL`]),
//! and competes for `leader`. The leader marks a host lost when its lease lapses: a
//! host is lost at most [`LEASE_TTL`] plus one renewal after its api last spoke.
//!
//! A lost host's api that comes back takes a lease again and registers, which clears
//! the mark. With the embedded store there is one host, and its api always leads.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use vmm_manager::spec::now_ms;

use super::error::HostError;
use super::record::{self, Alive, HostRecord, Leader, Lost};
use crate::daemons::upstream;
use crate::state::AppState;
use crate::store::{self, LeaseId};

/// How long a host's (and the leader's) lease lasts unrenewed.
pub const LEASE_TTL: Duration = Duration::from_secs(3);
/// How often the leases are renewed.
pub const RENEW_EVERY: Duration = Duration::from_secs(1);
/// Memory a host keeps for itself and hearth, out of what VMs may take.
pub const HOST_RESERVED_MIB: u64 = 512;

pub use super::clients::Presence;

/// Writes this host's record: what its daemons report now (capacity, versions), its
/// address and endpoints, and no lost mark. Keeps when it joined and whether it is
/// cordoned.
pub async fn register(state: &AppState) -> Result<HostRecord, HostError> {
    let me = &state.config.host;
    let facts = state.vmm.host().await.map_err(upstream)?;
    let pool = state.blockd.pool().await.map_err(upstream)?;
    let capacity = hearth_placement::Resources {
        vcpus: facts.cpus,
        memory_mib: facts.memory_mib,
        disk_bytes: pool.usage.total_bytes,
    };
    let allocatable = hearth_placement::Resources {
        vcpus: (f64::from(facts.cpus) * state.config.cpu_allocation_ratio).floor() as u32,
        memory_mib: facts.memory_mib.saturating_sub(HOST_RESERVED_MIB),
        disk_bytes: pool.usage.total_bytes,
    };
    let versions: std::collections::BTreeMap<String, String> = [
        ("hearth-api".to_string(), env!("CARGO_PKG_VERSION").to_string()),
        ("vmm-manager".to_string(), facts.version.clone()),
    ]
    .into_iter()
    .collect();
    let key = record::key(&me.name);
    for _ in 0..8 {
        let found = record::get(state.store.as_ref(), &me.name).await?;
        let now = now_ms();
        let rec = HostRecord {
            name: me.name.clone(),
            address: me.address,
            daemons: state.host_daemons.get().cloned().unwrap_or_default(),
            capacity,
            allocatable,
            disk_free_bytes: pool.usage.free_bytes,
            versions: versions.clone(),
            cordoned: found.as_ref().is_some_and(|(h, _)| h.cordoned),
            lost: None,
            joined_at_ms: found.as_ref().map_or(now, |(h, _)| h.joined_at_ms),
            registered_at_ms: now,
        };
        let was_lost = found.as_ref().and_then(|(h, _)| h.lost.clone());
        match state
            .store
            .compare_and_swap(&key, found.map(|(_, r)| r), store::encode(&rec))
            .await
        {
            Ok(_) => {
                if let Some(l) = was_lost {
                    tracing::warn!(host = %me.name, lost_since_ms = l.since_ms, "this host was lost and is back");
                    if let Err(e) = crate::networks::overlay::refresh_all(state).await {
                        tracing::error!("cannot bring this host back into the overlays: {e}");
                    }
                    state.events.emit(
                        "host",
                        "",
                        serde_json::json!({"name": me.name, "state": "ready", "was_lost": l}),
                    );
                }
                return Ok(rec);
            }
            Err(store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(HostError::Busy(me.name.clone()))
}

/// Takes this host's lease and registers the host (in that order: a leader that sees
/// the record also sees the lease, so it does not mark a starting host lost). The api
/// does this once before it serves, then [`hold`]s the lease.
pub async fn take_lease(state: &AppState) -> Result<LeaseId, HostError> {
    let lease = state.store.grant_lease(LEASE_TTL).await?;
    let alive = Alive {
        instance: state.instance.clone(),
        since_ms: now_ms(),
    };
    state
        .store
        .put_leased(
            &record::alive_key(&state.config.host.name),
            store::encode(&alive),
            lease,
            false,
        )
        .await?;
    register(state).await?;
    Ok(lease)
}

/// Holds this host's lease for as long as the api runs, taking it again (and
/// registering again) whenever it lapsed, and clearing a lost mark a leader set while
/// the lease was held (a leader that judged from an old view).
pub async fn hold(state: Arc<AppState>, first: LeaseId) {
    let mut held = Some(first);
    loop {
        let lease = match held.take() {
            Some(l) => l,
            None => match take_lease(&state).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!("cannot register this host: {e}");
                    tokio::time::sleep(RENEW_EVERY).await;
                    continue;
                }
            },
        };
        let mut tick = tokio::time::interval(RENEW_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match state.store.keep_alive(lease).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(host = %state.config.host.name, "this host's lease lapsed; taking it again");
                    break;
                }
                Err(e) => {
                    tracing::warn!("cannot renew this host's lease: {e}");
                    continue;
                }
            }
            if let Ok(Some((h, _))) = record::get(state.store.as_ref(), &state.config.host.name).await {
                if h.lost.is_some() {
                    if let Err(e) = register(&state).await {
                        tracing::warn!("cannot clear this host's lost mark: {e}");
                    }
                }
            }
        }
    }
}

/// Competes for `leader` for as long as the api runs; leads while it holds it.
pub async fn elect(state: Arc<AppState>) {
    loop {
        let won = async {
            let lease = state.store.grant_lease(LEASE_TTL).await?;
            let me = Leader {
                host: state.config.host.name.clone(),
                instance: state.instance.clone(),
                since_ms: now_ms(),
            };
            match state
                .store
                .put_leased(record::LEADER_KEY, store::encode(&me), lease, true)
                .await?
            {
                Some(_) => Ok::<_, HostError>(Some(lease)),
                None => {
                    state.store.revoke_lease(lease).await?;
                    Ok(None)
                }
            }
        }
        .await;
        match won {
            Ok(Some(lease)) => {
                tracing::info!(host = %state.config.host.name, "this api leads the cluster");
                state.presence.leader.store(true, Ordering::Relaxed);
                lead(&state, lease).await;
                state.presence.leader.store(false, Ordering::Relaxed);
                tracing::warn!(host = %state.config.host.name, "this api no longer leads the cluster");
            }
            Ok(None) => tokio::time::sleep(RENEW_EVERY).await,
            Err(e) => {
                tracing::debug!("cannot compete for leader: {e}");
                tokio::time::sleep(RENEW_EVERY).await;
            }
        }
    }
}

/// The leader's work until its lease lapses: every renewal, and at once when a host's
/// lease is seen to go, marks the hosts without a lease lost.
async fn lead(state: &AppState, lease: LeaseId) {
    let mut watch = state.store.watch();
    let mut tick = tokio::time::interval(RENEW_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                match state.store.keep_alive(lease).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!("cannot renew the leader's lease: {e}"),
                }
            }
            ev = watch.recv() => match ev {
                Ok(ev) if ev.key.starts_with(record::ALIVE_PREFIX) && ev.value.is_none() => {}
                Ok(_) => continue,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
        }
        if let Err(e) = sweep(state).await {
            tracing::warn!("cannot look for lost hosts: {e}");
        }
    }
}

/// Marks every registered host that holds no lease lost (once).
async fn sweep(state: &AppState) -> Result<(), HostError> {
    let alive = record::alive(state.store.as_ref()).await?;
    for host in record::list(state.store.as_ref()).await? {
        // This api's own host is alive: it is running this.
        if host.lost.is_some() || alive.contains(&host.name) || host.name == state.config.host.name {
            continue;
        }
        let since_ms = now_ms();
        let reason = format!("its lease lapsed: no word from its api for {} s", LEASE_TTL.as_secs());
        let marked = store::update_json::<HostRecord>(state.store.as_ref(), &record::key(&host.name), |h| {
            if h.lost.is_some() {
                return false;
            }
            h.lost = Some(Lost {
                since_ms,
                reason: reason.clone(),
            });
            true
        })
        .await?;
        if !marked {
            continue;
        }
        // It may have come back between the look and the mark: then its api clears it.
        tracing::warn!(host = %host.name, "host lost: {reason}");
        // Fenced: the other hosts' overlays drop it.
        if let Err(e) = crate::networks::overlay::refresh_all(state).await {
            tracing::error!(host = %host.name, "cannot take the lost host out of the overlays: {e}");
        }
        // Then what kept nothing on it runs elsewhere.
        crate::hosts::evacuate::restart_elsewhere(state, &host.name).await;
        state.events.emit(
            "host",
            "",
            serde_json::json!({"name": host.name, "state": "lost", "reason": reason, "since_ms": since_ms}),
        );
    }
    Ok(())
}
