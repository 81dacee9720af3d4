//! Readiness: a real query, over TLS verified against hearth's CA (`verify-full`: the
//! server's certificate must name its address), with the real password. `pg_isready`
//! would answer before the password is set.
//!
//! PostgreSQL's TLS starts inside its own protocol (an `SSLRequest`, then the
//! handshake); that is done here with rustls, and tokio-postgres then speaks the
//! protocol over the encrypted stream.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};

/// The certificates in a PEM text.
pub fn certs(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes()).flatten().collect()
}

/// Runs `sql` as the superuser with `password`; the first column of the first row.
pub async fn query(addr: SocketAddr, ca_pem: &str, password: &str, sql: &str) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca_pem) {
        roots.add(c).map_err(|e| format!("the CA certificate: {e}"))?;
    }
    let config = rustls::ClientConfig::builder_with_provider(rustls::crypto::ring::default_provider().into())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let mut tcp = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no TCP connection to {addr} within 5 s"))?
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    // SSLRequest: length 8, code 80877103.
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.map_err(|e| e.to_string())?;
    if answer[0] != b'S' {
        return Err("the server does not offer TLS".into());
    }
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (client, connection) = tokio_postgres::Config::new()
        .user(guest_agent::SUPERUSER)
        .password(password)
        .dbname("postgres")
        .ssl_mode(tokio_postgres::config::SslMode::Disable)
        .connect_raw(tls, tokio_postgres::NoTls)
        .await
        .map_err(|e| format!("login: {e}"))?;
    let conn = tokio::spawn(connection);
    let rows = client.simple_query(sql).await.map_err(|e| format!("query: {e}"));
    drop(client);
    let _ = conn.await;
    for m in rows? {
        if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or_default().to_string());
        }
    }
    Ok(String::new())
}

/// Waits until the query succeeds, or `within` has passed (the last error).
pub async fn until_ready(addr: SocketAddr, ca_pem: &str, password: &str, within: Duration) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::from("no attempt");
    while tokio::time::Instant::now() < deadline {
        match query(addr, ca_pem, password, "SELECT 1").await {
            Ok(v) if v == "1" => return Ok(()),
            Ok(v) => last = format!("SELECT 1 answered {v:?}"),
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!("no answer within {} s; last: {last}", within.as_secs()))
}
