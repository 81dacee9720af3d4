//! The permissions routes need, declared where each route is registered (the router
//! table in [`crate::server`]) and denied by default.
//!
//! Each route is registered through [`permit`], which writes its permission into the
//! route's OpenAPI operation as a security scope (so clients read it in
//! `docs/openapi.json` too). [`RouteTable::from_document`] reads the scopes back when
//! the router is built and panics on an operation that declares none or an unknown
//! one: a route added without a permission fails every test that builds the router.
//! The authentication middleware looks each request's route up in that table.

use std::collections::HashMap;

use axum::http::Method;
use utoipa::openapi::path::Paths;
use utoipa::openapi::security::SecurityRequirement;

/// The name of the bearer security scheme in the OpenAPI document.
pub const SCHEME: &str = "api_key";

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// No key at all: health, the OpenAPI document, the web console's files.
    Public,
    /// Any valid key; the handler narrows it (a user's own API keys, the projects a
    /// user belongs to, members for a project's admins).
    SignedIn(&'static str),
    /// A role in the request's project: every role reads, `member` and `admin` write.
    Project { name: &'static str, write: bool },
    /// A hearth administrator only.
    Admin(&'static str),
    /// A route the router serves that declares no permission: refused to everyone.
    Undeclared,
}

use Permission::{Admin, Project, SignedIn};

const fn read(name: &'static str) -> Permission {
    Project { name, write: false }
}
const fn write(name: &'static str) -> Permission {
    Project { name, write: true }
}

pub const VMS_READ: Permission = read("vms.read");
pub const VMS_WRITE: Permission = write("vms.write");
/// Opening a console to watch; typing is checked by the console handler.
pub const CONSOLES_READ: Permission = read("consoles.read");
pub const VOLUMES_READ: Permission = read("volumes.read");
pub const VOLUMES_WRITE: Permission = write("volumes.write");
pub const DATABASES_READ: Permission = read("databases.read");
pub const DATABASES_WRITE: Permission = write("databases.write");
pub const NETWORKS_READ: Permission = read("networks.read");
pub const NETWORKS_WRITE: Permission = write("networks.write");
pub const IMAGES_READ: Permission = read("images.read");
pub const IMAGES_WRITE: Permission = Admin("images.write");
pub const OPERATIONS_READ: Permission = read("operations.read");
pub const EVENTS_READ: Permission = read("events.read");
pub const METRICS_READ: Permission = Admin("metrics.read");
pub const USERS_READ: Permission = Admin("users.read");
pub const HOSTS_READ: Permission = Admin("hosts.read");
pub const HOSTS_WRITE: Permission = Admin("hosts.write");
pub const USERS_WRITE: Permission = Admin("users.write");
pub const PROJECTS_WRITE: Permission = Admin("projects.write");
/// The projects the caller belongs to (all of them for administrators).
pub const PROJECTS_READ: Permission = SignedIn("projects.read");
/// A project's members: read by its members, changed by its admins (the handler checks).
pub const MEMBERS_READ: Permission = SignedIn("members.read");
pub const MEMBERS_WRITE: Permission = SignedIn("members.write");
/// A user's own API keys (administrators: everyone's).
pub const API_KEYS: Permission = SignedIn("api-keys.own");

/// Every permission a route may declare.
pub const ALL: &[Permission] = &[
    HOSTS_READ,
    HOSTS_WRITE,
    VMS_READ,
    VMS_WRITE,
    CONSOLES_READ,
    VOLUMES_READ,
    VOLUMES_WRITE,
    DATABASES_READ,
    DATABASES_WRITE,
    NETWORKS_READ,
    NETWORKS_WRITE,
    IMAGES_READ,
    IMAGES_WRITE,
    OPERATIONS_READ,
    EVENTS_READ,
    METRICS_READ,
    USERS_READ,
    USERS_WRITE,
    PROJECTS_WRITE,
    PROJECTS_READ,
    MEMBERS_READ,
    MEMBERS_WRITE,
    API_KEYS,
];

impl Permission {
    /// The name a 403 and the OpenAPI document give it (`None` for public routes).
    pub fn name(self) -> Option<&'static str> {
        match self {
            Permission::Public | Permission::Undeclared => None,
            SignedIn(n) | Project { name: n, .. } | Admin(n) => Some(n),
        }
    }

    fn by_name(name: &str) -> Option<Self> {
        ALL.iter().copied().find(|p| p.name() == Some(name))
    }

    /// The OpenAPI security requirement that declares it.
    fn requirement(self) -> SecurityRequirement {
        assert!(self != Permission::Undeclared, "a route cannot be declared undeclared");
        match self.name() {
            None => SecurityRequirement::default(),
            Some(n) => SecurityRequirement::new(SCHEME, [n]),
        }
    }
}

/// Declares the permission of the routes in one `routes!(…)` entry of the router
/// table: every operation in it gets `permission` as its security requirement.
pub fn permit<S>(
    permission: Permission,
    (schemas, mut paths, method_router): utoipa_axum::router::UtoipaMethodRouter<S>,
) -> utoipa_axum::router::UtoipaMethodRouter<S> {
    declare(&mut paths, permission);
    (schemas, paths, method_router)
}

fn declare(paths: &mut Paths, permission: Permission) {
    for item in paths.paths.values_mut() {
        for op in operations_mut(item) {
            op.security = Some(vec![permission.requirement()]);
        }
    }
}

fn operations_mut(
    item: &mut utoipa::openapi::path::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        &mut item.get,
        &mut item.post,
        &mut item.put,
        &mut item.delete,
        &mut item.patch,
        &mut item.head,
        &mut item.options,
    ]
    .into_iter()
    .flatten()
}

