//! API keys, users, projects and role bindings as stored, and checking a presented key.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket_http::ApiError;

use crate::store::{self, StateStore};

pub const DEFAULT_PROJECT: &str = "default";

pub const ADMIN_USER: &str = "admin";

/// Roles a user may have in a project, weakest first.
pub const ROLES: [&str; 3] = ["viewer", "member", "admin"];

/// A stored API key (the secret's hash, never the secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    /// The user the key acts as. (Keys from before users existed carry only `role`
    /// and are given a user at start; see [`migrate`].)
    #[serde(default)]
    pub user: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub role: String,
    pub secret_sha256: String,
    pub created_at_ms: u64,
    #[serde(default)]
    pub expires_at_ms: Option<u64>,
    #[serde(default)]
    pub revoked_at_ms: Option<u64>,
}

/// A user: someone API keys act for.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct User {
    pub name: String,
    /// A hearth administrator: every permission in every project.
    pub admin: bool,
    pub created_at_ms: u64,
}

/// A project: the boundary resources live in.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Project {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub created_at_ms: u64,
}

/// A user's role in a project.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Binding {
    pub project: String,
    pub user: String,
    /// `viewer`, `member` or `admin`.
    pub role: String,
}

pub fn key_key(id: &str) -> String {
    format!("api-keys/{id}")
}

pub fn user_key(name: &str) -> String {
    format!("users/{name}")
}

pub fn project_key(name: &str) -> String {
    format!("projects/{name}")
}

pub fn binding_key(project: &str, user: &str) -> String {
    format!("bindings/{project}/{user}")
}

/// Who is calling, and in which project: put into every authenticated request's
/// extensions by [`require_key`].
#[derive(Debug, Clone)]
pub struct Caller {
    pub key_id: String,
    pub key_name: String,
    pub user: String,
    pub admin: bool,
    pub project: String,
    /// The user's role in `project` (`admin` for hearth administrators).
    pub role: Option<String>,
}

impl Caller {
    /// Whether the caller may type on consoles (and make other changes) here.
    pub fn may_write(&self) -> bool {
        self.admin || matches!(self.role.as_deref(), Some("member" | "admin"))
    }
    /// Whether the caller administers the project (its members).
    pub fn project_admin(&self) -> bool {
        self.admin || self.role.as_deref() == Some("admin")
    }
}

