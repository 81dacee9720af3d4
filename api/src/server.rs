//! Wiring: the api's state, its router, and `--all-in-one`, which runs the api and all
//! four daemons in one process. Even then the api reaches each daemon through its Unix
//! socket, exactly as on a host where each daemon is its own systemd unit, so there is
//! one code path to test.

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use axum::{Json, Router};
use socket_http::ApiError;
use tokio::sync::watch;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::permissions::{self, RouteTable};
use crate::state::{open_state, AllInOne, ApiConfig, AppState};
use crate::{auth, console, databases, identity, images, networks, vms, volumes};

pub fn router(state: Arc<AppState>) -> Router {
    let (router, doc) = api_router().split_for_parts();
    let mut routes = RouteTable::from_document(&doc);
    // Routes outside the document: the document itself and the web console's files.
    for path in ["/openapi.json", "/", "/assets/{*file}"] {
        routes.insert(http::Method::GET, path, permissions::Permission::Public);
    }
    let doc = Arc::new(crate::openapi::document_json(&doc));
    router
        .route(
            "/openapi.json",
            get(move || {
                let doc = doc.clone();
                async move { ([(http::header::CONTENT_TYPE, "application/json")], doc.as_ref().clone()) }
            }),
        )
        .route("/", get(crate::web::index))
        .route("/assets/{*file}", get(crate::web::asset))
        .fallback(|| async { ApiError::not_found("no such route") })
        // Layers run outside in: authentication first, then idempotency keys.
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::idempotency::layer,
        ))
        .layer(axum::middleware::from_fn_with_state(
            (state.clone(), Arc::new(routes)),
            auth::middleware::require_key,
        ))
        .with_state(state)
}

/// Every documented route with the permission it needs (see [`permissions`]), and the
/// document they make.
fn api_router() -> OpenApiRouter<Arc<AppState>> {
    use permissions::*;
    OpenApiRouter::with_openapi(crate::openapi::ApiDoc::openapi())
        .routes(permit(Permission::Public, routes!(live)))
        .routes(permit(Permission::Public, routes!(ready)))
        .routes(permit(METRICS_READ, routes!(crate::metrics::metrics)))
        .routes(permit(HOSTS_READ, routes!(crate::hosts::http::list)))
        .routes(permit(HOSTS_READ, routes!(crate::hosts::http::show)))
        .routes(permit(HOSTS_WRITE, routes!(crate::hosts::http::action)))
        .routes(permit(HOSTS_WRITE, routes!(crate::hosts::http::delete)))
        .routes(permit(HOSTS_WRITE, routes!(crate::hosts::http::join_token)))
        .routes(permit(Permission::Public, routes!(crate::hosts::http::join)))
        .routes(permit(VMS_READ, routes!(vms::http::list)))
        .routes(permit(VMS_WRITE, routes!(vms::http::create)))
        .routes(permit(VMS_READ, routes!(vms::http::show)))
        .routes(permit(VMS_WRITE, routes!(vms::http::delete)))
        .routes(permit(VMS_WRITE, routes!(vms::http::resize)))
        .routes(permit(VMS_WRITE, routes!(vms::http::create_snapshot)))
        .routes(permit(VMS_READ, routes!(vms::http::snapshots)))
        .routes(permit(VMS_WRITE, routes!(vms::http::delete_snapshot)))
        .routes(permit(VMS_WRITE, routes!(vms::http::restore)))
        .routes(permit(VMS_WRITE, routes!(vms::http::action)))
        .routes(permit(CONSOLES_READ, routes!(vms::http::console_log)))
        .routes(permit(CONSOLES_READ, routes!(console::http::console)))
        .routes(permit(CONSOLES_READ, routes!(console::http::ticket)))
        .routes(permit(CONSOLES_READ, routes!(console::http::vnc)))
        .routes(permit(IMAGES_READ, routes!(images::http::list)))
        .routes(permit(IMAGES_WRITE, routes!(images::http::import)))
        .routes(permit(IMAGES_READ, routes!(images::http::show)))
        .routes(permit(IMAGES_WRITE, routes!(images::http::delete)))
        .routes(permit(PROJECTS_READ, routes!(identity::http::list_projects)))
        .routes(permit(PROJECTS_WRITE, routes!(identity::http::create_project)))
        .routes(permit(PROJECTS_READ, routes!(identity::http::show_project)))
        .routes(permit(PROJECTS_WRITE, routes!(identity::http::delete_project)))
        .routes(permit(MEMBERS_READ, routes!(identity::http::list_members)))
        .routes(permit(MEMBERS_WRITE, routes!(identity::http::set_member)))
        .routes(permit(MEMBERS_WRITE, routes!(identity::http::remove_member)))
        .routes(permit(USERS_READ, routes!(identity::http::list_users)))
        .routes(permit(USERS_WRITE, routes!(identity::http::create_user)))
        .routes(permit(USERS_WRITE, routes!(identity::http::delete_user)))
        .routes(permit(API_KEYS, routes!(identity::http::list_keys)))
        .routes(permit(API_KEYS, routes!(identity::http::create_key)))
        .routes(permit(API_KEYS, routes!(identity::http::revoke_key)))
        .routes(permit(DATABASES_READ, routes!(databases::http::list)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::create)))
        .routes(permit(DATABASES_READ, routes!(databases::http::show)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::update)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::delete)))
        .routes(permit(DATABASES_READ, routes!(databases::http::ca_pem)))
        .routes(permit(DATABASES_READ, routes!(databases::http::logs)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::reset_password)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::rotate_certificate)))
        .routes(permit(DATABASES_WRITE, routes!(databases::http::action)))
        .routes(permit(NETWORKS_READ, routes!(networks::http::list)))
        .routes(permit(NETWORKS_WRITE, routes!(networks::http::create)))
        .routes(permit(NETWORKS_READ, routes!(networks::http::show)))
        .routes(permit(NETWORKS_WRITE, routes!(networks::http::delete)))
        .routes(permit(VOLUMES_READ, routes!(volumes::http::list)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::create)))
        .routes(permit(VOLUMES_READ, routes!(volumes::http::show)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::delete)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::resize)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::snapshot)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::delete_snapshot)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::clone)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::attach)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::detach)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::export)))
        .routes(permit(VOLUMES_WRITE, routes!(volumes::http::unexport)))
        .routes(permit(EVENTS_READ, routes!(crate::events::http::stream)))
        .routes(permit(OPERATIONS_READ, routes!(crate::operations::http::operations)))
        .routes(permit(OPERATIONS_READ, routes!(crate::operations::http::operation)))
}

