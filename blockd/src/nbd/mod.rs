//! NBD: a server that exports [`BlockDevice`](crate::device::BlockDevice)s and a client
//! that reaches exports on other hosts.
//!
//! The protocol (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>),
//! as spoken here, fixed newstyle only:
//!
//! 1. **Greeting.** The server sends `NBDMAGIC`, `IHAVEOPT` and its handshake flags
//!    (`FIXED_NEWSTYLE | NO_ZEROES`); the client answers with its flags.
//! 2. **Options.** The client sends options (`IHAVEOPT`, option, length, data), and
//!    the server answers each with option replies ending in `NBD_REP_ACK` or an error
//!    reply: `NBD_OPT_LIST` lists the exports, `NBD_OPT_STRUCTURED_REPLY` turns on
//!    chunked read replies, `NBD_OPT_INFO` describes an export (size, transmission
//!    flags, block sizes, name, description), `NBD_OPT_ABORT` ends the connection,
//!    `NBD_OPT_STARTTLS` switches the connection to TLS (the options then start over
//!    inside it; a server that requires TLS answers every other option before it with
//!    `NBD_REP_ERR_TLS_REQD`), and unknown options get `NBD_REP_ERR_UNSUP`.
//! 3. **Choosing the export.** `NBD_OPT_GO` (like `INFO`, then transmission) or the
//!    older `NBD_OPT_EXPORT_NAME` (size and flags, and a hang-up when the export does
//!    not exist) end the handshake. The server times the handshake out so a silent
//!    peer cannot hold a connection slot.
//! 4. **Transmission.** The client sends 28-byte requests (magic, flags, command,
//!    cookie, offset, length; a write's data follows) without waiting for replies; the
//!    server may answer in any order, each reply naming its cookie. Reads get a simple
//!    reply followed by the data, or with structured replies one `OFFSET_DATA` chunk
//!    (or an `ERROR` chunk). Errors are per request (`EINVAL` for bad ranges and
//!    commands, `ENOSPC` for writes past the end, `EPERM` on read-only exports) and
//!    leave the connection usable; a request with bad magic ends it. `NBD_CMD_DISC`
//!    closes after the replies in flight.
//!
//! [`proto`] holds the byte-level encoding, [`server`] the server (its transmission
//! phase runs on threads, in `transmission`), [`client`] the client and the
//! [`NbdDevice`] adapter, [`tls`] the certificates both sides load.

pub mod client;
pub mod proto;
pub mod server;
pub mod tls;
mod tls_socket;
mod transmission;

pub use client::{ClientError, ExportInfo, NbdAddress, NbdClient, NbdDevice, ReconnectPolicy};
pub use server::{ExportOptions, NbdServer, ResizeRefused, Resizer, ServerConfig, ServerError, ShutdownHandle};
pub use tls::{ClientTls, ClientTlsFiles, ServerTls, ServerTlsFiles, TlsError};