pub(crate) fn hash(secret: &str) -> String {
    let digest = Sha256::digest(secret.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(crate) fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// A random single-use token (console tickets).
pub fn new_token() -> String {
    random_token(40)
}

/// Splits `hth_<id>_<secret>`.
fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix("hth_")?;
    let (id, secret) = rest.split_once('_')?;
    (!id.is_empty() && !secret.is_empty()).then_some((id, secret))
}

/// Makes a new key for `user`; returns the record and the whole key (shown once).
pub async fn issue_key(
    store: &dyn StateStore,
    user: &str,
    name: &str,
    expires_at_ms: Option<u64>,
) -> Result<(ApiKeyRecord, String), store::StoreError> {
    let id = random_token(8);
    let secret = random_token(40);
    let rec = ApiKeyRecord {
        id: id.clone(),
        name: name.to_string(),
        user: user.to_string(),
        role: String::new(),
        secret_sha256: hash(&secret),
        created_at_ms: vmm_manager::spec::now_ms(),
        expires_at_ms,
        revoked_at_ms: None,
    };
    store.compare_and_swap(&key_key(&id), None, store::encode(&rec)).await?;
    Ok((rec, format!("hth_{id}_{secret}")))
}

/// The project `default`, the administrator `admin` and keys from before users existed
/// (each becomes a user of its own with its old role in `default`).
pub async fn migrate(store: &dyn StateStore) -> Result<(), ApiError> {
    let now = vmm_manager::spec::now_ms();
    if store.get(&project_key(DEFAULT_PROJECT)).await?.is_none() {
        let p = Project {
            name: DEFAULT_PROJECT.into(),
            description: "The project requests use when they name none".into(),
            created_at_ms: now,
        };
        let _ = store
            .compare_and_swap(&project_key(DEFAULT_PROJECT), None, store::encode(&p))
            .await;
    }
    if store.get(&user_key(ADMIN_USER)).await?.is_none() {
        let u = User {
            name: ADMIN_USER.into(),
            admin: true,
            created_at_ms: now,
        };
        let _ = store
            .compare_and_swap(&user_key(ADMIN_USER), None, store::encode(&u))
            .await;
    }
    for (mut rec, rev) in store::list_json::<ApiKeyRecord>(store, "api-keys/").await? {
        if !rec.user.is_empty() {
            continue;
        }
        if rec.role == "admin" {
            rec.user = ADMIN_USER.into();
        } else {
            rec.user = format!("key-{}", rec.id);
            let u = User {
                name: rec.user.clone(),
                admin: false,
                created_at_ms: now,
            };
            store.put(&user_key(&rec.user), store::encode(&u)).await?;
            let role = if ROLES.contains(&rec.role.as_str()) {
                rec.role.clone()
            } else {
                "viewer".into()
            };
            let b = Binding {
                project: DEFAULT_PROJECT.into(),
                user: rec.user.clone(),
                role,
            };
            store
                .put(&binding_key(DEFAULT_PROJECT, &rec.user), store::encode(&b))
                .await?;
        }
        rec.role.clear();
        let _ = store
            .compare_and_swap(&key_key(&rec.id), Some(rev), store::encode(&rec))
            .await;
    }
    Ok(())
}

/// Makes sure the admin user has a key and that `<data dir>/admin.key` holds it.
pub async fn ensure_admin_key(store: &dyn StateStore, data_dir: &Path) -> Result<(), ApiError> {
    migrate(store).await?;
    let path = data_dir.join("admin.key");
    if let Ok(existing) = std::fs::read_to_string(&path) {
        if verify(store, existing.trim()).await.is_ok() {
            return Ok(());
        }
    }
    let (_, key) = issue_key(store, ADMIN_USER, "admin", None).await?;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| ApiError::internal(format!("cannot write {}: {e}", tmp.display())))?;
    writeln!(f, "{key}").map_err(|e| ApiError::internal(e.to_string()))?;
    std::fs::rename(&tmp, &path).map_err(|e| ApiError::internal(e.to_string()))?;
    tracing::info!(path = %path.display(), "created the admin API key");
    Ok(())
}

/// Checks a presented key against the store: known, matching, not expired, not revoked.
pub async fn verify(store: &dyn StateStore, key: &str) -> Result<ApiKeyRecord, ApiError> {
    let denied = || ApiError::unauthorized("invalid API key");
    let (id, secret) = parse_key(key).ok_or_else(denied)?;
    let (rec, _) = store::get_json::<ApiKeyRecord>(store, &key_key(id))
        .await?
        .ok_or_else(denied)?;
    // Compare digests in constant time.
    let a = hash(secret);
    let same = a.len() == rec.secret_sha256.len()
        && a.bytes()
            .zip(rec.secret_sha256.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0;
    if !same {
        return Err(denied());
    }
    if rec.revoked_at_ms.is_some() {
        return Err(ApiError::unauthorized(format!("API key hth_{id}_ was revoked")));
    }
    if rec.expires_at_ms.is_some_and(|t| t <= vmm_manager::spec::now_ms()) {
        return Err(ApiError::unauthorized(format!("API key hth_{id}_ has expired")));
    }
    Ok(rec)
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
        assert_eq!(rec.user, ADMIN_USER);
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

    #[tokio::test]
    async fn keys_from_before_users_get_a_user_and_keep_their_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = crate::store::embedded::EmbeddedStore::open(&dir.path().join("s")).expect("store");
        let old = serde_json::json!({"id": "abc", "name": "watcher", "role": "viewer",
            "secret_sha256": hash("s3cret"), "created_at_ms": 1});
        store
            .put("api-keys/abc", old.to_string().into_bytes())
            .await
            .expect("put");
        migrate(&store).await.expect("migrate");
        let rec = verify(&store, "hth_abc_s3cret").await.expect("still valid");
        assert_eq!(rec.user, "key-abc");
        let (b, _) = store::get_json::<Binding>(&store, &binding_key(DEFAULT_PROJECT, "key-abc"))
            .await
            .expect("get")
            .expect("binding");
        assert_eq!(b.role, "viewer");
    }
}
