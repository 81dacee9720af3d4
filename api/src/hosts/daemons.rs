//! Reaching a host's daemons. This host's are the api's own clients (Unix sockets, or
//! what `--daemon` named); another host's are reached over TCP with mutual TLS at the
//! endpoints its api registered: each side shows a certificate the cluster's CA signed
//! (kept in the store with the cluster's daemon token, both made by the first api that
//! needed them), and the api sends the token too.
//!
//! With `--host-address`, an all-in-one api also serves its daemons there over TLS
//! ([`serve_tls`]), with a certificate for that address signed by the cluster's CA.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::error::HostError;
use super::record;
use crate::state::AppState;
use crate::store;

/// The cluster's CA for the daemons' TLS.
pub const CA_KEY: &str = "pki/cluster-ca";
const CA_NAME: &str = "hearth cluster CA";
/// The token every host's daemons accept from the apis.
pub const TOKEN_KEY: &str = "pki/daemon-token";

pub use super::clients::{Daemons, RemoteHosts};

#[derive(Clone, Serialize, Deserialize)]
struct Token {
    token: String,
}

/// Where this api keeps the cluster's files (CA, token, its daemons' certificate).
fn dir(state: &AppState) -> PathBuf {
    state.config.data_dir.join("cluster")
}

/// The cluster's CA and daemon token, made once for the whole cluster, written to
/// files for rustls and the daemons' listeners: `(ca.pem, token)`.
pub async fn cluster_files(state: &AppState) -> Result<(PathBuf, PathBuf), HostError> {
    let ca = crate::pki::stored_ca(state.store.as_ref(), CA_KEY, CA_NAME).await?;
    let made = Token {
        token: hex(&rand::random::<[u8; 32]>()),
    };
    let token = match state
        .store
        .compare_and_swap(TOKEN_KEY, None, store::encode(&made))
        .await
    {
        Ok(_) => made,
        Err(store::StoreError::Conflict { .. }) => store::get_json::<Token>(state.store.as_ref(), TOKEN_KEY)
            .await?
            .map(|(t, _)| t)
            .ok_or_else(|| HostError::Busy("the daemon token".into()))?,
        Err(e) => return Err(e.into()),
    };
    let dir = dir(state);
    std::fs::create_dir_all(&dir).map_err(|e| HostError::Files(dir.display().to_string(), e.to_string()))?;
    let (ca_path, token_path) = (dir.join("ca.pem"), dir.join("daemon-token"));
    write_private(&ca_path, &ca.cert_pem)?;
    write_private(&token_path, &token.token)?;
    // This api's own certificate, shown to other hosts' daemons (mutual TLS).
    // Made again when the cluster's CA is not the one that signed it (a data directory
    // that served another cluster).
    let (client_cert, client_key, signer) = (dir.join("api.pem"), dir.join("api.key"), dir.join("api.signer.pem"));
    let signed_by_ca = std::fs::read_to_string(&signer).is_ok_and(|s| s == ca.cert_pem);
    if !signed_by_ca || !client_cert.exists() || !client_key.exists() {
        let address = state
            .config
            .host
            .address
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let (cert, key, _) = crate::pki::server_cert(&ca, CA_NAME, address, &state.config.host.name)
            .map_err(|e| HostError::Files("the api's certificate".into(), e.to_string()))?;
        write_private(&client_key, &key)?;
        write_private(&client_cert, &cert)?;
        write_private(&signer, &ca.cert_pem)?;
    }
    Ok((ca_path, token_path))
}

/// This api's certificate and key for other hosts' daemons (made by [`cluster_files`]).
fn identity(state: &AppState) -> (PathBuf, PathBuf) {
    let dir = dir(state);
    (dir.join("api.pem"), dir.join("api.key"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `text` readable by root only.
fn write_private(path: &std::path::Path, text: &str) -> Result<(), HostError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let fail = |e: std::io::Error| HostError::Files(path.display().to_string(), e.to_string());
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail)?;
    f.write_all(text.as_bytes()).map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

/// Serves `routers` (daemon name, router) over TLS on `address`, one port each from
/// `port_base` on, with a certificate for `address` signed by the cluster's CA.
/// Returns the endpoints to register (`https://address:port` by daemon).
pub async fn serve_tls(
    state: &AppState,
    address: std::net::IpAddr,
    port_base: u16,
    routers: Vec<(&'static str, axum::Router)>,
    stop: tokio::sync::watch::Receiver<bool>,
) -> Result<BTreeMap<String, String>, HostError> {
    let (ca_path, token_path) = cluster_files(state).await?;
    let ca = crate::pki::stored_ca(state.store.as_ref(), CA_KEY, CA_NAME).await?;
    let (cert, key, _) = crate::pki::server_cert(&ca, CA_NAME, address, &state.config.host.name)
        .map_err(|e| HostError::Files("the daemons' certificate".into(), e.to_string()))?;
    let dir = dir(state);
    let (cert_path, key_path) = (dir.join("daemons.pem"), dir.join("daemons.key"));
    write_private(&cert_path, &cert)?;
    write_private(&key_path, &key)?;
    let token =
        socket_http::tls::read_token(&token_path).map_err(|e| HostError::Files("the token".into(), e.to_string()))?;
    let mut endpoints = BTreeMap::new();
    for (i, (name, router)) in routers.into_iter().enumerate() {
        let port = port_base + u16::try_from(i).unwrap_or(0);
        let listen = socket_http::tls::TlsListen {
            addr: std::net::SocketAddr::new(address, port),
            cert: cert_path.clone(),
            key: key_path.clone(),
            token_file: token_path.clone(),
            client_ca: Some(ca_path.clone()),
        };
        let listener = socket_http::tls::TlsListener::bind(&listen)
            .await
            .map_err(|e| HostError::Files(format!("{name} over TLS"), e.to_string()))?;
        let app = socket_http::server::run_to_completion(socket_http::tls::with_token(router, token.clone()));
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|s| *s).await;
                })
                .await;
        });
        endpoints.insert(
            name.to_string(),
            format!("https://{}", std::net::SocketAddr::new(address, port)),
        );
    }
    Ok(endpoints)
}

