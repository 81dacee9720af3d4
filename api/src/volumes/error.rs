//! What goes wrong with volumes, and the one place it becomes the public error envelope
//! (`From<&VolumeError> for ApiError`; the handlers in [`crate::volumes::http`] use it
//! through `?`).

use socket_http::ApiError;

use crate::daemons::DaemonError;
use crate::model::NameError;
use crate::saga::error::SagaError;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum VolumeError {
    /// The request fails a check of its own (a size, an origin, a remote export's address).
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    InvalidName(#[from] NameError),
    /// A name hearth gives its image base volumes.
    #[error("volume name {0:?} is kept for hearth's image base volumes: choose another")]
    ReservedName(String),
    /// Too long with its project's prefix for blockd's 63 characters.
    #[error(
        "volume name {name:?} is too long for project {project}: project and name together take at most 62 characters"
    )]
    NameTooLong { name: String, project: String },
    #[error("volume {0:?} does not exist")]
    NotFound(String),
    /// A VM names a volume that does not exist: the request's fault, not a missing route.
    #[error("volume {0:?} does not exist")]
    Unknown(String),
    #[error("a volume named {0:?} already exists")]
    AlreadyExists(String),
    /// Attached to a VM, so it cannot go.
    #[error("volume {name:?} is attached to VM {vm} as {disk}; detach it first")]
    Attached { name: String, vm: String, disk: String },
    /// It holds a managed service's data (a database's volume): only that service
    /// detaches it.
    #[error("volume {name:?} belongs to {by}; it stays attached to that service's VM")]
    Managed { name: String, by: String },
    /// The VM to attach it to is being created or deleted.
    #[error("VM {0} is being created or deleted")]
    VmNotReady(String),
    /// Another VM holds its claim.
    #[error("volume {0:?} is already attached to a VM")]
    AlreadyAttached(String),
    /// Its create or delete is in progress, or was cut short and is about to be undone.
    #[error("volume {0:?} is being created or deleted; retry when that is done")]
    Changing(String),
    /// The VM runs on another host than this api's, where volumes made here are not
    /// (volumes do not span hosts yet).
    #[error("VM {vm} runs on host {host}; volumes are attached only to VMs on the host that holds them ({here})")]
    VmOnAnotherHost { vm: String, host: String, here: String },
    /// Another host exports it: snapshots and clones are made there.
    #[error("volume {0:?} lives on another host; snapshot and clone it there")]
    OnAnotherHost(String),
    /// Another host exports it: a VM here reaches it through blockd's vhost-user socket.
    #[error("volume {0:?} is on another host: attach it via vhost-user")]
    RemoteNeedsVhostUser(String),
    /// Its pool keeps it in memory: there is no file to hand a VM.
    #[error("volume {0:?} has no file or device (a memory pool); attach it via vhost-user")]
    NoFile(String),
    /// blockd made a vhost-user export without saying where its socket is.
    #[error("blockd gave no socket")]
    NoSocket,
    /// An attach saga recorded without its claim (the api's bug).
    #[error("the attach saga has no claim")]
    NoClaim,
    /// The volume grew, but the hypervisor of the VM it is attached to refused the new
    /// size.
    #[error("volume {name:?} grew to {size_bytes} bytes, but VM {vm:?} could not be told: {source}")]
    NotSeenByVm {
        name: String,
        size_bytes: u64,
        vm: String,
        source: Box<DaemonError>,
    },
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Saga(#[from] SagaError),
}

impl From<&VolumeError> for ApiError {
    fn from(e: &VolumeError) -> Self {
        use VolumeError::*;
        let message = e.to_string();
        match e {
            Invalid(_) | ReservedName(_) | NameTooLong { .. } | Unknown(_) | RemoteNeedsVhostUser(_) => {
                ApiError::unprocessable(message)
            }
            InvalidName(e) => ApiError::from(e),
            NotFound(_) => ApiError::not_found(message),
            AlreadyExists(_)
            | Attached { .. }
            | Managed { .. }
            | VmNotReady(_)
            | AlreadyAttached(_)
            | Changing(_)
            | VmOnAnotherHost { .. }
            | OnAnotherHost(_)
            | NoFile(_) => ApiError::conflict(message),
            NoSocket | NoClaim => ApiError::internal(message),
            // The status says what the hypervisor's refusal was; the code, that the
            // volume did grow.
            NotSeenByVm { source, .. } => {
                ApiError::new(ApiError::from(source.as_ref()).status, "resize_not_seen_by_vm", message)
            }
            Daemon(e) => ApiError::from(e),
            Store(e) => crate::envelope::of_store(e),
            Saga(e) => ApiError::from(e),
        }
    }
}

crate::envelope::by_value!(VolumeError);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_volume_error_has_its_public_status_and_code() {
        let s = String::from;
        let table = [
            (VolumeError::Invalid(s("give size_bytes or size")), 422, "invalid"),
            (
                VolumeError::InvalidName(NameError {
                    kind: "volume",
                    name: s("Data"),
                }),
                422,
                "invalid",
            ),
            (VolumeError::ReservedName(s("hearth-image-x")), 422, "invalid"),
            (
                VolumeError::Managed {
                    name: s("db-app-data"),
                    by: s("database/app"),
                },
                409,
                "conflict",
            ),
            (
                VolumeError::NameTooLong {
                    name: s("data"),
                    project: s("p"),
                },
                422,
                "invalid",
            ),
            (VolumeError::NotFound(s("data")), 404, "not_found"),
            (VolumeError::Unknown(s("data")), 422, "invalid"),
            (VolumeError::AlreadyExists(s("data")), 409, "conflict"),
            (
                VolumeError::Attached {
                    name: s("data"),
                    vm: s("web"),
                    disk: s("vol0"),
                },
                409,
                "conflict",
            ),
            (VolumeError::VmNotReady(s("web")), 409, "conflict"),
            (VolumeError::AlreadyAttached(s("data")), 409, "conflict"),
            (VolumeError::Changing(s("data")), 409, "conflict"),
            (VolumeError::OnAnotherHost(s("data")), 409, "conflict"),
            (VolumeError::RemoteNeedsVhostUser(s("data")), 422, "invalid"),
            (VolumeError::NoFile(s("data")), 409, "conflict"),
            (VolumeError::NoSocket, 500, "internal"),
            (VolumeError::NoClaim, 500, "internal"),
            (
                VolumeError::NotSeenByVm {
                    name: s("data"),
                    size_bytes: 1 << 30,
                    vm: s("web"),
                    source: Box::new(DaemonError::Failed {
                        message: s("qemu said no"),
                        details: None,
                    }),
                },
                502,
                "resize_not_seen_by_vm",
            ),
            (
                VolumeError::Daemon(DaemonError::Unavailable(s("blockd is down"))),
                503,
                "unavailable",
            ),
            (
                VolumeError::Store(StoreError::Unavailable(s("etcd is down"))),
                503,
                "unavailable",
            ),
            (VolumeError::Saga(SagaError::Injected("claim")), 500, "internal"),
        ];
        crate::envelope::assert_public(table);
    }
}
