//! The VM records in the store: their keys, finding one by id or name within a
//! project, and the user's wish to have it running.

use crate::model::VmRecord;
use crate::state::AppState;
use crate::store;
use crate::vms::error::VmError;

pub(crate) fn vm_key(id: &str) -> String {
    format!("vms/{id}")
}

pub(crate) fn name_key(project: &str, name: &str) -> String {
    format!("vm-names/{project}/{name}")
}

/// Finds a VM record by id or by name.
/// VMs of other projects are not found.
pub async fn resolve(state: &AppState, project: &str, id_or_name: &str) -> Result<(VmRecord, u64), VmError> {
    let s = state.store.as_ref();
    if let Some(found) = store::get_json::<VmRecord>(s, &vm_key(id_or_name)).await? {
        if found.0.project == project {
            return Ok(found);
        }
    }
    if let Some((id, _)) = store::get_json::<String>(s, &name_key(project, id_or_name)).await? {
        if let Some(found) = store::get_json::<VmRecord>(s, &vm_key(&id)).await? {
            return Ok(found);
        }
    }
    Err(VmError::NotFound(id_or_name.to_string()))
}

/// Records whether the user wants VM `id` running (compare-and-swap, retried when
/// another writer changed the record meanwhile).
pub async fn set_desired_running(state: &AppState, id: &str, running: bool) -> Result<(), VmError> {
    let changed = store::update_json(state.store.as_ref(), &vm_key(id), |rec: &mut VmRecord| {
        let was = rec.desired_running.replace(running);
        was != Some(running)
    })
    .await;
    match changed {
        Ok(_) => Ok(()),
        Err(store::StoreError::Conflict { .. }) => Err(VmError::Contended),
        Err(e) => Err(e.into()),
    }
}
