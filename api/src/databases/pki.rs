//! hearth's database CA (a [`crate::pki`] CA kept at [`CA_KEY`]) and the certificate
//! of each database server it signs. Clients verify servers with
//! `sslmode=verify-full` and this CA (`GET /v1/databases/{name}/ca.pem`).

use super::error::DatabaseError;
use crate::state::AppState;

pub use crate::pki::{Ca, SERVER_CERT_DAYS};

pub const CA_KEY: &str = "pki/databases-ca";
const CA_NAME: &str = "hearth database CA";

fn pki_error(e: impl std::fmt::Display) -> DatabaseError {
    DatabaseError::Invalid(format!("certificate: {e}"))
}

/// The CA, made the first time it is needed.
pub async fn ca(state: &AppState) -> Result<Ca, DatabaseError> {
    crate::pki::stored_ca(state.store.as_ref(), CA_KEY, CA_NAME)
        .await
        .map_err(|e| match e {
            crate::pki::PkiError::Store(e) => DatabaseError::from(e),
            e => pki_error(e),
        })
}

/// A server certificate and key for `address` (and `dns_name`), signed by the CA, and
/// when it expires (ms since the epoch).
pub fn server_cert(ca: &Ca, address: std::net::IpAddr, dns_name: &str) -> Result<(String, String, u64), DatabaseError> {
    crate::pki::server_cert(ca, CA_NAME, address, dns_name).map_err(pki_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_certificates_chain_to_the_ca() {
        use tokio_rustls::rustls::client::danger::ServerCertVerifier;
        let ca = crate::pki::make_ca(CA_NAME).expect("ca");
        let (cert, key, not_after_ms) =
            server_cert(&ca, "10.1.2.3".parse().expect("ip"), "app.db.hearth").expect("cert");
        let days = (not_after_ms - vmm_manager::spec::now_ms()) / 86_400_000;
        assert!(
            (364..=365).contains(&days),
            "a server certificate lasts a year: {days} days"
        );
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(key.contains("PRIVATE KEY"));
        // rustls accepts it for the address, with the CA as the only root.
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for c in rustls_pemfile_certs(&ca.cert_pem) {
            roots.add(c).expect("root");
        }
        let leaf = rustls_pemfile_certs(&cert).remove(0);
        let verifier = tokio_rustls::rustls::client::WebPkiServerVerifier::builder_with_provider(
            roots.into(),
            tokio_rustls::rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .expect("verifier");
        let name = tokio_rustls::rustls::pki_types::ServerName::try_from("10.1.2.3").expect("name");
        let now = tokio_rustls::rustls::pki_types::UnixTime::now();
        verifier
            .verify_server_cert(&leaf, &[], &name, &[], now)
            .expect("the server's certificate verifies for its address");
        let other = tokio_rustls::rustls::pki_types::ServerName::try_from("10.1.2.4").expect("name");
        assert!(verifier.verify_server_cert(&leaf, &[], &other, &[], now).is_err());
    }

    fn rustls_pemfile_certs(pem: &str) -> Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>> {
        super::super::probe::certs(pem)
    }
}
