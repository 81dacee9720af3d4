//! A daemon's router served on its Unix socket and over TCP with TLS and a token, and
//! the one client reaching it both ways through typed routes: the token and the CA
//! are enforced, the error envelope comes through. Loopback only; certificates made
//! by rcgen for each run.

use std::path::Path;
use std::time::Duration;

use axum::extract::Path as UrlPath;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use socket_http::route::{delete, get, put};
use socket_http::tls::{TlsListen, TlsTarget};
use socket_http::{ApiError, Client, ClientError, Endpoint, Route};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Thing {
    name: String,
    size: u64,
}

const THING: Route<Thing, Thing> = put("/things/{name}");
const GET_THING: Route<(), Thing> = get("/things/{name}");
const DELETE_THING: Route<(), ()> = delete("/things/{name}");

fn router() -> Router {
    Router::new()
        .route(
            THING.path,
            THING.on(|UrlPath(name): UrlPath<String>, Json(t): Json<Thing>| async move {
                if t.name != name {
                    return Err(ApiError::unprocessable("the body names another thing"));
                }
                Ok(Json(t))
            }),
        )
        .route(
            GET_THING.path,
            GET_THING.on(|UrlPath(name): UrlPath<String>| async move {
                Err::<Json<Thing>, _>(ApiError::not_found(format!("thing {name:?} does not exist")))
            }),
        )
        .route(
            DELETE_THING.path,
            DELETE_THING.on(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
}

struct Pki {
    ca: String,
    cert: String,
    key: String,
}

fn pki(names: &[&str]) -> Pki {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    // Subject names of their own: OpenSSL (curl) takes a certificate whose issuer
    // is its own subject for a self-signed one.
    ca.distinguished_name.push(rcgen::DnType::CommonName, "hearth test CA");
    let ca_cert = ca.self_signed(&ca_key).expect("CA");
    let key = rcgen::KeyPair::generate().expect("key");
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hearth daemon");
    let cert = params.signed_by(&key, &ca_cert, &ca_key).expect("certificate");
    Pki {
        ca: ca_cert.pem(),
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

#[tokio::test]
async fn one_router_on_a_socket_and_over_tls_with_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(&["localhost", "127.0.0.1"]);
    let stranger = pki(&["localhost", "127.0.0.1"]);
    let token = "a-token-of-thirty-two-characters".to_string();
    let listen = TlsListen {
        addr: "127.0.0.1:0".parse().expect("addr"),
        cert: write(dir.path(), "cert.pem", &good.cert),
        key: write(dir.path(), "key.pem", &good.key),
        token_file: write(dir.path(), "token", &format!("{token}\n")),
        client_ca: None,
    };
    // Bind first to learn the port, then serve on it (as the daemon would on a fixed one).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let listen = TlsListen {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        ..listen
    };
    let socket = dir.path().join("d.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(socket_http::server::serve(
        socket.clone(),
        Some(listen),
        router(),
        async move {
            let _ = stopped.await;
        },
    ));
    let ca = write(dir.path(), "ca.pem", &good.ca);
    let url = format!("https://127.0.0.1:{port}");
    let tls = Client::to(Endpoint::Tls(TlsTarget::new(&url, &ca, token.clone()).expect("target")))
        .with_retry(Duration::from_secs(5));
    let unix = Client::new(&socket).with_retry(Duration::from_secs(5));
    let thing = Thing {
        name: "a".into(),
        size: 7,
    };

    for (how, client) in [("unix", &unix), ("tls", &tls)] {
        let back = client.send(&THING, &["a"], Some(&thing)).await.expect(how);
        assert_eq!(back, thing, "{how}: the typed answer");
        match client.send(&GET_THING, &["b"], None).await {
            Err(ClientError::Api {
                status, code, message, ..
            }) => {
                assert_eq!((status.as_u16(), code.as_str()), (404, "not_found"), "{how}");
                assert!(message.contains("\"b\""), "{how}: {message}");
            }
            other => panic!("{how}: {other:?}"),
        }
        client.send(&DELETE_THING, &["a"], None).await.expect(how);
    }

    // The wrong token, or none: refused before any handler.
    let wrong = Client::to(Endpoint::Tls(
        TlsTarget::new(&url, &ca, "not-the-token-but-long-enough".into()).expect("target"),
    ));
    match wrong.send(&THING, &["a"], Some(&thing)).await {
        Err(ClientError::Api { status, code, .. }) => {
            assert_eq!((status.as_u16(), code.as_str()), (401, "unauthorized"))
        }
        other => panic!("a wrong token must be refused: {other:?}"),
    }
    // A daemon whose certificate another CA signed is not trusted.
    let other_ca = write(dir.path(), "other-ca.pem", &stranger.ca);
    let mistrusting = Client::to(Endpoint::Tls(
        TlsTarget::new(&url, &other_ca, token.clone()).expect("target"),
    ));
    match mistrusting.send(&DELETE_THING, &["a"], None).await {
        Err(ClientError::Connect { endpoint, source }) => {
            assert_eq!(endpoint, url);
            assert!(source.to_string().to_lowercase().contains("certificate"), "{source}");
        }
        other => panic!("an unknown CA must fail the handshake: {other:?}"),
    }
    // Plain HTTP on the TLS port gets nothing.
    let plain = tokio::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5"])
        .arg(format!("http://127.0.0.1:{port}/things/a"))
        .output()
        .await;
    if let Ok(out) = plain {
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "000",
            "no plain HTTP on the TLS port"
        );
    }

    let _ = stop.send(());
    server.await.expect("join").expect("served");
    assert!(!socket.exists(), "the socket file goes with the daemon");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the TCP listener closed with the daemon"
    );
}

