//! Long-running operations: [`record`] keeps them in the store (and their metrics),
//! [`http`] serves them.

pub mod http;
pub mod record;
