//! A daemon reached over TCP: TLS (rustls) with a bearer token, for an api that drives
//! the daemons of another host. The Unix socket stays the local way in; a daemon given
//! `--listen-tls` serves the same router on both.
//!
//! The client verifies the daemon's certificate against a CA file and sends
//! `Authorization: Bearer <token>`; the daemon refuses a request without that token
//! (401, before any handler runs). The token is compared in constant time.
//!
//! Mutual TLS where asked: a listener given a client CA ([`TlsListen::client_ca`])
//! completes no handshake with a client that shows no certificate signed by it, and a
//! target given an identity ([`TlsTarget::with_identity`]) shows its certificate. The
//! daemons of a cluster's hosts use both (certificates from the cluster's CA).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::response::IntoResponse;
use axum::Router;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, RootCertStore};
use tokio_rustls::{server::TlsStream, TlsAcceptor, TlsConnector};

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// The crypto every hearth TLS endpoint uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// A PEM file's certificates (at least one).
pub fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A PEM file's private key (PKCS#8, SEC1 or PKCS#1).
pub fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, format!("no usable private key: {e}")))
}

/// The CA certificates of a PEM file, to verify peers against.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(path)? {
        roots
            .add(cert)
            .map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// Reads a token file: its first line, which must not be empty.
pub fn read_token(path: &Path) -> Result<String, TlsError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let token = text.lines().next().unwrap_or_default().trim().to_string();
    if token.len() < 16 {
        return Err(file_error(path, "the token must be at least 16 characters"));
    }
    Ok(token)
}

/// A daemon over TCP with TLS, as a client reaches it.
#[derive(Clone)]
pub struct TlsTarget {
    /// `host:port`.
    pub addr: String,
    server_name: ServerName<'static>,
    connector: TlsConnector,
    token: String,
    /// The CA file, kept to build the connector again with an identity.
    ca: PathBuf,
}

impl std::fmt::Debug for TlsTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsTarget")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl TlsTarget {
    /// `url` is `https://host:port`; the daemon's certificate must be signed by the CA
    /// in `ca` and name `host`.
    pub fn new(url: &str, ca: &Path, token: String) -> Result<Self, TlsError> {
        let addr = url
            .strip_prefix("https://")
            .map(|a| a.trim_end_matches('/'))
            .filter(|a| !a.is_empty() && !a.contains('/'))
            .ok_or_else(|| TlsError::Config(format!("{url:?} is not https://host:port")))?;
        let host = match addr.rsplit_once(':') {
            Some((h, p)) if p.parse::<u16>().is_ok() => h.trim_start_matches('[').trim_end_matches(']'),
            _ => return Err(TlsError::Config(format!("{url:?} has no port"))),
        };
        let server_name = ServerName::try_from(host.to_string())
            .map_err(|e| TlsError::Config(format!("{host:?} is not a host name or address: {e}")))?;
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth();
        Ok(Self {
            addr: addr.to_string(),
            server_name,
            connector: TlsConnector::from(Arc::new(config)),
            token,
            ca: ca.to_path_buf(),
        })
    }

    /// Shows the certificate chain in `cert` (with its key in `key`) to the daemon, for
    /// one that wants mutual TLS.
    pub fn with_identity(mut self, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots(&self.ca)?)
            .with_client_auth_cert(certificates(cert)?, private_key(key)?)
            .map_err(|e| TlsError::Config(format!("client certificate: {e}")))?;
        self.connector = TlsConnector::from(Arc::new(config));
        Ok(self)
    }

    pub(crate) async fn connect(&self) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(&self.addr).await?;
        tcp.set_nodelay(true)?;
        self.connector.connect(self.server_name.clone(), tcp).await
    }

    pub(crate) fn authorization(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

/// Where and how a daemon serves over TCP.
#[derive(Debug, Clone)]
pub struct TlsListen {
    pub addr: SocketAddr,
    /// The daemon's certificate chain (PEM), its own certificate first.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The file holding the token clients must send.
    pub token_file: PathBuf,
    /// Mutual TLS: clients must show a certificate this CA signed (`None`: any client
    /// with the token).
    pub client_ca: Option<PathBuf>,
}

/// Equal without telling, by its timing, how much of `a` matched.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `router` behind the token check.
pub fn with_token(router: Router, token: String) -> Router {
    let expected: Arc<[u8]> = format!("Bearer {token}").into_bytes().into();
    router.layer(axum::middleware::from_fn(
        move |req: axum::extract::Request, next: axum::middleware::Next| {
            let expected = expected.clone();
            async move {
                let given = req
                    .headers()
                    .get(http::header::AUTHORIZATION)
                    .map(|v| v.as_bytes())
                    .unwrap_or_default();
                if same(given, &expected) {
                    next.run(req).await
                } else {
                    crate::ApiError::unauthorized("this daemon needs its token (Authorization: Bearer)").into_response()
                }
            }
        },
    ))
}

/// TLS connections, handshaken off the accept loop (a slow or silent client holds
/// up no one else), for `axum::serve`.
pub struct TlsListener {
    local: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
}

impl TlsListener {
    /// Binds `listen.addr` with the certificate and key of `listen`.
    pub async fn bind(listen: &TlsListen) -> Result<Self, TlsError> {
        let certs = certificates(&listen.cert)?;
        let key = private_key(&listen.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let builder = match &listen.client_ca {
            Some(ca) => {
                let verifier =
                    rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                        .build()
                        .map_err(|e| TlsError::Config(format!("client CA: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let tcp = TcpListener::bind(listen.addr)
            .await
            .map_err(|e| TlsError::Config(format!("cannot listen on {}: {e}", listen.addr)))?;
        let local = tcp.local_addr().map_err(|e| TlsError::Config(e.to_string()))?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                // The listener closes with the server (when it drops its end).
                let accepted = tokio::select! {
                    a = tcp.accept() => a,
                    _ = tx.closed() => return,
                };
                let (stream, peer) = match accepted {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("accepting a TCP connection: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(c) => c,
            // The accept loop ended (it ends only with the listener): serve no more.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"Bearer abc", b"Bearer abc"));
        assert!(!same(b"Bearer abd", b"Bearer abc"));
        assert!(!same(b"Bearer ab", b"Bearer abc"));
        assert!(!same(b"", b"Bearer abc"));
    }

    #[test]
    fn targets_need_https_and_a_port() {
        let dir = std::env::temp_dir();
        for bad in ["http://h:1", "https://h", "https://", "https://h:1/x", "h:1"] {
            assert!(
                TlsTarget::new(bad, &dir.join("none.pem"), "t".repeat(16)).is_err(),
                "{bad}"
            );
        }
    }
}
