//! hearth's certificate authorities: each made once (ECDSA P-256, ten years) and kept
//! in the store under its own key, and the server certificates they sign (an address
//! and a name as subject alternative names, one year). The databases' CA
//! ([`crate::databases::pki`]) and the cluster's, for the daemons' TLS
//! ([`crate::hosts::daemons`]), are two of them.

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};
use serde::{Deserialize, Serialize};

use crate::store::{self, StateStore, StoreError};

/// A CA: its certificate, its key, and the common name it was made with.
#[derive(Clone, Serialize, Deserialize)]
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the CA under {0} vanished")]
    Vanished(String),
}

/// The CA's parameters; signing needs only its name and key, so the issuer is made
/// from these again rather than parsed from its PEM.
fn ca_params(name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.distinguished_name.push(DnType::CommonName, name);
    p.not_before = time_now(0);
    p.not_after = time_now(3650);
    Ok(p)
}

pub fn make_ca(name: &str) -> Result<Ca, rcgen::Error> {
    let key = KeyPair::generate()?;
    let cert = ca_params(name)?.self_signed(&key)?;
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

/// The CA named `name` kept under `key`, made the first time it is needed
/// (compare-and-swap: two api processes that race both end up with the one that won).
pub async fn stored_ca(store: &dyn StateStore, key: &str, name: &str) -> Result<Ca, PkiError> {
    if let Some((ca, _)) = store::get_json::<Ca>(store, key).await? {
        return Ok(ca);
    }
    let made = make_ca(name)?;
    match store.compare_and_swap(key, None, store::encode(&made)).await {
        Ok(_) => Ok(made),
        Err(StoreError::Conflict { .. }) => store::get_json::<Ca>(store, key)
            .await?
            .map(|(c, _)| c)
            .ok_or_else(|| PkiError::Vanished(key.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// How long a server certificate lasts.
pub const SERVER_CERT_DAYS: i64 = 365;

/// A server certificate and key for `address` (and `dns_name`), signed by the CA named
/// `ca_name`, and when it expires (ms since the epoch).
pub fn server_cert(
    ca: &Ca,
    ca_name: &str,
    address: std::net::IpAddr,
    dns_name: &str,
) -> Result<(String, String, u64), rcgen::Error> {
    let ca_key = KeyPair::from_pem(&ca.key_pem)?;
    let issuer = ca_params(ca_name)?.self_signed(&ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![dns_name.to_string()])?;
    p.subject_alt_names.push(SanType::IpAddress(address));
    p.distinguished_name.push(DnType::CommonName, dns_name);
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = time_now(0);
    p.not_after = time_now(SERVER_CERT_DAYS);
    let not_after_ms = (p.not_after.unix_timestamp() * 1000).max(0) as u64;
    let cert = p.signed_by(&key, &issuer, &ca_key)?;
    Ok((cert.pem(), key.serialize_pem(), not_after_ms))
}
