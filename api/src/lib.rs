//! hearth's public REST API and the wiring that runs it (`--all-in-one` runs the four
//! daemons in the same process). The layout, bottom to top (docs/architecture.md has
//! the rules; `api/tests/layout.rs` holds the code to them):
//!
//! - [`store`]: the state store (the `hearth-store` crate, re-exported); [`model`]: records and view
//!   types; [`permissions`], [`openapi`], [`json`]: what routes declare and parse
//! - [`daemons`]: the daemons' names and what their errors mean; [`envelope`]: how the
//!   resources' typed errors become the public error envelope
//! - [`state`]: what every handler and task reaches, the daemons' health included
//! - [`auth`]: keys and the middleware; [`events`], [`operations`]: the event bus and
//!   long-running operations; [`saga`]: composite changes as recorded steps (its
//!   [`saga::error`] is the engine's own, below the state);
//!   [`intents`], [`idempotency`]
//! - one folder or file per resource, each with its HTTP edge: [`vms`], [`volumes`],
//!   [`networks`], [`images`], [`identity`], [`console`], [`metrics`]; a resource folder's
//!   errors are typed (its `error.rs`) and become the public envelope only in its
//!   `http.rs`
//! - [`reconcile`]: repairs after crashes and drift; [`server`]: the router and `run`
//!
//! The `hearth` CLI is the `hearth-cli` crate.

pub use hearth_store as store;

pub mod auth;
pub mod console;
pub mod daemons;
pub mod databases;
pub mod envelope;
pub mod events;
pub mod hosts;
pub mod idempotency;
pub mod identity;
pub mod images;
pub mod intents;
pub mod json;
pub mod metrics;
pub mod model;
pub mod networks;
pub mod openapi;
pub mod operations;
pub mod permissions;
pub mod pki;
pub mod reconcile;
pub mod saga;
pub mod server;
pub mod state;
pub mod vms;
pub mod volumes;
pub mod web;
