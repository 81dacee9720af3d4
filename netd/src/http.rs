//! netd's HTTP/JSON API on its Unix socket. Idempotent: `PUT` ensures, `DELETE` of a
//! missing thing succeeds, `GET` reports what exists.
//!
//! - `GET /networks`, `GET|PUT|DELETE /networks/{name}` (body: `NetworkSpec`)
//! - `GET /ports`, `GET|PUT|DELETE /ports/{id}` (body: `PortSpec`)
//! - `PUT /ports` (body: `{id: PortSpec, ...}`): many ports at once, all or nothing; the
//!   answer is `{id: Port, ...}`
//! - `GET /host`: this host's network facts (the resolvers guests are given)

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::{Json, Router};
use socket_http::ApiError;

use crate::network::{NetworkService, NetworkSpec, NetworkStatus, Port, PortSpec};

type Svc = State<Arc<NetworkService>>;

/// Every route of netd's API with what it takes and answers, named once for the
/// router and its callers (`socket_http::Client::send`).
pub mod routes {
    use std::collections::BTreeMap;

    use socket_http::route::{delete, get, put};
    use socket_http::Route;

    use crate::network::{NetworkSpec, NetworkStatus, Port, PortSpec};

    pub const NETWORKS: Route<(), Vec<NetworkStatus>> = get("/networks");
    pub const NETWORK: Route<(), NetworkStatus> = get("/networks/{name}");
    pub const PUT_NETWORK: Route<NetworkSpec, NetworkStatus> = put("/networks/{name}");
    pub const DELETE_NETWORK: Route<(), ()> = delete("/networks/{name}");
    pub const PORTS: Route<(), Vec<Port>> = get("/ports");
    pub const PUT_PORTS: Route<BTreeMap<String, PortSpec>, BTreeMap<String, Port>> = put("/ports");
    pub const PORT: Route<(), Port> = get("/ports/{id}");
    pub const PUT_PORT: Route<PortSpec, Port> = put("/ports/{id}");
    pub const DELETE_PORT: Route<(), ()> = delete("/ports/{id}");
    pub const HOST: Route<(), super::HostNetwork> = get("/host");
}

pub fn router(svc: Arc<NetworkService>) -> Router {
    use routes::*;
    Router::new()
        .route(NETWORKS.path, NETWORKS.on(list_networks))
        .route(NETWORK.path, NETWORK.on(show_network))
        .route(PUT_NETWORK.path, PUT_NETWORK.on(ensure_network))
        .route(DELETE_NETWORK.path, DELETE_NETWORK.on(delete_network))
        .route(PORTS.path, PORTS.on(list_ports))
        .route(PUT_PORTS.path, PUT_PORTS.on(ensure_ports))
        .route(PORT.path, PORT.on(show_port))
        .route(PUT_PORT.path, PUT_PORT.on(ensure_port))
        .route(DELETE_PORT.path, DELETE_PORT.on(delete_port))
        .route(HOST.path, HOST.on(host))
        .with_state(svc)
        .merge(socket_http::server::health_router("netd"))
}

/// What `GET /host` reports.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HostNetwork {
    /// The host's DNS resolvers from `/etc/resolv.conf`, loopback ones left out (they
    /// mean nothing inside a VM), at most three.
    pub resolvers: Vec<std::net::IpAddr>,
    /// netd's version.
    pub version: String,
}

