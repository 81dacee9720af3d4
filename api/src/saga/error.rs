//! Why the saga engine itself failed a saga; a step fails with the error of the
//! resource it changes. This names no module of the api that reaches the state, so
//! every resource's error can hold a [`SagaError`].

use socket_http::ApiError;

use crate::store::StoreError;

/// A failure of the saga engine rather than of a step.
#[derive(Debug, thiserror::Error)]
pub enum SagaError {
    /// The saga's record (or its operation) could not be written.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Its context could not be written as JSON.
    #[error(transparent)]
    Encode(serde_json::Error),
    /// A record another process left, with a context this api cannot read.
    #[error("saga {id} has a context this api cannot read: {source}")]
    Unreadable { id: String, source: serde_json::Error },
    /// A test asked for a failure after this step (`HEARTH_SAGA_FAULT`).
    #[error("injected failure after step {0}")]
    Injected(&'static str),
}

impl From<&SagaError> for ApiError {
    fn from(e: &SagaError) -> Self {
        match e {
            SagaError::Store(e) => crate::envelope::of_store(e),
            SagaError::Encode(_) | SagaError::Unreadable { .. } | SagaError::Injected(_) => {
                ApiError::internal(e.to_string())
            }
        }
    }
}

crate::envelope::by_value!(SagaError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_failures_are_the_store_s_or_internal() {
        let unreadable = serde_json::from_str::<u8>("x").expect_err("not JSON");
        let table = [
            (
                SagaError::Store(StoreError::Unavailable("etcd is gone".into())),
                503,
                "unavailable",
            ),
            (
                SagaError::Store(StoreError::Conflict {
                    key: "sagas/1".into(),
                    expected: None,
                    found: Some(2),
                }),
                409,
                "conflict",
            ),
            (
                SagaError::Unreadable {
                    id: "1".into(),
                    source: unreadable,
                },
                500,
                "internal",
            ),
            (SagaError::Injected("ports"), 500, "internal"),
        ];
        crate::envelope::assert_public(table);
        assert_eq!(
            SagaError::Injected("ports").to_string(),
            "injected failure after step ports"
        );
    }
}
