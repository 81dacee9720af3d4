//! API keys and bearer authentication.
//!
//! A key reads `hth_<id>_<secret>`. Only the SHA-256 of the secret is stored (under
//! `api-keys/<id>`), so the store never holds a usable key. On first start the api
//! creates an admin key and writes it to `<data dir>/admin.key` (mode 0600).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket_http::ApiError;

use crate::server::AppState;
use crate::store::{self, StateStore};

/// A stored API key (the secret's hash, never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub role: String,
    pub secret_sha256: String,
    pub created_at_ms: u64,
}

fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Splits `hth_<id>_<secret>`.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("hth_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Makes sure an admin key exists and that `<data dir>/admin.key` holds it.
pub async fn ensure_admin_key(store: &dyn StateStore, data_dir: &Path) -> Result<(), ApiError> {
    let path = data_dir.join("admin.key");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if let Some((id, secret)) = parse_key(existing.trim()) {
            if let Some((rec, _)) = store::get_json::<ApiKeyRecord>(store, &format!("api-keys/{id}")).await? {
                if rec.secret_sha256 == hash(secret) {
                    return Ok(());
                }
            }
        }
    }
    let id = random_token(8);
    let secret = random_token(40);
    let rec = ApiKeyRecord {
        id: id.clone(),
        name: "admin".into(),
        role: "admin".into(),
        secret_sha256: hash(&secret),
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    store.put(&format!("api-keys/{id}"), store::encode(&rec)).await?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", tmp.display())))?;
    writeln!(f, "hth_{id}_{secret}").map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::info!(path = %path.display(), "created the admin API key");
    Ok(())
}

/// Checks a presented key against the store.
pub async fn verify(store: &dyn StateStore, key: &str) -> Result<ApiKeyRecord, ApiError> {
    let denied = || ApiError::unauthorized("invalid API key");
    let (id, secret) = parse_key(key).ok_or_else(denied)?;
    let (rec, _) = store::get_json::<ApiKeyRecord>(store, &format!("api-keys/{id}"))
        .await?
        .ok_or_else(denied)?;
    // Compare digests in constant time.
    let a = hash(secret);
    let same = a.len() == rec.secret_sha256.len()
        && a.bytes()
            .zip(rec.secret_sha256.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
    if same {
        Ok(rec)
    } else {
        Err(denied())
    }
}

/// Roles a key may have.
pub const ROLES: [&str; 3] = ["admin", "member", "viewer"];

/// `POST /v1/keys` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
    pub role: String,
}

/// A new key as `POST /v1/keys` answers: the only time the secret is shown.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyCreated {
    pub id: String,
    pub name: String,
    pub role: String,
    /// The key's visible part, `hth_<id>_`, by which it is listed.
    pub prefix: String,
    /// The whole key. Store it now: only its hash is kept.
    pub key: String,
    pub created_at_ms: u64,
}

