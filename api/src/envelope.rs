//! Where the api's typed errors meet the public error envelope (`socket_http::ApiError`).
//!
//! Each resource's error (`vms::error::VmError`, `volumes::error::VolumeError`…) has one
//! conversion into the envelope, `From<&Error> for ApiError` in its `error.rs`, and
//! handlers use it through `?` ([`by_value!`] gives the owned error the same path). It
//! takes the error by reference because an operation records a saga's error while the
//! saga hands the error back to its caller. Errors of other crates that a resource's
//! error holds are shown here the same way.

use socket_http::ApiError;

use crate::store::StoreError;

/// A store failure as the public envelope, for one held by reference: the store crate's
/// own conversion (which takes it by value) applied to a copy, so the two cannot differ.
pub fn of_store(e: &StoreError) -> ApiError {
    ApiError::from(match e {
        StoreError::Conflict { key, expected, found } => StoreError::Conflict {
            key: key.clone(),
            expected: *expected,
            found: *found,
        },
        StoreError::Unavailable(m) => StoreError::Unavailable(m.clone()),
        StoreError::Corrupt { key, message } => StoreError::Corrupt {
            key: key.clone(),
            message: message.clone(),
        },
        StoreError::LeaseLapsed(id) => StoreError::LeaseLapsed(*id),
    })
}

/// `From<Error> for ApiError` for an error whose one conversion takes it by reference
/// (`From<&Error> for ApiError`): the owned error goes the same way, so `?` works.
macro_rules! by_value {
    ($error:ty) => {
        impl From<$error> for socket_http::ApiError {
            fn from(e: $error) -> Self {
                Self::from(&e)
            }
        }
    };
}
pub(crate) use by_value;

/// Holds an error's cases to the public status and code each must answer with, and to
/// the message being the error's own words (what sagas record and logs show).
#[cfg(test)]
pub(crate) fn assert_public<E>(table: impl IntoIterator<Item = (E, u16, &'static str)>)
where
    E: std::fmt::Display,
    for<'a> ApiError: From<&'a E>,
{
    for (e, status, code) in table {
        let public = ApiError::from(&e);
        assert_eq!(
            (public.status.as_u16(), public.body.code.as_str()),
            (status, code),
            "{e}"
        );
        assert_eq!(public.body.message, e.to_string());
    }
}
