//! Removing what a VM owns on the host, part by part. Each removal is idempotent (a
//! part already gone is fine), so the sagas' steps and undos and the reconciler's
//! repairs can run them again after a crash.

use crate::daemons::upstream;
use crate::model::VmRecord;
use crate::state::AppState;
use crate::vms::error::VmError;

/// Its VMM and state directory in vmm-manager (a running VMM is killed).
pub(crate) async fn remove_vmm(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    Ok(d.vmm.delete(&rec.id).await.map_err(upstream)?)
}

/// The ports of the NICs it records.
pub(crate) async fn remove_ports(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    for nic in &rec.nics {
        d.netd.delete_port(&nic.port).await.map_err(upstream)?;
    }
    Ok(())
}

pub(crate) async fn remove_root_disk(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    if let Some(root) = &rec.root_disk {
        match d.blockd.delete_volume(&root.volume).await {
            Err(e) if !e.is_not_found() => return Err(upstream(e).into()),
            _ => {}
        }
    }
    Ok(())
}

pub(crate) async fn remove_seed(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    if rec.seed {
        d.images.delete_seed(&rec.id).await.map_err(upstream)?;
    }
    Ok(())
}

/// Its volume attachments; the volumes outlive it.
pub(crate) async fn release_volumes(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    // Its snapshots go first: their snapshots of the volumes that outlive it too.
    crate::vms::snapshot::delete_all(state, rec).await?;
    for v in &rec.volumes {
        crate::volumes::work::release(state, &rec.project, v).await;
    }
    Ok(())
}

/// Its lease on its image.
pub(crate) async fn release_image(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    Ok(d.images.release(&rec.id).await.map_err(upstream)?)
}