/// The permission of an operation as declared in the document: `Ok(None)` when it
/// declares none.
pub fn declared(op: &utoipa::openapi::path::Operation) -> Result<Option<Permission>, String> {
    let Some(reqs) = &op.security else {
        return Ok(None);
    };
    let value = serde_json::to_value(reqs).map_err(|e| e.to_string())?;
    match value.as_array().map(Vec::as_slice) {
        Some([one]) if one.as_object().is_some_and(|o| o.is_empty()) => Ok(Some(Permission::Public)),
        Some([one]) => match one[SCHEME].as_array().map(Vec::as_slice) {
            Some([scope]) => {
                let scope = scope.as_str().unwrap_or_default();
                Permission::by_name(scope)
                    .map(Some)
                    .ok_or_else(|| format!("unknown permission {scope:?}"))
            }
            _ => Err(format!("one {SCHEME} scope expected, not {one}")),
        },
        _ => Err(format!("one security requirement expected, not {value}")),
    }
}

/// Each routed method and path template's permission.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: HashMap<(Method, String), Permission>,
    paths: std::collections::HashSet<String>,
}

impl RouteTable {
    /// Reads every operation's declared permission.
    ///
    /// # Panics
    /// When an operation declares no permission or an unknown one: the router must not
    /// be built with such a route.
    pub fn from_document(doc: &utoipa::openapi::OpenApi) -> Self {
        let mut table = Self::default();
        for (path, item) in &doc.paths.paths {
            for (method, op) in [
                (Method::GET, &item.get),
                (Method::POST, &item.post),
                (Method::PUT, &item.put),
                (Method::DELETE, &item.delete),
                (Method::PATCH, &item.patch),
                (Method::HEAD, &item.head),
                (Method::OPTIONS, &item.options),
            ] {
                let Some(op) = op else { continue };
                match declared(op) {
                    Ok(Some(p)) => table.insert(method, path, p),
                    Ok(None) => {
                        panic!("route {method} {path} declares no permission: register it with permissions::permit")
                    }
                    Err(e) => panic!("route {method} {path}: {e}"),
                }
            }
        }
        table
    }

    /// A route registered outside the document (the web console's files).
    pub fn insert(&mut self, method: Method, path: &str, permission: Permission) {
        self.paths.insert(path.to_string());
        self.routes.insert((method, path.to_string()), permission);
    }

    /// What a request to `route` (the matched path template, if any route matched)
    /// with `method` needs. A path the router does not know, or a method it does not
    /// route there, needs a valid key and then gets the router's 404 or 405: no handler
    /// runs for either.
    pub fn need(&self, method: &Method, route: Option<&str>) -> Permission {
        const UNROUTED: Permission = SignedIn("");
        let Some(route) = route else { return UNROUTED };
        // axum answers HEAD with the GET handler.
        let method = if method == Method::HEAD { &Method::GET } else { method };
        match self.routes.get(&(method.clone(), route.to_string())) {
            Some(p) => *p,
            None if self.paths.contains(route) => UNROUTED,
            // A matched route missing from the table is a route registered without a
            // permission: refused.
            None => Permission::Undeclared,
        }
    }

    pub fn len(&self) -> usize {
        self.routes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_round_trip_through_the_document() {
        let mut names: Vec<_> = ALL.iter().filter_map(|p| p.name()).collect();
        names.sort_unstable();
        let n = names.len();
        names.dedup();
        assert_eq!(names.len(), n, "two permissions share a name");
        for p in ALL.iter().copied().chain([Permission::Public]) {
            let op = utoipa::openapi::path::OperationBuilder::new()
                .security(p.requirement())
                .build();
            assert_eq!(declared(&op), Ok(Some(p)));
        }
    }

    #[test]
    fn an_undeclared_or_unknown_permission_is_an_error() {
        let op = utoipa::openapi::path::OperationBuilder::new().build();
        assert_eq!(declared(&op), Ok(None));
        let op = utoipa::openapi::path::OperationBuilder::new()
            .security(SecurityRequirement::new(SCHEME, ["vms.everything"]))
            .build();
        assert!(declared(&op).expect_err("unknown").contains("vms.everything"));
    }

    #[test]
    fn unknown_routes_need_a_key_and_routes_missing_from_the_table_are_refused() {
        let mut t = RouteTable::default();
        t.insert(Method::GET, "/v1/vms", VMS_READ);
        assert_eq!(t.need(&Method::GET, Some("/v1/vms")), VMS_READ);
        assert_eq!(
            t.need(&Method::HEAD, Some("/v1/vms")),
            VMS_READ,
            "HEAD runs the GET handler"
        );
        assert_eq!(t.need(&Method::PUT, Some("/v1/vms")), SignedIn(""), "a 405");
        assert_eq!(t.need(&Method::GET, None), SignedIn(""), "a 404");
        assert_eq!(t.need(&Method::GET, Some("/v1/secret")), Permission::Undeclared);
    }
}
