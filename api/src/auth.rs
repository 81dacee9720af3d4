//! Who may do what: API keys, users, projects and roles, and the middleware that
//! checks every request.
//!
//! - A key reads `hth_<id>_<secret>`. Only the SHA-256 of the secret is stored (under
//!   `api-keys/<id>`), so the store never holds a usable key. Keys belong to a user,
//!   may expire, and can be revoked. On first start the api creates the user `admin`
//!   (a hearth administrator) and a key for it in `<data dir>/admin.key` (mode 0600).
//! - Every resource belongs to a project; a request works in `?project=` (default
//!   `default`). A user has a role per project: `viewer` reads, `member` also creates,
//!   changes and deletes VMs, volumes and networks and types on consoles, `admin` also
//!   manages the project's members. Hearth administrators may do everything
//!   everywhere, and alone manage projects, users, the image cache and metrics.
//! - A request without the permission gets 403 naming it. Failed authentications are
//!   logged, audited and limited per client address (429 with `Retry-After`).

use std::collections::HashMap;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use socket_http::ApiError;

use crate::permissions::{Permission, RouteTable};
use crate::server::AppState;
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
) -> Result<(ApiKeyRecord, String), ApiError> {
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

/// The project a request names (`?project=`), or `default`.
fn requested_project(req: &Request) -> Result<String, ApiError> {
    #[derive(Deserialize)]
    struct Q {
        project: Option<String>,
    }
    let q: Q = serde_urlencoded::from_str(req.uri().query().unwrap_or_default())
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {e}")))?;
    let p = q.project.unwrap_or_else(|| DEFAULT_PROJECT.into());
    crate::model::validate_name("project", &p)?;
    Ok(p)
}

/// Failed authentications per client address: after `limit` within [`FAILURE_WINDOW`],
/// further attempts from that address are refused with 429 until the window has passed.
pub struct AuthFailures {
    by_addr: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    limit: u32,
}

/// The default limit (`hearth-api --auth-failures-per-minute`).
pub const FAILURE_LIMIT: u32 = 10;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

impl AuthFailures {
    /// `limit` failures per minute and address; 0 turns the limit off.
    pub fn new(limit: u32) -> Self {
        Self {
            by_addr: Mutex::default(),
            limit,
        }
    }

    /// Seconds to wait when `addr` is over the limit.
    fn blocked(&self, addr: IpAddr) -> Option<u64> {
        let map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        let (start, n) = map.get(&addr)?;
        let elapsed = start.elapsed();
        (self.limit > 0 && *n >= self.limit && elapsed < FAILURE_WINDOW)
            .then(|| (FAILURE_WINDOW - elapsed).as_secs().max(1))
    }

    fn record(&self, addr: IpAddr) {
        let mut map = self.by_addr.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, (t, _)| t.elapsed() < FAILURE_WINDOW);
        }
        let e = map.entry(addr).or_insert((Instant::now(), 0));
        if e.0.elapsed() >= FAILURE_WINDOW {
            *e = (Instant::now(), 0);
        }
        e.1 += 1;
    }
}

/// Middleware: authenticates the key, works out the project and the caller's role in
/// it, and refuses what the role does not allow, before any handler runs.
pub async fn require_key(
    State((state, routes)): State<(Arc<AppState>, Arc<RouteTable>)>,
    mut req: Request,
    next: Next,
) -> Response {
    match authorize(&state, &routes, &mut req).await {
        Ok(None) => next.run(req).await,
        Ok(Some(caller)) => {
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            req.extensions_mut().insert(caller.clone());
            let resp = next.run(req).await;
            // Audit: every request that changes something, with who made it.
            if !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS) {
                state.events.emit(
                    "audit",
                    &caller.project,
                    serde_json::json!({
                        "key_id": caller.key_id, "key_name": caller.key_name, "user": caller.user,
                        "role": caller.role, "method": method.as_str(), "path": path,
                        "status": resp.status().as_u16(),
                    }),
                );
            }
            resp
        }
        Err(e) => {
            tracing::warn!(path = %req.uri().path(), status = e.status.as_u16(), "refused request: {}", e.message());
            state.events.emit(
                "audit",
                DEFAULT_PROJECT,
                serde_json::json!({
                    "method": req.method().as_str(), "path": req.uri().path(),
                    "status": e.status.as_u16(), "refused": e.message(),
                }),
            );
            let retry = (e.status == axum::http::StatusCode::TOO_MANY_REQUESTS)
                .then(|| e.body.details.as_ref().and_then(|d| d["retry_after_seconds"].as_u64()))
                .flatten();
            let mut resp = e.into_response();
            if let Some(s) = retry {
                if let Ok(v) = axum::http::HeaderValue::from_str(&s.to_string()) {
                    resp.headers_mut().insert(axum::http::header::RETRY_AFTER, v);
                }
            }
            resp
        }
    }
}

