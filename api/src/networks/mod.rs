//! `/v1/networks`: create, list, show, delete. netd does the work; the api records the
//! network (so it knows which exist even while netd is down) and refuses to delete a
//! network that VMs are attached to.
//!
//! - [`http`]: the routes (parse, call, map errors)
//! - [`command`]: a create request checked without netd
//! - [`view`]: the public types, the api's own (netd's wire types stay behind the edge)
//! - [`work`]: records in the store, the default network, removal
//! - [`overlay`]: networks across hosts (one VXLAN segment, addresses handed out once)
//! - [`error`]: what goes wrong, and its public form

pub mod command;
pub mod error;
pub mod http;
pub mod overlay;
pub mod view;
pub mod work;

pub use work::{ensure_default, migrate, remove, DEFAULT_NETWORK};