/// The daemons of `host` (`None`: a VM from before hosts were recorded, which lives on
/// this api's host).
pub async fn on(state: &AppState, host: Option<&str>) -> Result<Daemons, HostError> {
    let local = || Daemons {
        vmm: state.vmm.clone(),
        netd: state.netd.clone(),
        blockd: state.blockd.clone(),
        images: state.images.clone(),
    };
    let Some(name) = host.filter(|h| *h != state.config.host.name) else {
        return Ok(local());
    };
    let (rec, revision) = record::get(state.store.as_ref(), name)
        .await?
        .ok_or_else(|| HostError::NotFound(name.to_string()))?;
    if let Some(lost) = &rec.lost {
        return Err(HostError::Lost {
            name: name.to_string(),
            reason: lost.reason.clone(),
        });
    }
    if let Some(d) = state.remote_hosts.get(name, revision) {
        return Ok(d);
    }
    let (ca, token_path) = cluster_files(state).await?;
    let token =
        socket_http::tls::read_token(&token_path).map_err(|e| HostError::Files("the token".into(), e.to_string()))?;
    let client = |daemon: &str| -> Result<socket_http::Client, HostError> {
        let url = rec.daemons.get(daemon).ok_or_else(|| HostError::Unreachable {
            name: name.to_string(),
            why: format!("it registered no TLS endpoint for {daemon} (its api runs without --host-address)"),
        })?;
        let (cert, key) = identity(state);
        let target = socket_http::tls::TlsTarget::new(url, &ca, token.clone())
            .and_then(|t| t.with_identity(&cert, &key))
            .map_err(|e| HostError::Unreachable {
                name: name.to_string(),
                why: e.to_string(),
            })?;
        Ok(socket_http::Client::to(socket_http::Endpoint::Tls(target)).with_retry(state.config.daemon_retry))
    };
    let d = Daemons {
        vmm: vmm_manager::client::VmmClient(client("vmm-manager")?),
        netd: netd::http::client::NetdClient(client("netd")?),
        blockd: blockd::http::client::BlockdClient(client("blockd")?.with_timeout(std::time::Duration::from_secs(600))),
        images: imaged::client::ImagedClient(client("imaged")?),
    };
    state.remote_hosts.keep(name, revision, d.clone());
    Ok(d)
}

/// [`on`] for a shared state handle.
pub async fn of(state: &Arc<AppState>, host: Option<&str>) -> Result<Daemons, HostError> {
    on(state.as_ref(), host).await
}

/// The daemons of the host `vm` lives on.
pub async fn of_vm(state: &AppState, vm: &crate::model::VmRecord) -> Result<Daemons, HostError> {
    on(state, vm.host.as_deref()).await
}

/// Whether `host` is this api's own (`None`: a record from before hosts were recorded).
pub fn is_local(state: &AppState, host: Option<&str>) -> bool {
    state.is_local(host)
}

/// The states of the VMs on other hosts, asked of each host's vmm-manager (2 s at
/// most each); the VMs of a host that cannot be reached get why.
impl crate::vms::list::RemoteStates for AppState {
    fn remote_states<'a>(
        &'a self,
        records: &'a [crate::model::VmRecord],
    ) -> futures_util::future::BoxFuture<'a, crate::vms::list::RemoteVmStates> {
        let app = self;
        Box::pin(async move {
            let mut by_host: std::collections::BTreeMap<&str, Vec<&crate::model::VmRecord>> = Default::default();
            for r in records {
                if let Some(h) = r.host.as_deref().filter(|h| *h != app.config.host.name) {
                    by_host.entry(h).or_default().push(r);
                }
            }
            let mut out = std::collections::HashMap::new();
            for (host, vms) in by_host {
                let listed = match on(app, Some(host)).await {
                    Ok(d) => match tokio::time::timeout(std::time::Duration::from_secs(2), d.vmm.list()).await {
                        Ok(Ok(list)) => Ok(list
                            .into_iter()
                            .map(|i| (i.spec.id, i.status))
                            .collect::<std::collections::HashMap<_, _>>()),
                        Ok(Err(e)) => Err(HostError::Daemon(crate::daemons::upstream(e))),
                        Err(_) => Err(HostError::Unreachable {
                            name: host.to_string(),
                            why: "its vmm-manager did not answer within 2 s".into(),
                        }),
                    },
                    Err(e) => Err(e),
                };
                for r in vms {
                    let one = match &listed {
                        Ok(m) => Ok(m.get(&r.id).cloned()),
                        Err(HostError::Lost { name, reason }) => Err(HostError::Lost {
                            name: name.clone(),
                            reason: reason.clone(),
                        }),
                        Err(e) => Err(HostError::Unreachable {
                            name: host.to_string(),
                            why: e.to_string(),
                        }),
                    };
                    out.insert(r.id.clone(), one);
                }
            }
            out
        })
    }
}
