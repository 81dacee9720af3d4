//! What goes wrong with images, and the one place it becomes the public error envelope
//! (`From<&ImageError> for ApiError`; the handlers in [`crate::images::http`] use it
//! through `?`, an import's operation records it).

use axum::http::StatusCode;
use socket_http::{ApiError, ErrorBody};

use crate::daemons::DaemonError;
use crate::saga::error::SagaError;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Not a name, `name:tag` or digest imaged could hold.
    #[error("{0}")]
    Invalid(String),
    /// imaged's import job failed, and said why. Shown as imaged reports it: the codes
    /// of a failed import (`checksum_mismatch`, `source_unreachable`…) are public ones
    /// ([`crate::daemons::PUBLIC_DAEMON_CODES`]), and imaged's own failures are
    /// `internal`.
    #[error("{}", body.message)]
    ImportFailed { status: StatusCode, body: ErrorBody },
    /// imaged's import job failed without saying why.
    #[error("the import failed")]
    ImportFailedUnsaid,
    /// An import saga recorded without its job (the api's bug).
    #[error("the import saga has no job")]
    NoJob,
    /// imaged stopped answering about the job.
    #[error("lost track of the import in imaged: {0}")]
    LostTrack(String),
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Saga(#[from] SagaError),
}

impl From<&ImageError> for ApiError {
    fn from(e: &ImageError) -> Self {
        let message = e.to_string();
        match e {
            ImageError::Invalid(_) => ApiError::unprocessable(message),
            ImageError::ImportFailed { status, body } => ApiError {
                status: *status,
                body: body.clone(),
            },
            ImageError::ImportFailedUnsaid | ImageError::NoJob => ApiError::internal(message),
            ImageError::LostTrack(_) => ApiError::unavailable(message),
            ImageError::Daemon(e) => ApiError::from(e),
            ImageError::Saga(e) => ApiError::from(e),
        }
    }
}

crate::envelope::by_value!(ImageError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_image_error_has_its_public_status_and_code() {
        let s = String::from;
        let table = [
            (ImageError::Invalid(s("image name \"../x\" is invalid")), 422, "invalid"),
            (
                ImageError::ImportFailed {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    body: ErrorBody {
                        code: s("checksum_mismatch"),
                        message: s("checksum mismatch"),
                        details: None,
                    },
                },
                422,
                "checksum_mismatch",
            ),
            (ImageError::ImportFailedUnsaid, 500, "internal"),
            (ImageError::NoJob, 500, "internal"),
            (ImageError::LostTrack(s("connection refused")), 503, "unavailable"),
            (
                ImageError::Daemon(DaemonError::Documented {
                    status: StatusCode::BAD_GATEWAY,
                    code: "source_unreachable",
                    message: s("no route to host"),
                    details: None,
                }),
                502,
                "source_unreachable",
            ),
            (ImageError::Saga(SagaError::Injected("start")), 500, "internal"),
        ];
        crate::envelope::assert_public(table);
    }
}
