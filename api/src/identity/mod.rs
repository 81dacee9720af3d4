//! `/v1/projects`, `/v1/projects/{name}/members`, `/v1/users` and `/v1/api-keys`.
//! The middleware in [`crate::auth`] has already checked what the route needs; the work
//! checks what depends on the body or the path (whose key, which project).
//!
//! - [`http`]: the routes (parse, call, map errors)
//! - [`command`]: the request bodies as typed commands, checked without the store
//! - [`projects`], [`users`], [`keys`]: the work
//! - [`access`]: who may see and administer a project
//! - [`error`]: what goes wrong, and its public form

pub mod access;
pub mod command;
pub mod error;
pub mod http;
pub mod keys;
pub mod projects;
pub mod users;
