//! Wiring: the api's state, its router, and `--all-in-one`, which runs the api and all
//! four daemons in one process. Even then the api reaches each daemon through its Unix
//! socket, exactly as on a host where each daemon is its own systemd unit, so there is
//! one code path to test.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::{Json, Router};
use socket_http::{ApiError, UnixClient};
use tokio::sync::watch;
use vmm_manager::client::VmmClient;
use vmm_manager::HypervisorKind;

use crate::operations::Operations;
use crate::store::StateStore;
use crate::{auth, console, images, networks, store, vms, volumes};

/// The api's settings.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Holds the store, `admin.key`, and (all-in-one) the daemons' state.
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Where the daemons' sockets are.
    pub socket_dir: PathBuf,
    pub default_hypervisor: HypervisorKind,
    /// Where the desired state lives.
    pub store: store::StoreLocation,
}

impl ApiConfig {
    pub fn socket(&self, daemon: &str) -> PathBuf {
        self.socket_dir.join(format!("{daemon}.sock"))
    }
}

/// Settings of the daemons `--all-in-one` runs in-process.
#[derive(Debug, Clone)]
pub struct AllInOne {
    pub vmm: vmm_manager::VmmConfig,
    pub netd: netd::network::NetdConfig,
    pub blockd: blockd::BlockdConfig,
    /// Recipe outputs imaged imports on first use (`<dir>/<name>/image.json`).
    pub images_dir: PathBuf,
}

/// What every handler can reach.
pub struct AppState {
    pub config: ApiConfig,
    pub store: Arc<dyn StateStore>,
    pub ops: Operations,
    pub vmm: VmmClient,
    pub images: imaged::client::ImagedClient,
    pub netd: netd::http::client::NetdClient,
    pub blockd: blockd::http::client::BlockdClient,
    pub tickets: crate::console::Tickets,
    pub events: Arc<crate::events::Events>,
}

pub const DAEMONS: [&str; 4] = ["vmm-manager", "netd", "blockd", "imaged"];

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route(
            "/health/live",
            get(|| async { Json(serde_json::json!({"status": "ok"})) }),
        )
        .route("/health/ready", get(ready))
        .route("/metrics", get(crate::metrics::metrics))
        .route("/v1/vms", get(vms::list).post(vms::create))
        .route("/v1/vms/{id}", get(vms::show).delete(vms::delete))
        .route("/v1/vms/{id}/console", get(console::console))
        .route("/v1/vms/{id}/console/ticket", post(console::ticket))
        .route("/v1/vms/{id}/vnc", get(console::vnc))
        .route("/v1/images", get(images::list).post(images::import))
        .route("/v1/images/{name}", get(images::show).delete(images::delete))
        .route("/v1/keys", post(auth::create_key))
        .route("/", get(crate::web::index))
        .route("/assets/{*file}", get(crate::web::asset))
        .route("/v1/vms/{id}/console/log", get(vms::console_log))
        .route("/v1/vms/{id}/{action}", post(vms::action))
        .route("/v1/networks", get(networks::list).post(networks::create))
        .route("/v1/networks/{name}", get(networks::show).delete(networks::delete))
        .route("/v1/volumes", get(volumes::list).post(volumes::create))
        .route("/v1/volumes/{name}", get(volumes::show).delete(volumes::delete))
        .route("/v1/volumes/{name}/resize", post(volumes::resize))
        .route("/v1/volumes/{name}/snapshots", post(volumes::snapshot))
        .route(
            "/v1/volumes/{name}/snapshots/{snapshot}",
            axum::routing::delete(volumes::delete_snapshot),
        )
        .route("/v1/volumes/{name}/clone", post(volumes::clone))
        .route("/v1/volumes/{name}/attach", post(volumes::attach))
        .route("/v1/volumes/{name}/detach", post(volumes::detach))
        .route(
            "/v1/volumes/{name}/export",
            post(volumes::export).delete(volumes::unexport),
        )
        .route("/v1/events", get(crate::events::stream))
        .route("/v1/operations", get(vms::operations))
        .route("/v1/operations/{id}", get(vms::operation))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key))
        .with_state(state)
}