impl HostNetwork {
    pub fn read() -> Self {
        Self {
            resolvers: resolvers(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default()),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The `nameserver` lines of a resolv.conf that a VM can use.
pub fn resolvers(resolv_conf: &str) -> Vec<std::net::IpAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .take(3)
        .collect()
}

async fn host() -> Json<HostNetwork> {
    Json(HostNetwork::read())
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| match e.classify() {
        serde_json::error::Category::Data => ApiError::unprocessable(format!("invalid request: {e}")),
        _ => ApiError::bad_request(format!("malformed JSON: {e}")),
    })
}

async fn list_networks(State(svc): Svc) -> Result<Json<Vec<NetworkStatus>>, ApiError> {
    Ok(Json(svc.list_networks().await?))
}

async fn show_network(State(svc): Svc, Path(name): Path<String>) -> Result<Json<NetworkStatus>, ApiError> {
    Ok(Json(svc.network(&name).await?))
}

async fn ensure_network(
    State(svc): Svc,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<Json<NetworkStatus>, ApiError> {
    let spec: NetworkSpec = parse(&body)?;
    if spec.name != name {
        return Err(ApiError::unprocessable(format!(
            "body names network {:?}, the URL {name:?}",
            spec.name
        )));
    }
    Ok(Json(svc.ensure_network(spec).await?))
}

async fn delete_network(State(svc): Svc, Path(name): Path<String>) -> Result<StatusCode, ApiError> {
    svc.delete_network(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_ports(State(svc): Svc) -> Json<Vec<Port>> {
    Json(svc.ports().await)
}

async fn show_port(State(svc): Svc, Path(id): Path<String>) -> Result<Json<Port>, ApiError> {
    Ok(Json(svc.port(&id).await?))
}

async fn ensure_port(State(svc): Svc, Path(id): Path<String>, body: axum::body::Bytes) -> Result<Json<Port>, ApiError> {
    let spec: PortSpec = parse(&body)?;
    Ok(Json(svc.ensure_port(&id, spec).await?))
}

async fn ensure_ports(
    State(svc): Svc,
    body: axum::body::Bytes,
) -> Result<Json<std::collections::BTreeMap<String, Port>>, ApiError> {
    let specs: std::collections::BTreeMap<String, PortSpec> = parse(&body)?;
    let ports = svc.ensure_ports(specs.into_iter().collect()).await?;
    Ok(Json(ports.into_iter().map(|p| (p.id.clone(), p)).collect()))
}

async fn delete_port(State(svc): Svc, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    svc.delete_port(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// netd's callers' view of it: the one client (`socket_http::Client`) and netd's
/// typed routes; these are shorthands for the calls made most.
pub mod client {
    use std::collections::BTreeMap;

    use socket_http::{Client, ClientError};

    use super::routes;
    use crate::network::{NetworkSpec, NetworkStatus, Port, PortSpec};

    /// netd's client: any endpoint, Unix socket or TLS.
    #[derive(Debug, Clone)]
    pub struct NetdClient(pub Client);

    impl NetdClient {
        pub fn new(socket: impl Into<std::path::PathBuf>) -> Self {
            Self(Client::new(socket))
        }
        /// Rides out a restart of the daemon (see [`Client::with_retry`]).
        pub fn with_retry(self, window: std::time::Duration) -> Self {
            Self(self.0.with_retry(window))
        }
        pub async fn networks(&self) -> Result<Vec<NetworkStatus>, ClientError> {
            self.0.send(&routes::NETWORKS, &[], None).await
        }
        pub async fn network(&self, name: &str) -> Result<NetworkStatus, ClientError> {
            self.0.send(&routes::NETWORK, &[name], None).await
        }
        pub async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkStatus, ClientError> {
            self.0.send(&routes::PUT_NETWORK, &[&spec.name], Some(spec)).await
        }
        pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_NETWORK, &[name], None).await
        }
        /// The host's network facts (its resolvers).
        pub async fn host(&self) -> Result<super::HostNetwork, ClientError> {
            self.0.send(&routes::HOST, &[], None).await
        }
        pub async fn ports(&self) -> Result<Vec<Port>, ClientError> {
            self.0.send(&routes::PORTS, &[], None).await
        }
        pub async fn ensure_port(&self, id: &str, spec: &PortSpec) -> Result<Port, ClientError> {
            self.0.send(&routes::PUT_PORT, &[id], Some(spec)).await
        }
        /// Many ports at once, all or nothing.
        pub async fn ensure_ports(
            &self,
            specs: &BTreeMap<String, PortSpec>,
        ) -> Result<BTreeMap<String, Port>, ClientError> {
            self.0.send(&routes::PUT_PORTS, &[], Some(specs)).await
        }
        pub async fn delete_port(&self, id: &str) -> Result<(), ClientError> {
            self.0.send(&routes::DELETE_PORT, &[id], None).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolvers_a_vm_can_use_are_taken_from_resolv_conf() {
        let conf = "# generated\nnameserver 127.0.0.53\nnameserver 192.0.2.1\nsearch lan\n  nameserver 2001:db8::1\nnameserver bogus\nnameserver 192.0.2.2\nnameserver 192.0.2.3\n";
        let got: Vec<String> = resolvers(conf).iter().map(|a| a.to_string()).collect();
        assert_eq!(
            got,
            ["192.0.2.1", "2001:db8::1", "192.0.2.2"],
            "loopback and bad lines skipped, three at most"
        );
        assert!(resolvers("").is_empty());
    }
}
