//! `GET /metrics` in Prometheus' text format (prometheus-client):
//! - `hearth_vms{state}`: VMs by the state the API shows;
//! - `hearth_operations_total{kind,status}` and `hearth_operation_duration_seconds{kind}`:
//!   finished operations and how long they took;
//! - `hearth_daemon_up{daemon}`: whether each daemon answers its health endpoint;
//! - `hearth_ipam_addresses{network,state}`: allocated and usable addresses;
//! - `hearth_volume_pool_bytes{state}`: the volume pool's size and use;
//! - `hearth_images`, `hearth_image_store_bytes`: the image cache;
//! - `hearth_database_up`, `_connections`, `_size_bytes`, `_transactions_committed`,
//!   `_transactions_rolled_back`, `_volume_used_bytes` `{project,database}`: each managed
//!   database, as its guest agent reports it at the scrape (0 and `up` 0 when it does
//!   not answer within 5 s).
//!
//! Counters and histograms live as long as the api process; gauges are read from the
//! store and the daemons at each scrape.

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use socket_http::ApiError;

use crate::operations::record::{labels, Labels};
use crate::state::AppState;

#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, description = "OpenMetrics text format (Prometheus scrapes it)", content_type = "application/openmetrics-text", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let mut reg = Registry::with_prefix("hearth");
    reg.register(
        "operations",
        "Operations finished, by kind and status",
        state.ops.metrics().finished.clone(),
    );
    reg.register(
        "operation_duration_seconds",
        "How long finished operations took, by kind",
        state.ops.metrics().duration.clone(),
    );

    let vms = Family::<Labels, Gauge>::default();
    let listed = crate::vms::list::views(state.vm_sources(), None)
        .await
        .map(|(vms, _)| vms)
        .unwrap_or_default();
    for state_name in [
        "creating", "deleting", "running", "stopped", "paused", "failed", "missing", "unknown",
    ] {
        vms.get_or_create(&labels(&[("state", state_name)])).set(0);
    }
    for vm in &listed {
        vms.get_or_create(&labels(&[("state", &vm.state)])).inc();
    }
    reg.register("vms", "VMs by state", vms);

    let up = Family::<Labels, Gauge>::default();
    for (d, ok) in state.daemon_health().await {
        up.get_or_create(&labels(&[("daemon", d)])).set(i64::from(ok));
    }
    reg.register("daemon_up", "1 when the daemon answers its health endpoint", up);

    let ipam = Family::<Labels, Gauge>::default();
    for n in state.netd.networks().await.unwrap_or_default() {
        let prefix = n.spec.subnet.prefix_len();
        // Network and broadcast addresses and the gateway are not for VMs.
        let usable = (1i64 << (32 - u32::from(prefix))).saturating_sub(3).max(0);
        ipam.get_or_create(&labels(&[("network", &n.spec.name), ("state", "allocated")]))
            .set(n.allocated as i64);
        ipam.get_or_create(&labels(&[("network", &n.spec.name), ("state", "usable")]))
            .set(usable);
    }
    reg.register(
        "ipam_addresses",
        "Addresses per network: allocated by IPAM and usable",
        ipam,
    );

    let pool = Family::<Labels, Gauge>::default();
    if let Ok(p) = state.blockd.pool().await {
        pool.get_or_create(&labels(&[("state", "total")]))
            .set(p.usage.total_bytes as i64);
        pool.get_or_create(&labels(&[("state", "used")]))
            .set(p.usage.total_bytes.saturating_sub(p.usage.free_bytes) as i64);
    }
    reg.register("volume_pool_bytes", "The volume pool's size and what is used", pool);

    let images = state.images.list().await.unwrap_or_default();
    let stored: Gauge = Gauge::default();
    stored.set(
        images
            .iter()
            .filter(|i| !i.catalog_only)
            .map(|i| i.stored_bytes as i64)
            .sum(),
    );
    let count: Gauge = Gauge::default();
    count.set(images.iter().filter(|i| !i.catalog_only).count() as i64);
    reg.register("images", "Image names in the store", count);
    reg.register("image_store_bytes", "Bytes the stored images take", stored);

    let pass = *state.reconciled.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(pass) = pass {
        let seconds = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        seconds.set(pass.seconds);
        reg.register(
            "reconcile_seconds",
            "How long the reconcile pass at start took",
            seconds,
        );
        for (name, help, value) in [
            (
                "reconcile_examined",
                "Records and daemon objects the reconcile pass at start looked at",
                pass.examined,
            ),
            (
                "reconcile_repairs",
                "What the reconcile pass at start changed",
                pass.repairs,
            ),
        ] {
            let g: Gauge = Gauge::default();
            g.set(value as i64);
            reg.register(name, help, g);
        }
    }

    let (passes, repairs): (Counter, Counter) = Default::default();
    passes.inc_by(state.drift.passes.load(std::sync::atomic::Ordering::Relaxed));
    repairs.inc_by(state.drift.repairs.load(std::sync::atomic::Ordering::Relaxed));
    reg.register(
        "reconcile_periodic_passes",
        "Reconcile passes while the api served",
        passes,
    );
    reg.register(
        "reconcile_periodic_repairs",
        "What the periodic reconcile passes changed (orphans removed, cut-short changes undone)",
        repairs,
    );

    let dbs = crate::databases::agent::scrape(&state).await;
    let per_db = |help: &'static str, name: &'static str, value: &dyn Fn(&serde_json::Value) -> i64| {
        let fam = Family::<Labels, Gauge>::default();
        for d in &dbs {
            let l = labels(&[("project", &d.rec.project), ("database", &d.rec.name)]);
            fam.get_or_create(&l).set(d.stats.as_ref().map_or(0, value));
        }
        (name, help, fam)
    };
    for (name, help, fam) in [
        per_db(
            "1 when the database's guest agent answers and PostgreSQL runs queries",
            "database_up",
            &|_| 1,
        ),
        per_db("Client connections", "database_connections", &|s| {
            s["connections"].as_i64().unwrap_or(0)
        }),
        per_db(
            "Bytes its databases take (pg_database_size)",
            "database_size_bytes",
            &|s| s["database_size_bytes"].as_i64().unwrap_or(0),
        ),
        per_db(
            "Transactions committed since the server's statistics began",
            "database_transactions_committed",
            &|s| s["xact_commit"].as_i64().unwrap_or(0),
        ),
        per_db("Transactions rolled back", "database_transactions_rolled_back", &|s| {
            s["xact_rollback"].as_i64().unwrap_or(0)
        }),
        per_db(
            "Bytes used on the data volume's file system",
            "database_volume_used_bytes",
            &|s| s["data"]["used_bytes"].as_i64().unwrap_or(0),
        ),
    ] {
        reg.register(name, help, fam);
    }

    let mut body = String::new();
    encode(&mut body, &reg).map_err(|e| ApiError::internal(format!("cannot encode metrics: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
