//! `GET /v1/events`: server-sent events. Three kinds:
//! - `operation`: an operation started, made progress, succeeded or failed;
//! - `vm`: a VM was created, deleted, started, stopped, rebooted, paused or resumed
//!   (when the operation doing it succeeds);
//! - `audit`: a request that changes something (POST, PUT, PATCH, DELETE) with who made
//!   it and its status, and every refused authentication.
//!
//! `?kinds=vm,operation` and `?project=NAME` filter. Events are not stored: a client
//! sees what happens while it is connected (a slow one is told how many it missed).
//!
//! - [`bus`]: publishing and subscribing; [`http`]: the route

pub mod bus;
pub mod http;
