//! `/v1/images`: import (from a URL or a path on the host), list, show, delete.
//!
//! imaged does the work; an import here is an operation whose progress (bytes, rate,
//! ETA) mirrors imaged's import job until it finishes.
//!
//! - [`http`]: the routes (parse, call, map errors)
//! - [`view`]: the public types, the api's own: no host path of the image store shows
//! - [`import`]: the saga that starts an import in imaged and follows it to its end
//! - [`error`]: what goes wrong, and its public form

pub mod error;
pub mod http;
pub mod import;
pub mod view;

pub use http::remove_image_bases;
