//! The work behind `/v1/volumes`: making and removing volumes in blockd (locally or
//! through a remote disk), growing remote ones, and claiming, describing and releasing
//! a VM's attachments.

use crate::volumes::command::{CreateVolumeCommand, Origin};
use crate::volumes::error::VolumeError;
use crate::volumes::view::RemoteDiskSpec;
use blockd::exports::ExportSpec;
use blockd::service::{VolumeSource, VolumeSpec};
use vmm_manager::spec::{DiskFormat, DiskSource, DiskSpec};

use crate::model::{host_name, AttachVia, AttachVolume, AttachedVolume, VmRecord};
use crate::state::AppState;
use crate::store;
use crate::volumes::records::{
    attachment, blockd_error, bname, claim_key, find_record, record_key, Attachment, VolumeRecord,
};

/// The name of a remote disk made for a moment (to check or grow a remote volume's
/// export): unique, so two requests never share one, and within blockd's 63
/// characters whatever the volume's name. It names this process, so that one a crash
/// left behind can be told from one in use ([`stale_probes`]).
fn probe_name(host: &str) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = format!("{}{n:x}-{host}", own_probe_prefix());
    // Volume names are ASCII, so this cuts between characters.
    name.truncate(63);
    name
}

/// `probe<token>.`, with a token drawn once per process: random rather than the PID,
/// which a container or a reboot may give the next api process again.
fn own_probe_prefix() -> &'static str {
    static PREFIX: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX.get_or_init(|| format!("probe{}.", &uuid::Uuid::new_v4().simple().to_string()[..8]))
}

/// Remote disks blockd holds that an earlier api process made for a moment and left
/// (it ended between making and removing one): named like [`probe_name`]'s but not by
/// this process, and no remote volume's own.
pub async fn stale_probes(state: &AppState) -> Result<Vec<String>, VolumeError> {
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    let records = store::list_json::<VolumeRecord>(state.store.as_ref(), "volumes/").await?;
    let volumes: std::collections::BTreeSet<String> = records.iter().map(|(r, _)| bname(r)).collect();
    let own = own_probe_prefix();
    Ok(exports
        .into_iter()
        .filter(|e| e.remote.is_some())
        .map(|e| e.volume)
        .filter(|n| n.starts_with("probe") && !n.starts_with(own) && !volumes.contains(n))
        .collect())
}

/// Makes a new volume's bytes in blockd (or, for a remote one, checks that its export
/// answers, and returns its size).
pub(crate) async fn make_volume(
    state: &AppState,
    project: &str,
    host: &str,
    req: &CreateVolumeCommand,
) -> Result<Option<u64>, VolumeError> {
    let (size_bytes, source) = match &req.origin {
        Origin::Remote(remote) => {
            // Check now that the export is there, so a typo fails here, not at attach.
            let probe = probe_name(host);
            let found = state
                .blockd
                .remote_disk(&probe, &remote.into())
                .await
                .map_err(blockd_error)?;
            state.blockd.delete_remote_disk(&probe).await.map_err(blockd_error)?;
            return Ok(found.size_bytes);
        }
        Origin::Empty { size_bytes } => (Some(*size_bytes), None),
        Origin::Snapshot {
            volume,
            snapshot,
            size_bytes,
        } => {
            let from = find_record(state, project, volume)
                .await
                .map_err(|_| VolumeError::NotFound(volume.clone()))?;
            (
                *size_bytes,
                Some(VolumeSource::Snapshot(format!("{}@{snapshot}", bname(&from)))),
            )
        }
    };
    state
        .blockd
        .ensure_volume(host, &VolumeSpec { size_bytes, source })
        .await
        .map_err(blockd_error)?;
    Ok(None)
}

/// Removes a volume completely, from blockd (unless it lives on another host) and the
/// store. Also what the reconciler does with a create or delete a crash cut short.
pub async fn remove(state: &AppState, project: &str, name: &str) -> Result<(), VolumeError> {
    if let Some(a) = attachment(state, project, name).await? {
        return Err(VolumeError::Attached {
            name: name.to_string(),
            vm: a.vm_name,
            disk: a.disk,
        });
    }
    let Some((rec, _)) = store::get_json::<VolumeRecord>(state.store.as_ref(), &record_key(project, name)).await?
    else {
        // The record comes before the volume: without it, hearth made nothing (a volume
        // of that name in blockd is someone else's).
        return Ok(());
    };
    if rec.remote.is_none() {
        match state.blockd.delete_volume(&bname(&rec)).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => return Err(blockd_error(e).into()),
        }
    }
    state.store.delete(&record_key(project, name)).await?;
    Ok(())
}

