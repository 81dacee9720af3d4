//! The plumbing every hearth daemon repeats: serving HTTP/JSON on a Unix socket
//! ([`server`]), calling such a socket ([`client`]), the error envelope shared by the
//! daemons and the public API ([`error`]), and logging setup ([`logging`]).

pub mod client;
pub mod error;
pub mod logging;
pub mod server;

pub use client::{ClientError, UnixClient};
pub use error::{ApiError, ErrorBody, ErrorEnvelope};
