//! Joining a host to the cluster. An administrator makes a join token on any host
//! (`POST /v1/hosts/join-tokens`, `hearth host join-token`); on the new machine
//! `hearth host join` hands it to that api (`POST /v1/hosts/join`, which needs no API
//! key: the token is the credential), which admits the host's name and answers with
//! the store the cluster keeps its state in. The CLI writes both into the machine's
//! `hearth.toml`; its api then starts as one host of the cluster.
//!
//! A token is single-use and expires (an hour by default); the store keeps only its
//! SHA-256. With several hosts, an api refuses to start as a host the cluster has not
//! admitted (the first host of a cluster makes it, and admits itself).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use vmm_manager::spec::now_ms;

use super::error::HostError;
use super::record;
use crate::state::AppState;
use crate::store::{self, StoreError, StoreLocation};

const TOKENS: &str = "host-join-tokens/";
const ADMITTED: &str = "hosts-admitted/";
/// How long a token lasts unless asked otherwise, and at most.
pub const DEFAULT_TTL_S: u64 = 3600;
pub const MAX_TTL_S: u64 = 7 * 24 * 3600;

/// `POST /v1/hosts/join-tokens` body.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    /// Seconds the token lasts (default 3600, at most a week).
    #[serde(default)]
    pub expires_in_s: Option<u64>,
}

/// A join token, shown once.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct JoinToken {
    pub token: String,
    pub expires_at_ms: u64,
    /// What to run on the new machine (with its name and address filled in).
    pub join_command: String,
}

/// `POST /v1/hosts/join` body: the token and the new host.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JoinRequest {
    pub token: String,
    /// The new host's name (a DNS label).
    pub name: String,
    /// The address the other hosts reach it at.
    #[schema(value_type = String)]
    pub address: std::net::IpAddr,
}

/// What the new host needs: the cluster's store.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Joined {
    pub name: String,
    /// `--store` for its api: `etcd://host:port[,…]/prefix`.
    pub store: String,
}

#[derive(Serialize, Deserialize)]
struct TokenRecord {
    sha256: String,
    expires_at_ms: u64,
    #[serde(default)]
    used_by: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Admission {
    address: std::net::IpAddr,
    at_ms: u64,
}

fn digest(secret: &str) -> String {
    Sha256::digest(secret.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The cluster's store as another machine names it.
fn store_url(state: &AppState) -> Result<String, HostError> {
    match &state.config.store {
        StoreLocation::Etcd(t) => {
            let hosts: Vec<&str> = t.endpoints.iter().map(|e| e.trim_start_matches("http://")).collect();
            Ok(format!("etcd://{}/{}", hosts.join(","), t.prefix.trim_end_matches('/')))
        }
        StoreLocation::Embedded => Err(HostError::EmbeddedStore),
    }
}

/// Makes a join token.
pub async fn make_token(state: &AppState, req: JoinTokenRequest, api_url: &str) -> Result<JoinToken, HostError> {
    store_url(state)?;
    let ttl = req.expires_in_s.unwrap_or(DEFAULT_TTL_S);
    if ttl == 0 || ttl > MAX_TTL_S {
        return Err(HostError::Invalid(format!(
            "expires_in_s must be between 1 and {MAX_TTL_S}, got {ttl}"
        )));
    }
    let id = hex(&rand::random::<[u8; 8]>());
    let secret = hex(&rand::random::<[u8; 24]>());
    let expires_at_ms = now_ms() + ttl * 1000;
    let rec = TokenRecord {
        sha256: digest(&secret),
        expires_at_ms,
        used_by: None,
    };
    state
        .store
        .compare_and_swap(&format!("{TOKENS}{id}"), None, store::encode(&rec))
        .await?;
    let token = format!("hjt_{id}_{secret}");
    Ok(JoinToken {
        join_command: format!("hearth host join --url {api_url} --token {token} --name NAME --address ADDRESS"),
        token,
        expires_at_ms,
    })
}

/// Names a host cannot have: they are routes of `/v1/hosts`.
pub const RESERVED_NAMES: [&str; 2] = ["join", "join-tokens"];

/// A host name: a DNS label, and not one of [`RESERVED_NAMES`].
pub fn check_name(name: &str) -> Result<(), HostError> {
    crate::model::validate_name("host", name).map_err(|e| HostError::Invalid(e.to_string()))?;
    if RESERVED_NAMES.contains(&name) {
        return Err(HostError::Invalid(format!(
            "{name:?} cannot name a host: /v1/hosts/{name} is a route"
        )));
    }
    Ok(())
}

/// Admits a host with a valid token (which is then used up).
pub async fn join(state: &AppState, req: JoinRequest) -> Result<Joined, HostError> {
    check_name(&req.name)?;
    let store = store_url(state)?;
    let refused = || HostError::BadToken;
    let rest = req.token.strip_prefix("hjt_").ok_or_else(refused)?;
    let (id, secret) = rest.split_once('_').ok_or_else(refused)?;
    let key = format!("{TOKENS}{id}");
    let (rec, revision) = store::get_json::<TokenRecord>(state.store.as_ref(), &key)
        .await?
        .ok_or_else(refused)?;
    if rec.used_by.is_some() || rec.expires_at_ms < now_ms() || rec.sha256 != digest(secret) {
        return Err(refused());
    }
    let alive = record::alive(state.store.as_ref()).await?;
    if alive.contains(&req.name) {
        return Err(HostError::Running(req.name));
    }
    let used = TokenRecord {
        used_by: Some(req.name.clone()),
        ..rec
    };
    // Used once: a second join with it loses this compare-and-swap.
    state
        .store
        .compare_and_swap(&key, Some(revision), store::encode(&used))
        .await
        .map_err(|e| match e {
            StoreError::Conflict { .. } => refused(),
            e => e.into(),
        })?;
    let admission = Admission {
        address: req.address,
        at_ms: now_ms(),
    };
    state
        .store
        .put(&format!("{ADMITTED}{}", req.name), store::encode(&admission))
        .await?;
    tracing::info!(host = %req.name, address = %req.address, "host admitted to the cluster");
    state
        .events
        .emit("host", "", serde_json::json!({"name": req.name, "state": "admitted"}));
    Ok(Joined { name: req.name, store })
}

/// Whether this api may run as its host: the host is registered or admitted, or it is
/// the first host of the cluster (which it then makes).
pub async fn check_admitted(state: &AppState) -> Result<(), HostError> {
    let me = &state.config.host.name;
    if record::get(state.store.as_ref(), me).await?.is_some()
        || state.store.get(&format!("{ADMITTED}{me}")).await?.is_some()
    {
        return Ok(());
    }
    if record::list(state.store.as_ref()).await?.is_empty() {
        return Ok(());
    }
    Err(HostError::NotAdmitted(me.clone()))
}
