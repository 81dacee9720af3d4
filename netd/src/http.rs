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
use axum::routing::get;
use axum::{Json, Router};
use socket_http::ApiError;

use crate::network::{NetworkService, NetworkSpec, NetworkStatus, Port, PortSpec};

type Svc = State<Arc<NetworkService>>;

/// Every route of netd's API, named once for the router and the client.
pub mod routes {
    pub const NETWORKS: &str = "/networks";
    pub const NETWORK: &str = "/networks/{name}";
    pub const PORTS: &str = "/ports";
    pub const PORT: &str = "/ports/{id}";
    pub const HOST: &str = "/host";
}

pub fn router(svc: Arc<NetworkService>) -> Router {
    Router::new()
        .route(routes::NETWORKS, get(list_networks))
        .route(
            routes::NETWORK,
            get(show_network).put(ensure_network).delete(delete_network),
        )
        .route(routes::PORTS, get(list_ports).put(ensure_ports))
        .route(routes::PORT, get(show_port).put(ensure_port).delete(delete_port))
        .route(routes::HOST, get(host))
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

/// The client for netd's API, used by the api.
pub mod client {
    use http::Method;
    use socket_http::route::fill;
    use socket_http::{ClientError, UnixClient};

    use super::routes;

    use crate::network::{NetworkSpec, NetworkStatus, Port, PortSpec};

    #[derive(Debug, Clone)]
    pub struct NetdClient {
        http: UnixClient,
    }

    impl NetdClient {
        pub fn new(socket: impl Into<std::path::PathBuf>) -> Self {
            Self {
                http: UnixClient::new(socket),
            }
        }

        /// Rides out a restart of the daemon (see [`UnixClient::with_retry`]).
        pub fn with_retry(mut self, window: std::time::Duration) -> Self {
            self.http = self.http.with_retry(window);
            self
        }
        pub async fn networks(&self) -> Result<Vec<NetworkStatus>, ClientError> {
            self.http.get(routes::NETWORKS).await
        }
        pub async fn network(&self, name: &str) -> Result<NetworkStatus, ClientError> {
            self.http.get(&fill(routes::NETWORK, &[name])).await
        }
        pub async fn ensure_network(&self, spec: &NetworkSpec) -> Result<NetworkStatus, ClientError> {
            self.http
                .call(Method::PUT, &fill(routes::NETWORK, &[&spec.name]), Some(spec))
                .await
        }
        pub async fn delete_network(&self, name: &str) -> Result<(), ClientError> {
            self.http
                .call::<(), serde_json::Value>(Method::DELETE, &fill(routes::NETWORK, &[name]), None)
                .await
                .map(|_| ())
        }
        /// The host's network facts (its resolvers).
        pub async fn host(&self) -> Result<super::HostNetwork, ClientError> {
            self.http.get(routes::HOST).await
        }
        pub async fn ports(&self) -> Result<Vec<Port>, ClientError> {
            self.http.get(routes::PORTS).await
        }
        pub async fn ensure_port(&self, id: &str, spec: &PortSpec) -> Result<Port, ClientError> {
            self.http
                .call(Method::PUT, &fill(routes::PORT, &[id]), Some(spec))
                .await
        }
        /// Many ports at once, all or nothing.
        pub async fn ensure_ports(
            &self,
            specs: &std::collections::BTreeMap<String, PortSpec>,
        ) -> Result<std::collections::BTreeMap<String, Port>, ClientError> {
            self.http.call(Method::PUT, routes::PORTS, Some(specs)).await
        }
        pub async fn delete_port(&self, id: &str) -> Result<(), ClientError> {
            self.http
                .call::<(), serde_json::Value>(Method::DELETE, &fill(routes::PORT, &[id]), None)
                .await
                .map(|_| ())
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
