//! `/v1/volumes`: data disks that outlive VMs.
//!
//! - [`http`]: the routes; [`work`]: what they do in blockd; [`records`]: records and
//!   claims in the store

pub mod http;
pub mod records;
pub mod work;
