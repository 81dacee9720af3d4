//! hearth's public REST API: the state store, operations, authentication, the VM
//! endpoints and the console proxy, plus the `hearth` CLI's client code.
//!
//! - [`server`]: wiring, `--all-in-one`
//! - [`store`]: the state store trait and its embedded implementation
//! - [`vms`], [`console`]: `/v1/vms` and its console; [`vm_list`]: the cached listing
//! - [`volumes`]: the `/v1/volumes` endpoints
//! - [`images`]: the `/v1/images` endpoints
//! - [`operations`]: long-running operations
//! - [`events`]: server-sent events at `/v1/events`
//! - [`auth`]: API keys; [`permissions`]: what each route needs, declared in the router table
//! - [`cli`]: the `hearth` command

pub mod auth;
pub mod cli;
pub mod console;
pub mod events;
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
pub mod reconcile;
pub mod server;
pub mod store;
pub mod vm_list;
pub mod vms;
pub mod volumes;
pub mod web;
