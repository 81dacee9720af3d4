//! The plumbing every hearth daemon repeats: serving HTTP/JSON on a Unix socket and,
//! for another host's api, over TCP with TLS and a token ([`server`], [`tls`]); the
//! typed routes a daemon's router and its callers share ([`route`]); the one client
//! of every daemon ([`client`]); the error envelope shared by the daemons and the
//! public API ([`error`]); logging setup ([`logging`]) and the configuration file
//! ([`config`]).

pub mod client;
pub mod config;
pub mod error;
pub mod logging;
pub mod route;
pub mod server;
pub mod tls;

pub use client::{Client, ClientError, Endpoint, Streaming, UnixClient};
pub use error::{ApiError, ErrorBody, ErrorEnvelope};
pub use route::Route;
