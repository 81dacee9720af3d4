//! A small HTTP/1.1 client for JSON APIs on Unix sockets (hearth daemons, Cloud
//! Hypervisor's `--api-socket`) or, for a daemon on another host, over TCP with TLS
//! and a token ([`crate::tls`]). One connection per request keeps it robust across
//! daemon restarts; the cost is tens of microseconds on a local socket.
//!
//! [`Client::send`] calls a daemon's typed [`Route`]: the route's request and answer
//! types are the ones its router serves, so a daemon's client is its routes.

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{ErrorBody, ErrorEnvelope};
use crate::route::Route;
use crate::tls::TlsTarget;

/// Where a daemon (or any JSON API) is reached.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A Unix socket on this host.
    Unix(PathBuf),
    /// TCP with TLS and a bearer token.
    Tls(TlsTarget),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "{}", p.display()),
            Endpoint::Tls(t) => write!(f, "https://{}", t.addr),
        }
    }
}

/// A connection of either kind.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Why a call to a Unix-socket API failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach {endpoint}: {source}")]
    Connect { endpoint: String, source: std::io::Error },
    #[error("HTTP exchange with {endpoint} failed: {message}")]
    Transport { endpoint: String, message: String },
    #[error("{endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("{message}")]
    Api {
        status: StatusCode,
        code: String,
        message: String,
        details: Option<serde_json::Value>,
    },
    #[error("unexpected response from {endpoint}: {message}")]
    Decode { endpoint: String, message: String },
}

impl ClientError {
    /// The HTTP status the remote side answered with, if it answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// True when the remote API said the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }
}

/// Percent-encodes what may not appear in a URI as is (non-ASCII, controls, spaces,
/// quotes, `#`…), so a name with such characters reaches the daemon, which judges it,
/// instead of failing here. `/`, `?`, `&`, `=` and `%` keep their meaning.
fn encode_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        let keep = b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A raw HTTP response: status and body bytes.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: StatusCode,
    pub body: Bytes,
}

/// The client of one endpoint.
#[derive(Debug, Clone)]
pub struct Client {
    endpoint: Endpoint,
    timeout: Duration,
    retry_for: Duration,
    /// The uid the process serving a Unix socket must have (`SO_PEERCRED`).
    peer_uid: Option<u32>,
}

/// Whether a failed exchange may be sent again: the request never reached the server
/// (no socket, or nothing listening: a daemon restarting), or the connection broke
/// before the answer and the method may be repeated without changing the outcome
/// (GET, PUT, DELETE, HEAD; hearth's daemons make PUT and DELETE idempotent).
fn may_retry(repeatable: bool, e: &ClientError) -> bool {
    match e {
        ClientError::Connect { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::NotFound
                | std::io::ErrorKind::ConnectionRefused
                | std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::ConnectionAborted
        ),
        ClientError::Transport { .. } => repeatable,
        _ => false,
    }
}

/// Methods whose repetition has the effect of one request.
fn idempotent(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::PUT | Method::DELETE | Method::HEAD)
}

/// The name most callers know it by: most endpoints are Unix sockets.
pub type UnixClient = Client;

