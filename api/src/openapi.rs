//! The API's self-description: an OpenAPI 3.1 document generated from the handlers'
//! `#[utoipa::path]` annotations and the resource types' schemas, collected by the same
//! router that serves the routes (so a route cannot be served yet missing from the
//! document). Served at `GET /openapi.json` and checked in at `docs/openapi.json`; the
//! test `api/tests/openapi.rs` fails when the checked-in copy is stale.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
use utoipa::{IntoParams, Modify, OpenApi, ToSchema};

/// Every error: `{"error": {"code", "message", "details"?}}`.
#[derive(Debug, serde::Serialize, ToSchema)]
pub struct ErrorResponse {
    pub error: socket_http::ErrorBody,
}

/// The project a request works in.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ProjectParam {
    /// The project (default: `default`). Resources are invisible outside their project.
    pub project: Option<String>,
}

/// A client-chosen key that makes a POST safe to retry: a repeat with the same key and
/// body (from the same API key, within 24 hours) gets the first answer again instead of
/// doing the work twice; the same key with another body is 422.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Header, names("Idempotency-Key"))]
pub struct IdempotencyKey(#[allow(dead_code)] Option<String>);

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hearth",
        description = "hearth's REST API: VMs, networks, volumes and images on your own machines. \
            Every route but /health/* needs `Authorization: Bearer <API key>`; each operation's security \
            scope names the permission it needs (`vms.read`, `volumes.write`, …). Long mutations answer \
            202 with an Operation to follow at /v1/operations/{id}.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(openapi_json),
    components(schemas(ErrorResponse)),
    tags(
        (name = "vms", description = "Virtual machines and their lifecycle"),
        (name = "consoles", description = "Serial consoles and VNC screens"),
        (name = "networks", description = "Bridged networks with IP address management"),
        (name = "volumes", description = "Disks that outlive VMs: snapshots, clones, NBD exports"),
        (name = "images", description = "The content-addressed image cache"),
        (name = "databases", description = "Managed PostgreSQL: a server in its own VM, its data on a volume, TLS and SCRAM only. Parameters a database may set: autovacuum, autovacuum_max_workers, autovacuum_naptime, autovacuum_vacuum_scale_factor, checkpoint_completion_target, checkpoint_timeout, default_statistics_target, effective_cache_size, effective_io_concurrency, idle_in_transaction_session_timeout, jit, lock_timeout, log_connections, log_disconnections, log_min_duration_statement, log_statement, maintenance_work_mem, max_connections, max_parallel_workers, max_parallel_workers_per_gather, max_wal_size, max_worker_processes, min_wal_size, random_page_cost, shared_buffers, statement_timeout, timezone, wal_compression, work_mem"),
        (name = "operations", description = "Long-running work"),
        (name = "events", description = "Server-sent events"),
        (name = "identity", description = "Users, projects, API keys and roles"),
        (name = "system", description = "Health and metrics"),
    )
)]
pub struct ApiDoc;

/// Adds the bearer scheme, and to every operation the answers any route can give:
/// 401 (no or a bad key), 403 (a key without the permission), 429 (too many failed
/// authentications), 503 (the state store or a daemon is unavailable).
pub struct Common;

impl Modify for Common {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            crate::permissions::SCHEME,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("An API key: hth_<id>_<secret>"))
                    .build(),
            ),
        );
        openapi.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
            crate::permissions::SCHEME,
            Vec::<String>::new(),
        )]);
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(RefOr::Ref(Ref::from_schema_name("ErrorResponse"))))
                        .build(),
                )
                .build()
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                if crate::permissions::declared(op) == Ok(Some(crate::permissions::Permission::Public)) {
                    continue;
                }
                let r = &mut op.responses.responses;
                r.entry("401".into())
                    .or_insert_with(|| error("No API key, or an invalid, expired or revoked one").into());
                r.entry("403".into())
                    .or_insert_with(|| error("The key's role lacks the permission named in the message").into());
                r.entry("429".into())
                    .or_insert_with(|| error("Too many failed authentications from this address").into());
                r.entry("503".into())
                    .or_insert_with(|| error("The state store or a daemon is unavailable").into());
                // Bodies and query strings are parsed strictly: malformed is 400, the
                // wrong shape 422.
                r.entry("400".into())
                    .or_insert_with(|| error("Malformed JSON body or query string").into());
                r.entry("422".into())
                    .or_insert_with(|| error("Invalid names or values in the path, query or body").into());
            }
        }
    }
}

/// The document as JSON, pretty-printed, as checked in at `docs/openapi.json`, once
/// every route is in it (so [`Common`] reaches them all).
pub fn document_json(doc: &utoipa::openapi::OpenApi) -> String {
    let mut doc = doc.clone();
    Common.modify(&mut doc);
    let mut s = doc.to_pretty_json().unwrap_or_default();
    s.push('\n');
    s
}

/// The OpenAPI document (the route itself is served from `router`, which holds it).
#[utoipa::path(get, path = "/openapi.json", tag = "system", security(()),
    responses((status = 200, description = "This API's OpenAPI 3.1 document", content_type = "application/json", body = Object)))]
#[allow(dead_code)]
pub(crate) async fn openapi_json() {}