/// Grows a volume another host exports, through that host's NBD server
/// (`NBD_CMD_RESIZE`, which blockd's writable exports offer): while blockd serves it
/// to a VM here, through that remote disk, which then tells the VM; otherwise through
/// a remote disk made for the purpose and removed again. The new size is kept in the
/// volume's record.
pub(crate) async fn resize_remote(
    state: &AppState,
    rec: &VolumeRecord,
    remote: &RemoteDiskSpec,
    size: u64,
) -> Result<(), VolumeError> {
    let host = bname(rec);
    let exports = state.blockd.exports().await.map_err(blockd_error)?;
    let grown = if exports.iter().any(|e| e.volume == host && e.remote.is_some()) {
        state.blockd.resize_remote_disk(&host, size).await
    } else {
        let probe = probe_name(&host);
        state
            .blockd
            .remote_disk(&probe, &remote.into())
            .await
            .map_err(blockd_error)?;
        let grown = state.blockd.resize_remote_disk(&probe, size).await;
        if let Err(e) = state.blockd.delete_remote_disk(&probe).await {
            tracing::warn!(volume = rec.name, "removing the remote disk used to resize: {e}");
        }
        grown
    }
    .map_err(blockd_error)?;
    let Some(size_bytes) = grown.size_bytes else {
        return Ok(());
    };
    let key = record_key(&rec.project, &rec.name);
    store::update_json(state.store.as_ref(), &key, |r: &mut VolumeRecord| {
        let larger = r.size_bytes < Some(size_bytes);
        if larger {
            r.size_bytes = Some(size_bytes);
        }
        larger
    })
    .await?;
    Ok(())
}

/// Claims a volume for a VM and picks its disk id. Nothing is attached yet.
pub async fn claim(
    state: &AppState,
    rec: &VmRecord,
    req: &AttachVolume,
    taken: &[AttachedVolume],
) -> Result<AttachedVolume, VolumeError> {
    // Checked before the record: a volume whose create or delete is in progress, or
    // was cut short by a crash and is about to be removed, is not attached. (Its
    // marker goes only after the removal is complete, so the record is gone then.)
    if crate::intents::pending(
        state.store.as_ref(),
        crate::intents::Kind::Volume,
        &rec.project,
        &req.volume,
    )
    .await?
    {
        return Err(VolumeError::Changing(req.volume.clone()));
    }
    // A VM that names a volume that does not exist is a bad request.
    let vol = find_record(state, &rec.project, &req.volume)
        .await
        .map_err(|e| match e {
            VolumeError::NotFound(name) => VolumeError::Unknown(name),
            other => other,
        })?;
    let via = match (req.via, &vol.remote) {
        (Some(AttachVia::File), Some(_)) => return Err(VolumeError::RemoteNeedsVhostUser(req.volume.clone())),
        (Some(v), _) => v,
        (None, Some(_)) => AttachVia::VhostUser,
        (None, None) => AttachVia::File,
    };
    let disk = (0..)
        .map(|i| format!("vol{i}"))
        .find(|d| !taken.iter().any(|t| &t.disk == d))
        .unwrap_or_else(|| "vol".into());
    let claim = Attachment {
        vm: rec.id.clone(),
        vm_name: rec.name.clone(),
        disk: disk.clone(),
        via,
        read_only: req.read_only,
    };
    state
        .store
        .compare_and_swap(&claim_key(&rec.project, &req.volume), None, store::encode(&claim))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => VolumeError::AlreadyAttached(req.volume.clone()),
            other => other.into(),
        })?;
    Ok(AttachedVolume {
        volume: req.volume.clone(),
        disk,
        via,
        read_only: req.read_only,
    })
}

