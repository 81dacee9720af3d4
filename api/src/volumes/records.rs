//! Volume records and attachment claims in the store, sizes as users write them.

pub use crate::volumes::view::Attachment;
use crate::volumes::view::RemoteDiskSpec;
use serde::{Deserialize, Serialize};

use crate::daemons::{upstream, DaemonError};
use crate::model::{host_name, validate_name};
use crate::state::AppState;
use crate::store;
use crate::volumes::error::VolumeError;

pub(crate) fn record_key(project: &str, name: &str) -> String {
    format!("volumes/{project}/{name}")
}

pub(crate) fn claim_key(project: &str, name: &str) -> String {
    format!("volume-attachments/{project}/{name}")
}

/// A name for a new volume: valid, and not one of the names hearth gives volumes of
/// its own (an image's base volume, which the reconciler removes with the image).
pub(crate) fn validate_new_name(name: &str) -> Result<(), VolumeError> {
    validate_name("volume", name)?;
    if blockd::volume::is_image_base_name(name) {
        return Err(VolumeError::ReservedName(name.to_string()));
    }
    Ok(())
}

/// What blockd calls a project's volume (see [`host_name`]).
pub(crate) fn bname(rec: &VolumeRecord) -> String {
    host_name(&rec.project, &rec.name)
}

/// What the api stores per volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub name: String,
    pub project: String,
    /// Set for a volume another host exports over NBD.
    #[serde(default)]
    pub remote: Option<RemoteDiskSpec>,
    /// A remote volume's size when it was created (its owner may grow it; while it is
    /// attached the size shown is the one the NBD client sees now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    pub created_at_ms: u64,
    /// The managed service that made it (`database/<name>`): only that service's
    /// undo removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

pub(crate) fn blockd_error(e: socket_http::ClientError) -> DaemonError {
    upstream(e)
}

pub(crate) async fn find_record(state: &AppState, project: &str, name: &str) -> Result<VolumeRecord, VolumeError> {
    validate_name("volume", name)?;
    store::get_json::<VolumeRecord>(state.store.as_ref(), &record_key(project, name))
        .await?
        .map(|(r, _)| r)
        .ok_or_else(|| VolumeError::NotFound(name.to_string()))
}

pub(crate) async fn attachment(state: &AppState, project: &str, name: &str) -> Result<Option<Attachment>, VolumeError> {
    Ok(
        store::get_json::<Attachment>(state.store.as_ref(), &claim_key(project, name))
            .await?
            .map(|(a, _)| a),
    )
}

pub(crate) async fn local_record(state: &AppState, project: &str, name: &str) -> Result<VolumeRecord, VolumeError> {
    let rec = find_record(state, project, name).await?;
    if rec.remote.is_some() {
        return Err(VolumeError::OnAnotherHost(name.to_string()));
    }
    Ok(rec)
}
