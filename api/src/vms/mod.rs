//! `/v1/vms`: create, list, show, resize, delete and lifecycle actions.
//!
//! Mutations record intent in the store first (the VM record, the name claim, the
//! operation), answer `202 Accepted`, and do the work in a task that drives
//! vmm-manager through its idempotent endpoints.
//!
//! - [`http`]: the routes (parse, call, map errors)
//! - [`command`]: a create request checked without the daemons
//! - [`create`], [`delete`]: the sagas that make and remove a VM
//! - [`define`]: a VM's definition from its record; [`parts`]: removing what a VM owns
//! - [`records`]: VM records in the store
//! - [`resize`]: vCPUs and memory, hot-plugged or with a restart when asked
//! - [`snapshot`], [`restore`]: snapshots of a VM's disks (and memory), and going back to one
//! - [`live`], [`list`]: vmm-manager's live state and the cached `GET /v1/vms` listing
//! - [`error`]: what goes wrong, and its public form

pub mod command;
pub mod create;
pub mod define;
pub mod delete;
pub mod error;
pub mod http;
pub mod list;
pub mod live;
pub mod parts;
pub mod records;
pub mod resize;
pub mod restore;
pub mod snapshot;