/// Makes the volume reachable the way the attachment says and returns the disk the VM
/// gets (a file or a vhost-user-blk socket).
pub async fn disk_spec(state: &AppState, project: &str, a: &AttachedVolume) -> Result<DiskSpec, VolumeError> {
    let rec = find_record(state, project, &a.volume).await?;
    let host = bname(&rec);
    let source = match (&rec.remote, a.via) {
        (Some(remote), _) => {
            let e = state
                .blockd
                .remote_disk(&host, &remote.into())
                .await
                .map_err(blockd_error)?;
            DiskSource::VhostUser {
                socket: e.socket.ok_or(VolumeError::NoSocket)?,
            }
        }
        (None, AttachVia::VhostUser) => {
            let e = state
                .blockd
                .export(&host, "vhost-user", &ExportSpec { read_only: a.read_only })
                .await
                .map_err(blockd_error)?;
            DiskSource::VhostUser {
                socket: e.socket.ok_or(VolumeError::NoSocket)?,
            }
        }
        (None, AttachVia::File) => {
            let v = state.blockd.volume(&host).await.map_err(blockd_error)?;
            let path = v.path.ok_or_else(|| VolumeError::NoFile(a.volume.clone()))?;
            let format = match v.format {
                blockd::volume::VolumeFormat::Raw => DiskFormat::Raw,
                blockd::volume::VolumeFormat::Qcow2 => DiskFormat::Qcow2,
            };
            DiskSource::File { path, format }
        }
    };
    Ok(DiskSpec {
        id: a.disk.clone(),
        source,
        readonly: a.read_only,
    })
}

/// Undoes `disk_spec`: the vhost-user socket (or the remote disk) goes.
pub async fn unexport(state: &AppState, project: &str, a: &AttachedVolume) -> Result<(), VolumeError> {
    let remote = find_record(state, project, &a.volume).await.ok().and_then(|r| r.remote);
    let host = host_name(project, &a.volume);
    match (remote, a.via) {
        (Some(_), _) => state.blockd.delete_remote_disk(&host).await,
        (None, AttachVia::VhostUser) => state.blockd.unexport(&host, "vhost-user").await,
        (None, AttachVia::File) => Ok(()),
    }
    .map_err(|e| blockd_error(e).into())
}

/// Undoes `disk_spec` and `claim`: the vhost-user socket goes, the claim is released.
pub async fn release(state: &AppState, project: &str, a: &AttachedVolume) {
    if let Err(e) = unexport(state, project, a).await {
        tracing::error!(volume = %a.volume, "cannot remove the volume's socket: {e}");
    }
    if let Err(e) = state.store.delete(&claim_key(project, &a.volume)).await {
        tracing::error!(volume = %a.volume, "cannot release the attachment: {e}");
    }
}

/// Creates a volume: its record first (compare-and-swap, so a taken name is refused
/// whole), then the volume in blockd; a failure removes the record again. Runs in the
/// caller's task (the HTTP edge runs it as an intent; a saga as a step).
pub async fn create_now(
    state: &AppState,
    project: &str,
    req: crate::volumes::command::CreateVolumeCommand,
    managed_by: Option<String>,
) -> Result<VolumeRecord, VolumeError> {
    let host = req.host_name_in(project)?;
    let r = VolumeRecord {
        name: req.name.clone(),
        project: project.into(),
        remote: req.remote().cloned(),
        size_bytes: None,
        created_at_ms: vmm_manager::spec::now_ms(),
        managed_by,
    };
    let s = state.store.as_ref();
    let key = record_key(project, &req.name);
    let revision = s
        .compare_and_swap(&key, None, store::encode(&r))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => VolumeError::AlreadyExists(req.name.clone()),
            other => other.into(),
        })?;
    let made: Result<VolumeRecord, VolumeError> = async {
        let Some(remote_size) = make_volume(state, project, &host, &req).await? else {
            return Ok(r);
        };
        let r = VolumeRecord {
            size_bytes: Some(remote_size),
            ..r
        };
        s.compare_and_swap(&key, Some(revision), store::encode(&r)).await?;
        Ok(r)
    }
    .await;
    if made.is_err() {
        let _ = s.delete(&key).await;
    }
    made
}

/// Grows a local volume and tells the VM it is attached to, if any.
pub async fn resize_local(state: &AppState, project: &str, rec: &VolumeRecord, size: u64) -> Result<(), VolumeError> {
    let name = rec.name.clone();
    let grown = state.blockd.resize(&bname(rec), size).await.map_err(blockd_error)?;
    if let Some(a) = attachment(state, project, &name).await? {
        // A disk QEMU or Cloud Hypervisor opens as a file: the running guest is told
        // its new capacity. Over vhost-user blockd has already told the VM (the resize
        // grew the device under its socket and sent a config-change message).
        if a.via == AttachVia::File {
            state
                .vmm
                .resize_disk(&a.vm, &a.disk, grown.size_bytes)
                .await
                .map_err(|e| VolumeError::NotSeenByVm {
                    name: name.clone(),
                    size_bytes: grown.size_bytes,
                    vm: a.vm_name.clone(),
                    source: Box::new(crate::daemons::upstream(e)),
                })?;
        }
    }
    Ok(())
}
