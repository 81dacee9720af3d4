//! Consoles over WebSockets, proxied to vmm-manager:
//!
//! - `GET /v1/vms/{id}/console`: the serial console (binary frames both ways,
//!   xterm.js-compatible). The first frame carries the scrollback, then live output
//!   follows; with `write=true` (the default) the client's frames are typed into the
//!   guest, one writer at a time, and `takeover=true` takes the keyboard from the client
//!   that has it.
//! - `GET /v1/vms/{id}/vnc`: RFB for noVNC, for QEMU VMs with a display.
//! - `POST /v1/vms/{id}/console/ticket`: browsers cannot set headers on WebSockets, so they
//!   present a ticket (`?ticket=`) instead: bound to one VM, one key and one kind, valid for
//!   [`TICKET_TTL`], good for one connection.
//!
//! A WebSocket upgrade that carries an `Origin` (every browser's does) must come from this
//! server's own origin, so another site cannot open a console with a visitor's ticket.
//! A key with role `viewer` may watch a console but never type.
//!
//! - [`tickets`]: the tickets; [`http`]: the routes and the proxy

pub mod http;
pub mod tickets;