impl Client {
    /// A client of the Unix socket at `socket`.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self::to(Endpoint::Unix(socket.into()))
    }

    /// A client of `endpoint`.
    pub fn to(endpoint: Endpoint) -> Self {
        Self {
            endpoint,
            timeout: Duration::from_secs(120),
            retry_for: Duration::ZERO,
            peer_uid: None,
        }
    }

    /// Talks only to a Unix socket served by a process of user `uid` (its
    /// `SO_PEERCRED`): a socket whose directory an untrusted process may write (a
    /// jailed VMM's) could be replaced by a link to someone else's.
    pub fn with_peer_uid(mut self, uid: u32) -> Self {
        self.peer_uid = Some(uid);
        self
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Rides out a restart of the server: a request that could not be delivered, or an
    /// idempotent one whose connection broke before the answer, is sent again (with
    /// growing pauses up to 0.5 s) for up to `window`. Off by default.
    pub fn with_retry(mut self, window: Duration) -> Self {
        self.retry_for = window;
        self
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn name(&self) -> String {
        self.endpoint.to_string()
    }

    /// Opens a connection to the endpoint (TLS handshake done): what a WebSocket
    /// rides on. A TLS endpoint needs [`Client::authorization`] on the request.
    pub async fn connect(&self) -> Result<Box<dyn Io>, ClientError> {
        let connect = |source| ClientError::Connect {
            endpoint: self.name(),
            source,
        };
        Ok(match &self.endpoint {
            Endpoint::Unix(path) => {
                let stream = tokio::net::UnixStream::connect(path).await.map_err(connect)?;
                if let Some(want) = self.peer_uid {
                    let uid = stream.peer_cred().map_err(connect)?.uid();
                    if uid != want {
                        return Err(connect(std::io::Error::new(
                            std::io::ErrorKind::PermissionDenied,
                            format!("served by uid {uid}, not uid {want}"),
                        )));
                    }
                }
                Box::new(stream)
            }
            Endpoint::Tls(t) => Box::new(t.connect().await.map_err(connect)?),
        })
    }

    /// The `Authorization` header a request to this endpoint carries, if any.
    pub fn authorization(&self) -> Option<String> {
        match &self.endpoint {
            Endpoint::Unix(_) => None,
            Endpoint::Tls(t) => Some(t.authorization()),
        }
    }

    /// Calls `route` with its placeholders filled by `params`, in order: the request
    /// and answer types are the route's, as the daemon's router serves it.
    pub async fn send<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &Route<Req, Resp>,
        params: &[&str],
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        self.call(route.method.clone(), &route.at(params), body).await
    }

    /// [`Client::send`] for a POST whose repetition has the effect of one request
    /// (see [`Client::call_repeatable`]).
    pub async fn send_repeatable<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &Route<Req, Resp>,
        params: &[&str],
        body: Option<&Req>,
    ) -> Result<Resp, ClientError> {
        self.call_repeatable(route.method.clone(), &route.at(params), body)
            .await
    }

    /// Sends one request and returns status and body, whatever the status.
    pub async fn raw(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<RawResponse, ClientError> {
        let repeatable = idempotent(&method);
        self.exchange(method, path, body, repeatable).await
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        repeatable: bool,
    ) -> Result<RawResponse, ClientError> {
        let started = std::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            let fut = self.raw_inner(method.clone(), path, body.clone());
            let result = match tokio::time::timeout(self.timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(ClientError::Timeout {
                    endpoint: self.name(),
                    timeout: self.timeout,
                }),
            };
            match result {
                Err(e) if may_retry(repeatable, &e) && started.elapsed() + pause <= self.retry_for => {
                    tracing::debug!(endpoint = %self.endpoint, %method, path, "retrying: {e}");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                other => return other,
            }
        }
    }

    async fn raw_inner(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<RawResponse, ClientError> {
        let (resp, conn_task) = self.open(method, path, body).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.transport(e))?
            .to_bytes();
        conn_task.abort();
        Ok(RawResponse { status, body })
    }

    fn transport(&self, e: impl std::fmt::Display) -> ClientError {
        ClientError::Transport {
            endpoint: self.name(),
            message: e.to_string(),
        }
    }

    /// Opens a connection, sends one request and returns the response head with its
    /// still unread body, and the task driving the connection.
    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(http::Response<hyper::body::Incoming>, tokio::task::JoinHandle<()>), ClientError> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| self.transport(e))?;
        let conn_task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let mut req = Request::builder()
            .method(method)
            .uri(encode_path(path))
            .header(http::header::HOST, "localhost");
        if let Some(auth) = self.authorization() {
            req = req.header(http::header::AUTHORIZATION, auth);
        }
        let payload = match body {
            Some(b) => {
                req = req
                    .header(http::header::CONTENT_TYPE, "application/json")
                    .header(http::header::CONTENT_LENGTH, b.len());
                Bytes::from(b)
            }
            None => Bytes::new(),
        };
        let req = req.body(Full::new(payload)).map_err(|e| self.transport(e))?;
        match sender.send_request(req).await {
            Ok(resp) => Ok((resp, conn_task)),
            Err(e) => {
                conn_task.abort();
                Err(self.transport(e))
            }
        }
    }

    /// GET of a long-lived response (server-sent events): waits for the response head
    /// (within the client's timeout) and returns the body to read as it arrives. The
    /// connection closes when the body is dropped. A non-success status is an error.
    pub async fn stream(&self, path: &str) -> Result<Streaming, ClientError> {
        let (resp, conn_task) = match tokio::time::timeout(self.timeout, self.open(Method::GET, path, None)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    endpoint: self.name(),
                    timeout: self.timeout,
                })
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            conn_task.abort();
            return Err(self.api_error(&RawResponse { status, body }));
        }
        Ok(Streaming {
            body: resp.into_body(),
            conn_task,
        })
    }

    /// Calls a hearth daemon: success bodies are decoded as `T`, error bodies as the
    /// error envelope.
    pub async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        let repeatable = idempotent(&method);
        self.call_with(method, path, body, repeatable).await
    }

    /// [`Client::call`] for a POST whose repetition has the effect of one request
    /// (an "ensure" such as starting a VM that may already run): with
    /// [`Client::with_retry`] it is sent again when the connection broke before the
    /// answer.
    pub async fn call_repeatable<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, ClientError> {
        self.call_with(method, path, body, true).await
    }

    async fn call_with<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        repeatable: bool,
    ) -> Result<T, ClientError> {
        let encoded = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| ClientError::Decode {
                endpoint: self.name(),
                message: format!("cannot encode request: {e}"),
            })?),
            None => None,
        };
        let resp = self.exchange(method, path, encoded, repeatable).await?;
        if !resp.status.is_success() {
            return Err(self.api_error(&resp));
        }
        let bytes = if resp.body.is_empty() {
            Bytes::from_static(b"null")
        } else {
            resp.body
        };
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
            endpoint: self.name(),
            message: format!("{e}"),
        })
    }

    /// GET returning JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.call::<(), T>(Method::GET, path, None).await
    }

    /// Turns a non-success response into [`ClientError::Api`], reading the envelope
    /// where there is one.
    pub fn api_error(&self, resp: &RawResponse) -> ClientError {
        match serde_json::from_slice::<ErrorEnvelope>(&resp.body) {
            Ok(ErrorEnvelope {
                error: ErrorBody { code, message, details },
            }) => ClientError::Api {
                status: resp.status,
                code,
                message,
                details,
            },
            Err(_) => ClientError::Api {
                status: resp.status,
                code: "upstream".into(),
                message: format!(
                    "{} answered {}: {}",
                    self.endpoint,
                    resp.status,
                    String::from_utf8_lossy(&resp.body).trim()
                ),
                details: None,
            },
        }
    }
}

/// The body of a response read as it arrives ([`Client::stream`]).
pub struct Streaming {
    body: hyper::body::Incoming,
    conn_task: tokio::task::JoinHandle<()>,
}

impl Streaming {
    /// The next chunk of the body; `None` at its end.
    pub async fn chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => {
                    return Some(Err(ClientError::Transport {
                        endpoint: String::new(),
                        message: e.to_string(),
                    }))
                }
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.conn_task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::encode_path;

    #[test]
    fn paths_with_odd_names_become_valid_uris() {
        for (raw, want) in [
            ("/networks/lab", "/networks/lab"),
            ("/images/debian:12?x=1&y=2", "/images/debian:12?x=1&y=2"),
            ("/networks/a b#c", "/networks/a%20b%23c"),
            ("/images/é\u{1e}", "/images/%C3%A9%1E"),
        ] {
            let got = encode_path(raw);
            assert_eq!(got, want);
            assert!(got.parse::<http::Uri>().is_ok(), "{got}");
        }
    }
}