/// `Ok(None)`: a public route (or a console opened with a ticket, which its handler
/// checks). `Ok(Some(caller))`: allowed.
async fn authorize(state: &AppState, routes: &RouteTable, req: &mut Request) -> Result<Option<Caller>, ApiError> {
    let path = req.uri().path().to_string();
    let route = req.extensions().get::<MatchedPath>().map(|m| m.as_str().to_string());
    let need = routes.need(req.method(), route.as_deref());
    // Browsers cannot set headers on WebSockets: those carry a ticket, which the
    // handler checks (see crate::console).
    let ticketed = req.headers().get(axum::http::header::AUTHORIZATION).is_none()
        && matches!(route.as_deref(), Some("/v1/vms/{id}/console" | "/v1/vms/{id}/vnc"))
        && req
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|kv| kv.starts_with("ticket=")));
    if need == Permission::Undeclared {
        return Err(ApiError::forbidden(format!(
            "{} {path} declares no permission, so it is refused to every key",
            req.method()
        )));
    }
    if need == Permission::Public || ticketed {
        return Ok(None);
    }
    let addr = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    if let Some(wait) = addr.and_then(|a| state.auth_failures.blocked(a)) {
        return Err(ApiError::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too_many_failures",
            format!("too many failed authentications from this address; retry in {wait} s"),
        )
        .with_details(serde_json::json!({"retry_after_seconds": wait})));
    }
    let fail = |e: ApiError| {
        if let Some(a) = addr {
            state.auth_failures.record(a);
        }
        e
    };
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|h| h.to_str().ok())
        .ok_or_else(|| fail(ApiError::unauthorized("missing Authorization: Bearer <api key> header")))?;
    let key = header.strip_prefix("Bearer ").ok_or_else(|| {
        fail(ApiError::unauthorized(
            "the Authorization header must be 'Bearer <api key>'",
        ))
    })?;
    let rec = match verify(state.store.as_ref(), key.trim()).await {
        Ok(rec) => rec,
        Err(e) if e.status == axum::http::StatusCode::UNAUTHORIZED => return Err(fail(e)),
        Err(e) => return Err(e),
    };
    let user = store::get_json::<User>(state.store.as_ref(), &user_key(&rec.user))
        .await?
        .map(|(u, _)| u)
        .ok_or_else(|| {
            fail(ApiError::unauthorized(format!(
                "the user {:?} of this key no longer exists",
                rec.user
            )))
        })?;
    let project = requested_project(req)?;
    let role = if user.admin {
        Some("admin".to_string())
    } else {
        store::get_json::<Binding>(state.store.as_ref(), &binding_key(&project, &user.name))
            .await?
            .map(|(b, _)| b.role)
    };
    let caller = Caller {
        key_id: rec.id,
        key_name: rec.name,
        user: user.name.clone(),
        admin: user.admin,
        project: project.clone(),
        role: role.clone(),
    };
    match need {
        Permission::Public | Permission::SignedIn(_) | Permission::Undeclared => {}
        Permission::Admin(perm) => {
            if !user.admin {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: only hearth administrators have it, and user {} is not one",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm})));
            }
        }
        Permission::Project { name: perm, write } => {
            if user.admin
                && store::get_json::<Project>(state.store.as_ref(), &project_key(&project))
                    .await?
                    .is_none()
            {
                return Err(ApiError::not_found(format!("project {project:?} does not exist")));
            }
            let Some(role) = role else {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: user {} has no role in project {project}",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm, "project": project})));
            };
            if write && role == "viewer" {
                return Err(ApiError::forbidden(format!(
                    "permission {perm} denied: user {} has role viewer in project {project}, which only reads",
                    user.name
                ))
                .with_details(serde_json::json!({"permission": perm, "project": project, "role": role})));
            }
        }
    }
    Ok(Some(caller))
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
