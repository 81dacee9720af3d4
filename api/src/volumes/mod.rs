//! `/v1/volumes`: data disks that outlive VMs.
//!
//! - [`http`]: the routes; [`command`]: request bodies as typed commands, checked
//!   without a stack; [`work`]: what they do in blockd; [`records`]: records and
//!   claims in the store; [`view`]: the public types, the api's own; [`attach`]: the
//!   saga that attaches a volume to a VM; [`error`]: what goes wrong, and its public
//!   form

pub mod attach;
pub mod command;
pub mod error;
pub mod http;
pub mod records;
pub mod view;
pub mod work;