/// `POST /v1/keys` (admin only): a new key, shown once; only its hash is stored.
#[utoipa::path(post, path = "/v1/keys", tag = "identity", request_body = CreateKey,
    responses((status = 201, description = "The key, shown this once", body = KeyCreated), (status = 403, body = crate::openapi::ErrorResponse), (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn create_key(
    State(state): State<Arc<AppState>>,
    axum::Extension(caller): axum::Extension<ApiKeyRecord>,
    body: axum::body::Bytes,
) -> Result<(axum::http::StatusCode, axum::Json<KeyCreated>), ApiError> {
    if caller.role != "admin" {
        return Err(ApiError::forbidden(format!(
            "creating API keys needs the admin role; this key has role {}",
            caller.role
        )));
    }
    let req: CreateKey = crate::json::parse(&body)?;
    if !ROLES.contains(&req.role.as_str()) {
        return Err(ApiError::unprocessable(format!(
            "role {:?} does not exist: use one of {}",
            req.role,
            ROLES.join(", ")
        )));
    }
    if req.name.trim().is_empty() || req.name.len() > 64 {
        return Err(ApiError::unprocessable("a key needs a name of 1 to 64 characters"));
    }
    let id = random_token(8);
    let secret = random_token(40);
    let rec = ApiKeyRecord {
        id: id.clone(),
        name: req.name,
        role: req.role,
        secret_sha256: hash(&secret),
        created_at_ms: vmm_manager::spec::now_ms(),
    };
    state.store.put(&format!("api-keys/{id}"), store::encode(&rec)).await?;
    Ok((
        axum::http::StatusCode::CREATED,
        axum::Json(KeyCreated {
            prefix: format!("hth_{id}_"),
            key: format!("hth_{id}_{secret}"),
            id,
            name: rec.name,
            role: rec.role,
            created_at_ms: rec.created_at_ms,
        }),
    ))
}

/// A random single-use token (console tickets).
pub fn new_token() -> String {
    random_token(40)
}

/// Middleware: everything except `/health/*`, `/openapi.json`, the web console's files and console
/// WebSockets opened with a ticket needs `Authorization: Bearer <key>`.
pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let path = req.uri().path();
    let web = path == "/" || path.starts_with("/assets/") || path == "/openapi.json";
    // Browsers cannot set headers on WebSockets: those carry a ticket, which the
    // handler checks (see crate::console).
    let ticketed = req.headers().get(axum::http::header::AUTHORIZATION).is_none()
        && path.starts_with("/v1/vms/")
        && (path.ends_with("/console") || path.ends_with("/vnc"))
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("ticket=")));
    if path.starts_with("/health/") || web || ticketed {
        return Ok(next.run(req).await);
    }
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| ApiError::unauthorized("missing Authorization: Bearer <api key> header"))?;
    let key = header
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::unauthorized("the Authorization header must be 'Bearer <api key>'"))?;
    match verify(state.store.as_ref(), key.trim()).await {
        Ok(rec) => {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let who = (rec.id.clone(), rec.name.clone(), rec.role.clone());
            req.extensions_mut().insert(rec);
            let resp = next.run(req).await;
            // Audit: every request that changes something, with who made it.
            if !matches!(
                method,
                axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
            ) {
                state.events.emit(
                    "audit",
                    crate::vms::PROJECT,
                    serde_json::json!({
                        "key_id": who.0, "key_name": who.1, "role": who.2,
                        "method": method.as_str(), "path": path, "status": resp.status().as_u16(),
                    }),
                );
            }
            Ok(resp)
        }
        Err(e) => {
            tracing::warn!(path = %req.uri().path(), "rejected request: {}", e.message());
            state.events.emit(
                "audit",
                crate::vms::PROJECT,
                serde_json::json!({
                    "method": req.method().as_str(), "path": req.uri().path(),
                    "status": e.status.as_u16(), "refused": e.message(),
                }),
            );
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn admin_key_is_created_once_stored_hashed_and_verified() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("s")).expect("store");
        ensure_admin_key(&store, dir.path()).await.expect("create");
        let key = std::fs::read_to_string(dir.path().join("admin.key")).expect("key file");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("admin.key"))
            .expect("meta")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        ensure_admin_key(&store, dir.path()).await.expect("again");
        assert_eq!(
            std::fs::read_to_string(dir.path().join("admin.key")).expect("key"),
            key,
            "kept on restart"
        );
        let rec = verify(&store, key.trim()).await.expect("valid key");
        assert_eq!(rec.role, "admin");
        let raw = store.list("api-keys/").await.expect("list");
        let (_, secret) = parse_key(key.trim()).expect("format");
        assert!(
            !String::from_utf8_lossy(&raw[0].1.value).contains(secret),
            "secret never stored"
        );
        let mut wrong = key.trim().to_string();
        wrong.pop();
        wrong.push('!');
        assert_eq!(verify(&store, &wrong).await.err().map(|e| e.status.as_u16()), Some(401));
        assert!(verify(&store, "nonsense").await.is_err());
    }
}
