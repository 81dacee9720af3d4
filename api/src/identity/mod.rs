//! `/v1/projects`, `/v1/projects/{name}/members`, `/v1/users` and `/v1/api-keys`.
//! The middleware in [`crate::auth`] has already checked what the route needs; these
//! handlers check what depends on the body or the path (whose key, which project).
//!
//! - [`projects`], [`users`], [`keys`]: the routes
//! - [`command`]: the request bodies as typed commands, checked without the store
//! - [`access`]: who may see and administer a project

pub mod access;
pub mod command;
pub mod keys;
pub mod projects;
pub mod users;
