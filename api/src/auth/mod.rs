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
//!
//! - [`keys`]: keys, users, projects and bindings; [`limit`]: failed authentications;
//!   [`middleware`]: the check in front of every route (what each route needs is in
//!   [`crate::permissions`])

pub mod keys;
pub mod limit;
pub mod middleware;
