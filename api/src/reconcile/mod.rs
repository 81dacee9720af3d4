//! Repairs what a crash left half done and drift between the store and the daemons:
//! [`pass`] does it, [`report`] says what it found.

pub mod pass;
pub mod report;