/// The OpenAPI document, as `GET /openapi.json` serves it.
pub fn openapi_document() -> String {
    crate::openapi::document_json(&api_router().into_openapi())
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct Live {
    /// Always `ok`.
    status: String,
}

/// The api process answers.
#[utoipa::path(get, path = "/health/live", tag = "system", responses((status = 200, body = Live)))]
async fn live() -> Json<Live> {
    Json(Live { status: "ok".into() })
}

/// Every daemon's health, as `GET /health/ready` reports it.
#[derive(serde::Serialize, utoipa::ToSchema)]
struct Ready {
    status: String,
    /// `ok` or `unreachable`, per daemon.
    daemons: std::collections::BTreeMap<String, String>,
    /// How VMMs are jailed: `on`, or a sentence starting `INSECURE` when jailing was
    /// turned off (`--insecure-no-jail`).
    #[serde(skip_serializing_if = "Option::is_none")]
    vmm_jail: Option<String>,
}

/// Ready when every daemon answers its health endpoint.
#[utoipa::path(get, path = "/health/ready", tag = "system",
    responses((status = 200, body = Ready), (status = 503, description = "Some daemons are unreachable; details name them", body = crate::openapi::ErrorResponse)))]
async fn ready(axum::extract::State(state): axum::extract::State<Arc<AppState>>) -> Result<Json<Ready>, ApiError> {
    let mut daemons = std::collections::BTreeMap::new();
    let mut all_ok = true;
    for (d, ok) in state.daemon_health().await {
        all_ok &= ok;
        daemons.insert(d.to_string(), if ok { "ok" } else { "unreachable" }.to_string());
    }
    if all_ok {
        let vmm_jail =
            state.vmm.host().await.ok().and_then(|h| h.jail).map(
                |j| {
                    if j.enabled {
                        "on".to_string()
                    } else {
                        j.summary
                    }
                },
            );
        Ok(Json(Ready {
            status: "ok".into(),
            daemons,
            vmm_jail,
        }))
    } else {
        Err(ApiError::unavailable("some daemons are unreachable").with_details(serde_json::json!(daemons)))
    }
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
    // With --host-address, the routers are served over TLS too, once the store (which
    // holds the cluster's CA) is open.
    let mut tls_routers = Vec::new();
    if let Some(aio) = all_in_one {
        let vmm = vmm_manager::VmService::open(aio.vmm).await?;
        {
            let (vmm, stop) = (vmm.clone(), stop());
            tokio::spawn(async move {
                stop.await;
                vmm.close_streams();
            });
        }
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
            if config.host.address.is_some() {
                tls_routers.push((name, router.clone()));
            }
            let path = config.socket(name);
            let listener = socket_http::server::bind_unix(&path).await?;
            let stop = stop();
            let router = socket_http::server::run_to_completion(router);
            daemons.spawn(async move {
                let r = axum::serve(listener, router).with_graceful_shutdown(stop).await;
                let _ = std::fs::remove_file(&path);
                r
            });
        }
    }
    let state = open_state(config.clone()).await?;
    if let Some(address) = config.host.address.filter(|_| !tls_routers.is_empty()) {
        let endpoints =
            crate::hosts::daemons::serve_tls(&state, address, config.host.daemon_port, tls_routers, shutdown.clone())
                .await?;
        tracing::info!(?endpoints, "daemons served to other hosts over TLS");
        let _ = state.host_daemons.set(endpoints);
    }
    let following = tokio::spawn(crate::vms::live::follow(state.vmm.clone(), state.live.clone()));
    networks::migrate(&state).await?;
    // Before serving: repair what a crash of the previous process left half done.
    let started = std::time::Instant::now();
    let reconciled = crate::reconcile::pass::reconcile(&state).await;
    crate::reconcile::pass::settle_interrupted(&state, reconciled.as_ref().ok()).await;
    match reconciled {
        Ok(r) => {
            let pass = crate::reconcile::report::Pass {
                seconds: started.elapsed().as_secs_f64(),
                examined: r.examined,
                repairs: r.repairs(),
            };
            *state.reconciled.lock().unwrap_or_else(|p| p.into_inner()) = Some(pass);
            if r.is_empty() {
                tracing::info!(
                    examined = r.examined,
                    ms = pass.seconds * 1000.0,
                    "reconciled: nothing to repair"
                );
            } else {
                tracing::warn!(examined = r.examined, ms = pass.seconds * 1000.0, report = %serde_json::to_string(&r).unwrap_or_default(), "reconciled after a restart");
            }
        }
        Err(e) => tracing::error!("reconciling failed: {e}"),
    }
    if let Err(e) = networks::ensure_default(&state).await {
        tracing::error!("cannot create the default network: {e}");
    }
    let renewing = tokio::spawn(crate::databases::certs::renew_periodically(state.clone()));
    // This host in the cluster: registered (and its lease taken) before the api serves,
    // so the scheduler knows it from the first request.
    crate::hosts::join::check_admitted(&state).await?;
    let lease = crate::hosts::presence::take_lease(&state).await?;
    let presence = [
        tokio::spawn(crate::hosts::presence::hold(state.clone(), lease)),
        tokio::spawn(crate::hosts::presence::elect(state.clone())),
    ];
    let periodic = (!config.reconcile_interval.is_zero()).then(|| {
        tokio::spawn(crate::reconcile::pass::periodically(
            state.clone(),
            config.reconcile_interval,
        ))
    });
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    tracing::info!(listen = %listener.local_addr()?, data_dir = %config.data_dir.display(), "hearth-api serving");
    // A request the api accepted runs to its end even if its client hangs up.
    let app = socket_http::server::run_to_completion(router(state));
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(stop())
    .await;
    let _ = shutdown.wait_for(|s| *s).await;
    following.abort();
    renewing.abort();
    for p in presence {
        p.abort();
    }
    if let Some(p) = periodic {
        p.abort();
    }
    // Long-lived connections (console WebSockets) must not hold shutdown up for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while daemons.join_next().await.is_some() {}
    })
    .await;
    served?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_documented_operation_declares_a_known_permission() {
        let doc = api_router().into_openapi();
        let table = RouteTable::from_document(&doc);
        let operations: usize = doc
            .paths
            .paths
            .values()
            .map(|i| {
                [&i.get, &i.post, &i.put, &i.delete, &i.patch]
                    .iter()
                    .filter(|o| o.is_some())
                    .count()
            })
            .sum();
        assert_eq!(table.len(), operations);
        assert_eq!(
            table.need(&http::Method::POST, Some("/v1/vms/{id}/{action}")),
            permissions::VMS_WRITE
        );
        assert_eq!(
            table.need(&http::Method::GET, Some("/health/live")),
            permissions::Permission::Public
        );
    }

    /// A handler for the test below.
    #[utoipa::path(get, path = "/v1/forgotten", responses((status = 200)))]
    async fn forgotten() {}

    #[test]
    #[should_panic(expected = "GET /v1/forgotten declares no permission")]
    fn a_route_registered_without_a_permission_cannot_be_served() {
        let doc = api_router().routes(routes!(forgotten)).into_openapi();
        RouteTable::from_document(&doc);
    }
}
