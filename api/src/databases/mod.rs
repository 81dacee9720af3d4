//! `/v1/databases`: managed PostgreSQL, each database a VM from the `postgres` image
//! with its data on a hearth volume of its own.
//!
//! - [`command`]: create and change requests, checked without a stack
//! - [`record`]: the database as the store keeps it, and its public view
//! - [`create`] / [`delete`]: the sagas (volume, VM, seed, start, readiness)
//! - [`pki`]: hearth's database CA and the servers' certificates
//! - [`certs`]: renewing the servers' certificates before they expire
//! - [`probe`]: readiness, a real query over TLS with the real password
//! - [`agent`]: requests to the guest agent (password, settings, growing, logs, stats)
//! - [`http`]: the routes
//! - [`error`]: what goes wrong, and its public form
//!
//! The password is shown once (or given by the user) and kept nowhere in plain text:
//! the seed and the store hold only its SCRAM-SHA-256 verifier.

pub mod agent;
pub mod certs;
pub mod change;
pub mod command;
pub mod create;
pub mod delete;
pub mod error;
pub mod http;
pub mod pki;
pub mod probe;
pub mod record;