#[test]
fn token_files_must_hold_a_real_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert!(socket_http::tls::read_token(&write(dir.path(), "short", "abc\n")).is_err());
    assert!(socket_http::tls::read_token(&dir.path().join("missing")).is_err());
    assert_eq!(
        socket_http::tls::read_token(&write(dir.path(), "ok", "0123456789abcdef0123\nignored\n")).expect("token"),
        "0123456789abcdef0123"
    );
}

/// Mutual TLS: a listener given a client CA serves a client showing a certificate that
/// CA signed, and completes no handshake with one showing none or another CA's.
#[tokio::test]
async fn a_listener_with_a_client_ca_serves_only_clients_it_signed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = pki(&["localhost", "127.0.0.1"]);
    let stranger = pki(&["localhost", "127.0.0.1"]);
    let token = "a-token-of-thirty-two-characters".to_string();
    let ca = write(dir.path(), "ca.pem", &good.ca);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("port")
        .local_addr()
        .expect("addr")
        .port();
    let listen = TlsListen {
        addr: format!("127.0.0.1:{port}").parse().expect("addr"),
        cert: write(dir.path(), "cert.pem", &good.cert),
        key: write(dir.path(), "key.pem", &good.key),
        token_file: write(dir.path(), "token", &format!("{token}\n")),
        client_ca: Some(ca.clone()),
    };
    let socket = dir.path().join("d.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(socket_http::server::serve(
        socket.clone(),
        Some(listen),
        router(),
        async move {
            let _ = stopped.await;
        },
    ));
    let url = format!("https://127.0.0.1:{port}");
    let target = || TlsTarget::new(&url, &ca, token.clone()).expect("target");
    // The good CA signed `good.cert`: it serves as the client's identity too.
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let known = Client::to(Endpoint::Tls(target().with_identity(&cert, &key).expect("identity")))
        .with_retry(Duration::from_secs(5));
    known
        .send(&DELETE_THING, &["a"], None)
        .await
        .expect("a client the CA signed");
    let anonymous = Client::to(Endpoint::Tls(target()));
    assert!(
        anonymous.send(&DELETE_THING, &["a"], None).await.is_err(),
        "a client without a certificate is served"
    );
    let (other_cert, other_key) = (
        write(dir.path(), "other.pem", &stranger.cert),
        write(dir.path(), "other.key", &stranger.key),
    );
    let impostor = Client::to(Endpoint::Tls(
        target().with_identity(&other_cert, &other_key).expect("identity"),
    ));
    assert!(
        impostor.send(&DELETE_THING, &["a"], None).await.is_err(),
        "a client another CA signed is served"
    );
    let _ = stop.send(());
    server.await.expect("join").expect("served");
}