/// Whether each daemon answers its health endpoint (within 2 s).
pub async fn daemon_health(state: &AppState) -> Vec<(&'static str, bool)> {
    let mut out = Vec::new();
    for d in DAEMONS {
        let client = UnixClient::new(state.config.socket(d)).with_timeout(Duration::from_secs(2));
        out.push((d, client.get::<serde_json::Value>("/health").await.is_ok()));
    }
    out
}

/// Ready when every daemon answers its health endpoint.
async fn ready(
    axum::extract::State(state): axum::extract::State<Arc<AppState>>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let mut checks = serde_json::Map::new();
    let mut all_ok = true;
    for (d, ok) in daemon_health(&state).await {
        all_ok &= ok;
        checks.insert(d.to_string(), serde_json::json!(if ok { "ok" } else { "unreachable" }));
    }
    if all_ok {
        Ok(Json(serde_json::json!({"status": "ok", "daemons": checks})))
    } else {
        Err(ApiError::unavailable("some daemons are unreachable").with_details(serde_json::Value::Object(checks)))
    }
}

/// Opens the store, makes the admin key, and marks operations a previous run left
/// unfinished as failed (their tasks died with it).
pub async fn open_state(config: ApiConfig) -> anyhow::Result<Arc<AppState>> {
    std::fs::create_dir_all(&config.data_dir)?;
    let store = store::open(&config.store, &config.data_dir).await?;
    auth::ensure_admin_key(store.as_ref(), &config.data_dir).await?;
    let events = Arc::new(crate::events::Events::default());
    let ops = Operations::new(store.clone(), events.clone());
    for op in ops.list().await? {
        if op.status == crate::model::OperationStatus::Running {
            let mut done = op.clone();
            done.status = crate::model::OperationStatus::Failed;
            done.error = Some(ApiError::unavailable("the api restarted while this operation ran; retry it").body);
            done.updated_at_ms = vmm_manager::spec::now_ms();
            store
                .put(&format!("operations/{}", op.id), store::encode(&done))
                .await?;
        }
    }
    Ok(Arc::new(AppState {
        vmm: VmmClient::new(config.socket("vmm-manager")),
        images: imaged::client::ImagedClient::new(config.socket("imaged")),
        netd: netd::http::client::NetdClient::new(config.socket("netd")),
        blockd: blockd::http::client::BlockdClient::new(config.socket("blockd")),
        tickets: Default::default(),
        events,
        config,
        store,
        ops,
    }))
}

/// Runs the api (and with `all_in_one`, the daemons) until `shutdown` flips to true.
/// VMs keep running after it returns.
pub async fn run(
    config: ApiConfig,
    all_in_one: Option<AllInOne>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let stop = {
        let rx = shutdown.clone();
        move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    let mut daemons = tokio::task::JoinSet::new();
    if let Some(aio) = all_in_one {
        let vmm = vmm_manager::VmService::open(aio.vmm).await?;
        let routers = [
            ("vmm-manager", vmm_manager::http::router(vmm)),
            (
                "netd",
                netd::http::router(netd::network::NetworkService::open(aio.netd).await?),
            ),
            (
                "blockd",
                blockd::router(
                    blockd::Blockd::open(aio.blockd)
                        .await
                        .map_err(|e| anyhow::anyhow!("blockd: {e}"))?,
                ),
            ),
            (
                "imaged",
                imaged::router(
                    imaged::Imaged::open(imaged::ImagedConfig::new(&config.data_dir, Some(aio.images_dir)))
                        .map_err(|e| anyhow::anyhow!("imaged: {e}"))?,
                ),
            ),
        ];
        for (name, router) in routers {
            let path = config.socket(name);
            let listener = socket_http::server::bind_unix(&path).await?;
            let stop = stop();
            daemons.spawn(async move {
                let r = axum::serve(listener, router).with_graceful_shutdown(stop).await;
                let _ = std::fs::remove_file(&path);
                r
            });
        }
    }
    let state = open_state(config.clone()).await?;
    if let Err(e) = networks::ensure_default(&state).await {
        tracing::error!("cannot create the default network: {e}");
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "hearth-api serving");
    let app = router(state);
    let served = axum::serve(listener, app).with_graceful_shutdown(stop()).await;
    let _ = shutdown.wait_for(|s| *s).await;
    // Long-lived connections (console WebSockets) must not hold shutdown up for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while daemons.join_next().await.is_some() {}
    })
    .await;
    served?;
    Ok(())
}
