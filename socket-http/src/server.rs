//! Serving a daemon's router: on its Unix socket, and with `--listen-tls` also over
//! TCP with TLS and a token ([`crate::tls`]) for an api on another host.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use axum::response::IntoResponse;
use axum::Router;
use tokio::net::UnixListener;

/// Lets every request the router accepted run to its end even when the client hangs
/// up or dies half way (hyper drops a handler's future when its connection closes).
/// A daemon's change is several steps (an interface, then a file, then its record):
/// cut between two of them it would leave half a resource that the next start could
/// bring back. The client sees the answer it waited for, or a broken connection and
/// asks again; the daemons' PUT and DELETE are idempotent.
pub fn run_to_completion(router: Router) -> Router {
    router.layer(axum::middleware::from_fn(
        |req: axum::extract::Request, next: axum::middleware::Next| async move {
            match tokio::spawn(next.run(req)).await {
                Ok(resp) => resp,
                Err(e) => {
                    tracing::error!("a request handler failed: {e}");
                    crate::ApiError::internal("the request handler failed").into_response()
                }
            }
        },
    ))
}

/// Binds `path`, replacing a stale socket file left by a dead process, but refusing
/// when a live process still answers on it (two daemons must never share a socket).
pub async fn bind_unix(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is in use by another process", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// Serves `router` on the Unix socket at `path` until `shutdown` resolves, then removes
/// the socket file.
pub async fn serve_unix(
    path: PathBuf,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let listener = bind_unix(&path).await?;
    tracing::info!(socket = %path.display(), "listening");
    let result = axum::serve(listener, run_to_completion(router))
        .with_graceful_shutdown(shutdown)
        .await;
    let _ = std::fs::remove_file(&path);
    result
}

/// Where a daemon serves, as its command line says (flattened into each daemon's
/// arguments, so every daemon takes the same flags).
#[derive(Debug, Clone, clap::Args)]
pub struct Listen {
    /// Also serve over TCP with TLS on this address (e.g. `0.0.0.0:7443`), for an api
    /// on another host; needs --tls-cert, --tls-key and --token-file.
    #[arg(long, requires_all = ["tls_cert", "tls_key", "token_file"])]
    pub listen_tls: Option<std::net::SocketAddr>,
    /// The daemon's TLS certificate chain (PEM).
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// A file whose first line is the token TCP clients must send
    /// (`Authorization: Bearer`), at least 16 characters.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
}

impl Listen {
    /// The TCP side, when asked for.
    pub fn tls(&self) -> Option<crate::tls::TlsListen> {
        Some(crate::tls::TlsListen {
            addr: self.listen_tls?,
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
            token_file: self.token_file.clone()?,
            client_ca: None,
        })
    }
}

/// Serves `router` on the Unix socket `socket` and, when `tls` is given, on its TCP
/// address behind TLS and the token, until `shutdown` resolves.
pub async fn serve(
    socket: PathBuf,
    tls: Option<crate::tls::TlsListen>,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    let Some(tls) = tls else {
        return serve_unix(socket, router, shutdown).await;
    };
    let invalid = |e: crate::tls::TlsError| io::Error::new(io::ErrorKind::InvalidInput, e.to_string());
    let token = crate::tls::read_token(&tls.token_file).map_err(invalid)?;
    let listener = crate::tls::TlsListener::bind(&tls).await.map_err(invalid)?;
    tracing::info!(addr = %tls.addr, "listening with TLS");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let tcp_router = run_to_completion(crate::tls::with_token(router.clone(), token));
    let mut rx = stop_rx.clone();
    let tcp = tokio::spawn(async move {
        axum::serve(listener, tcp_router)
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|s| *s).await;
            })
            .await
    });
    let result = serve_unix(socket, router, async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    })
    .await;
    let _ = tcp.await;
    drop(stop_rx);
    result
}

/// Resolves on SIGINT or SIGTERM: how every daemon is asked to stop.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// The `/health` route every daemon serves.
pub fn health_router(service: &'static str) -> Router {
    Router::new().route(
        "/health",
        axum::routing::get(move || async move { axum::Json(serde_json::json!({"status": "ok", "service": service})) }),
    )
}
