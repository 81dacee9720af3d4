//! The plumbing every hearth daemon repeats: serving HTTP/JSON on a Unix socket
//! ([`server`]), calling such a socket ([`client`]), the error envelope shared by the
//! daemons and the public API ([`error`]), logging setup ([`logging`]) and the configuration file ([`config`]).

pub mod client;
pub mod config;
pub mod error;
pub mod logging;
pub mod route;
pub mod server;

pub use client::{ClientError, Streaming, UnixClient};
pub use error::{ApiError, ErrorBody, ErrorEnvelope};
