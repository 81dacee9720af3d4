//! hearth's database CA: made once (ECDSA P-256, ten years), kept in the store at
//! [`CA_KEY`], and the certificate of each database server it signs (the server's
//! address and name as subject alternative names, one year). Clients verify servers
//! with `sslmode=verify-full` and this CA (`GET /v1/databases/{name}/ca.pem`).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde::{Deserialize, Serialize};

use super::error::DatabaseError;
use crate::state::AppState;
use crate::store;

pub const CA_KEY: &str = "pki/databases-ca";

#[derive(Clone, Serialize, Deserialize)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

fn pki_error(e: rcgen::Error) -> DatabaseError {
    DatabaseError::Invalid(format!("certificate: {e}"))
}

/// The CA's parameters; signing needs only its name and key, so the issuer is made
/// from these again rather than parsed from its PEM.
fn ca_params() -> Result<CertificateParams, DatabaseError> {
    let mut p = CertificateParams::new(Vec::<String>::new()).map_err(pki_error)?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, "hearth database CA");
    p.not_before = time_now(0);
    p.not_after = time_now(3650);
    Ok(p)
}

fn make_ca() -> Result<Ca, DatabaseError> {
    let key = KeyPair::generate().map_err(pki_error)?;
    let cert = ca_params()?.self_signed(&key).map_err(pki_error)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Now plus `days` (an hour back for "now", against clocks a little behind).
fn time_now(days: i64) -> time::OffsetDateTime {
    let now = time::OffsetDateTime::now_utc();
    if days == 0 {
        now - time::Duration::hours(1)
    } else {
        now + time::Duration::days(days)
    }
}

/// The CA, made the first time it is needed (compare-and-swap: two api processes that
/// race both end up with the one that won).
pub async fn ca(state: &AppState) -> Result<Ca, DatabaseError> {
    if let Some((ca, _)) = store::get_json::<Ca>(state.store.as_ref(), CA_KEY).await? {
        return Ok(ca);
    }
    let made = make_ca()?;
    match state.store.compare_and_swap(CA_KEY, None, store::encode(&made)).await {
        Ok(_) => Ok(made),
        Err(store::StoreError::Conflict { .. }) => store::get_json::<Ca>(state.store.as_ref(), CA_KEY)
            .await?
            .map(|(c, _)| c)
            .ok_or_else(|| DatabaseError::Invalid("the database CA vanished".into())),
        Err(e) => Err(e.into()),
    }
}

/// How long a server certificate lasts.
pub const SERVER_CERT_DAYS: i64 = 365;

/// A server certificate and key for `address` (and `dns_name`), signed by the CA, and
/// when it expires (ms since the epoch).
pub fn server_cert(ca: &Ca, address: std::net::IpAddr, dns_name: &str) -> Result<(String, String, u64), DatabaseError> {
    let ca_key = KeyPair::from_pem(&ca.key_pem).map_err(pki_error)?;
    let issuer = ca_params()?.self_signed(&ca_key).map_err(pki_error)?;
    let key = KeyPair::generate().map_err(pki_error)?;
    let mut p = CertificateParams::new(vec![dns_name.to_string()]).map_err(pki_error)?;
    p.subject_alt_names.push(SanType::IpAddress(address));
    p.distinguished_name.push(DnType::CommonName, dns_name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = time_now(0);
    p.not_after = time_now(SERVER_CERT_DAYS);
    let not_after_ms = (p.not_after.unix_timestamp() * 1000).max(0) as u64;
    let cert = p.signed_by(&key, &issuer, &ca_key).map_err(pki_error)?;
    Ok((cert.pem(), key.serialize_pem(), not_after_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_certificates_chain_to_the_ca() {
        use tokio_rustls::rustls::client::danger::ServerCertVerifier;
        let ca = make_ca().expect("ca");
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
