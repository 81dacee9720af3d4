//! TLS for NBD (`NBD_OPT_STARTTLS`), with rustls: the server's certificate chain and
//! key from PEM files, optionally a CA whose client certificates the server requires;
//! the client verifies the server against a CA file and may present a certificate.
//!
//! The files are the ones nbdkit and qemu-nbd take (`--tls-certificates` directories
//! hold `ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`), so one set serves all of them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::{TlsAcceptor, TlsConnector};

pub use socket_http::tls::TlsError;
use socket_http::tls::{certificates, private_key, provider, roots};

/// Where the server's TLS material is, and whether plaintext clients are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTlsFiles {
    /// The server's certificate chain (PEM), its own certificate first.
    pub cert: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
    /// Refuse every option but `NBD_OPT_STARTTLS` (and `ABORT`) before TLS
    /// (nbdkit's `--tls=require`); otherwise plaintext clients are served too.
    pub required: bool,
}

/// The server's TLS acceptor, made once from [`ServerTlsFiles`].
#[derive(Clone)]
pub struct ServerTls {
    pub(crate) acceptor: TlsAcceptor,
    pub(crate) required: bool,
    client_auth: bool,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls")
            .field("required", &self.required)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

fn config_error(e: rustls::Error) -> TlsError {
    TlsError::Config(e.to_string())
}

impl ServerTls {
    /// Loads the certificate, key and client CA. Errors name the file at fault.
    pub fn load(files: &ServerTlsFiles) -> Result<ServerTls, TlsError> {
        let chain = certificates(&files.cert)?;
        let key = private_key(&files.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?;
        let builder = match &files.client_ca {
            Some(ca) => {
                let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| file_error(ca, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(|e| file_error(&files.key, format!("does not go with {}: {e}", files.cert.display())))?;
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            required: files.required,
            client_auth: files.client_ca.is_some(),
        })
    }
}

/// What the client trusts, and the certificate it presents if the server asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTlsFiles {
    /// CA certificates (PEM) the server's certificate must chain to.
    pub ca: PathBuf,
    /// The client's certificate chain and key (PEM), for servers that require one.
    pub cert: Option<(PathBuf, PathBuf)>,
    /// The name the server's certificate must carry; the host of a TCP address when
    /// absent, and `localhost` for a Unix socket.
    pub server_name: Option<String>,
}

/// The client's TLS connector, made once from [`ClientTlsFiles`].
#[derive(Clone)]
pub struct ClientTls {
    pub(crate) connector: TlsConnector,
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn load(files: &ClientTlsFiles) -> Result<ClientTls, TlsError> {
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(config_error)?
            .with_root_certificates(roots(&files.ca)?);
        let config = match &files.cert {
            Some((cert, key)) => builder
                .with_client_auth_cert(certificates(cert)?, private_key(key)?)
                .map_err(|e| file_error(key, format!("does not go with {}: {e}", cert.display())))?,
            None => builder.with_no_client_auth(),
        };
        let server_name = match &files.server_name {
            Some(n) => {
                Some(ServerName::try_from(n.clone()).map_err(|e| TlsError::Config(format!("server name {n:?}: {e}")))?)
            }
            None => None,
        };
        Ok(ClientTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// The name to verify for a server reached at `host` (`None`: a Unix socket).
    pub(crate) fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, TlsError> {
        if let Some(n) = &self.server_name {
            return Ok(n.clone());
        }
        let host = host.unwrap_or("localhost");
        ServerName::try_from(host.to_string()).map_err(|e| TlsError::Config(format!("server name {host:?}: {e}")))
    }
}
