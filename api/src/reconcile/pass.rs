//! Repairs what a crash left half done and drift between the store and the daemons.
//!
//! Desired state is in the store; what exists is what the daemons report. A VM record
//! still `creating` or `deleting` at start belongs to an operation that died with the
//! previous process: a create is undone completely, a
//! delete is finished. A VM vmm-manager does not know (its state directory under /run
//! is gone after a host reboot) is defined again from its record, with its ports, root
//! disk and volumes, and started if the user last wanted it running; a root disk or
//! volume that is gone is reported, never made anew. Then whatever the daemons hold
//! for VMs the store does not know is
//! removed: VMM definitions, ports named `<vm id>-<n>`, root disks `vm-<id>-root`, their
//! cloud-init seeds and image leases, and volume claims of VMs that are gone; so are
//! remote disks `probe<token>.<n>-…` an earlier api process made for a moment (checking
//! or growing a remote volume) and left. Ports and
//! volumes are touched only under names hearth derives from a VM id, so one someone
//! made by hand under another name stays; every VMM definition belongs to a VM.
//!
//! Networks and volumes whose create or delete a crash cut short (an intent marker is
//! left, see [`crate::intents`]) are removed completely; a VM name claimed by a create
//! that died before recording its VM is freed. Operations the previous process left
//! running are then settled ([`settle_interrupted`]): succeeded when the pass finished
//! their work, failed with a message otherwise.
//!
//! It runs at start, before the api serves, and then every `--reconcile-interval`
//! ([`live`]: sagas no process runs, cut-short changes, networks netd lost, orphans).
//! Sagas (see [`crate::saga`]) an earlier process left are settled first: a VM create
//! undone or, past its pivot, finished; a VM delete finished. It assumes one api
//! process per store.

use std::collections::BTreeSet;

use socket_http::ApiError;

use crate::model::{Phase, VmRecord};
use crate::networks::error::NetworkError;
use crate::reconcile::report::Report;
use crate::state::AppState;
use crate::store;

/// The VM id a name made by hearth carries: `<uuid>-<n>` (ports) or `vm-<uuid>-root`
/// (root disks).
fn vm_id_of_port(port: &str) -> Option<&str> {
    let (id, n) = port.rsplit_once('-')?;
    (n.parse::<u32>().is_ok() && uuid::Uuid::parse_str(id).is_ok()).then_some(id)
}

fn vm_id_of_root_disk(volume: &str) -> Option<&str> {
    let id = volume.strip_prefix("vm-")?.strip_suffix("-root")?;
    uuid::Uuid::parse_str(id).is_ok().then_some(id)
}

/// Network and volume changes cut short (a marker no change of this process holds):
/// removed completely (their clients never got an answer). A marker that cannot be
/// dealt with now stays for the next pass.
async fn remove_cut_short(state: &AppState, report: &mut Report) -> Result<(), ApiError> {
    for (kind, project, name, action) in crate::intents::left_over(state.store.as_ref(), &state.instance).await? {
        if action == RECREATE {
            // The reconciler itself was making a lost network again: its record is
            // whole, the next pass makes it again.
            crate::intents::clear(state.store.as_ref(), kind, &project, &name).await?;
            continue;
        }
        let (removed, list) = match kind {
            crate::intents::Kind::Network => (
                crate::networks::remove(state, &project, &name)
                    .await
                    .map_err(|e| e.to_string()),
                &mut report.networks_removed,
            ),
            crate::intents::Kind::Volume => (
                crate::volumes::work::remove(state, &project, &name)
                    .await
                    .map_err(|e| e.to_string()),
                &mut report.volumes_removed,
            ),
        };
        match removed {
            Ok(()) => {
                crate::intents::clear(state.store.as_ref(), kind, &project, &name).await?;
                list.push(format!("{project}/{name}"));
            }
            Err(e) => {
                tracing::warn!(?kind, %project, %name, "cannot remove what a cut-short change left: {e}")
            }
        }
    }
    Ok(())
}

/// What the daemons hold, read before the store in the periodic pass.
struct Held {
    vms: Option<Vec<vmm_manager::VmInfo>>,
    networks: Option<Vec<netd::network::NetworkStatus>>,
    ports: Option<Vec<netd::network::Port>>,
    volumes: Option<Vec<blockd::volume::Volume>>,
    /// Read after the volumes: an image base in `volumes` was made for an image that
    /// is in this list unless the image was deleted since.
    images: Option<Vec<imaged::ImageInfo>>,
    claims: Vec<(String, store::Versioned)>,
}

impl Held {
    /// Asks the daemons at once; one that does not answer is skipped this pass.
    async fn read(state: &AppState) -> Result<Held, ApiError> {
        fn answered<T>(daemon: &str, r: Result<T, socket_http::ClientError>) -> Option<T> {
            r.map_err(|e| tracing::warn!("reconcile: {daemon} did not answer: {e}"))
                .ok()
        }
        let (vms, networks, ports, volumes) = tokio::join!(
            state.vmm.list(),
            state.netd.networks(),
            state.netd.ports(),
            state.blockd.volumes()
        );
        let images = state.images.list().await;
        Ok(Held {
            vms: answered("vmm-manager", vms),
            networks: answered("netd", networks),
            ports: answered("netd", ports),
            volumes: answered("blockd", volumes),
            images: answered("imaged", images),
            claims: state.store.list("volume-attachments/").await?,
        })
    }
}

/// Removes what this host's daemons hold under names hearth derives from the id of a
/// VM that is not `here` (a VM of this host): VMM definitions (with seed and image
/// lease), ports, root disks; and volume claims of VMs not `known` at all. A VM moved
/// to another host while this one was lost is not `here`: its stale copy goes.
async fn remove_orphans(
    state: &AppState,
    known: &BTreeSet<String>,
    here: &BTreeSet<String>,
    held: Held,
    report: &mut Report,
) {
    for vm in held.vms.iter().flatten() {
        report.examined += 1;
        if here.contains(&vm.spec.id) {
            continue;
        }
        match state.vmm.delete(&vm.spec.id).await {
            Ok(()) => {
                report.orphan_vmms.push(vm.spec.id.clone());
                let _ = state.images.delete_seed(&vm.spec.id).await;
                let _ = state.images.release(&vm.spec.id).await;
            }
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(vm = %vm.spec.id, "cannot remove an orphan VM: {e}"),
        }
    }
    for p in held.ports.into_iter().flatten() {
        report.examined += 1;
        if vm_id_of_port(&p.id).is_some_and(|id| !here.contains(id)) {
            match state.netd.delete_port(&p.id).await {
                Ok(()) => report.orphan_ports.push(p.id),
                Err(e) => tracing::warn!(port = %p.id, "cannot remove an orphan port: {e}"),
            }
        }
    }
    if let (Some(volumes), Some(images)) = (&held.volumes, &held.images) {
        let bases: BTreeSet<String> = images
            .iter()
            .filter(|i| !i.digest.is_empty())
            .map(|i| blockd::volume::image_base_name(&i.digest))
            .collect();
        for v in volumes {
            if !blockd::volume::is_image_base_name(&v.name) || bases.contains(&v.name) {
                continue;
            }
            // A user's volume of that name from before such names were kept for hearth.
            let user_key = format!("volumes/{}/{}", crate::auth::keys::DEFAULT_PROJECT, v.name);
            if !matches!(state.store.get(&user_key).await, Ok(None)) {
                continue;
            }
            // blockd refuses (409) while root disks are clones of it: an image a VM
            // still holds by lease after its name moved on is not in imaged's list.
            match state.blockd.delete_volume(&v.name).await {
                Ok(()) => report.orphan_image_bases.push(v.name.clone()),
                Err(e) if e.is_not_found() => {}
                Err(e) => tracing::debug!(volume = %v.name, "image base kept: {e}"),
            }
        }
    }
    for v in held.volumes.into_iter().flatten() {
        report.examined += 1;
        let Some(id) = vm_id_of_root_disk(&v.name).filter(|id| !here.contains(*id)) else {
            continue;
        };
        let id = id.to_string();
        match state.blockd.delete_volume(&v.name).await {
            Ok(()) => report.orphan_root_disks.push(v.name.clone()),
            Err(e) if e.is_not_found() => {}
            Err(e) => tracing::warn!(volume = %v.name, "cannot remove an orphan root disk: {e}"),
        }
        let _ = state.images.delete_seed(&id).await;
        let _ = state.images.release(&id).await;
    }
    for (key, v) in held.claims {
        let Ok(claim) = serde_json::from_slice::<crate::volumes::records::Attachment>(&v.value) else {
            continue;
        };
        if known.contains(&claim.vm) {
            continue;
        }
        // volume-attachments/<project>/<volume>
        let mut parts = key.splitn(3, '/').skip(1);
        let (Some(project), Some(volume)) = (parts.next(), parts.next()) else {
            continue;
        };
        let att = crate::model::AttachedVolume {
            volume: volume.to_string(),
            disk: claim.disk,
            via: claim.via,
            read_only: claim.read_only,
        };
        crate::volumes::work::release(state, project, &att).await;
        report.orphan_claims.push(format!("{project}/{volume}"));
    }
}

/// Networks the store has and netd lacked when it was read (its state was lost, or
/// removed behind the api's back) are made again from their records, unless a change
/// of theirs is in progress or was cut short (an intent marker).
///
/// A network hearth spans over hosts is this host's only while one of its VMs is on
/// it: only then is it made again here, and joined to its overlay.
async fn recreate_networks(state: &AppState, held: &Held, report: &mut Report) -> Result<(), ApiError> {
    let Some(present) = &held.networks else { return Ok(()) };
    let present: BTreeSet<&str> = present.iter().map(|n| n.spec.name.as_str()).collect();
    let used_here: BTreeSet<(String, String)> = store::list_json::<VmRecord>(state.store.as_ref(), "vms/")
        .await?
        .into_iter()
        .filter(|(r, _)| state.is_local(r.host.as_deref()))
        .flat_map(|(r, _)| r.nics.into_iter().map(move |n| (r.project.clone(), n.network)))
        .collect();
    for (key, v) in state.store.list("networks/").await? {
        report.examined += 1;
        // networks/<project>/<name>
        let Some((project, name)) = key.strip_prefix("networks/").and_then(|r| r.split_once('/')) else {
            continue;
        };
        let Ok(spec) = serde_json::from_slice::<netd::network::NetworkSpec>(&v.value) else {
            continue;
        };
        if present.contains(spec.name.as_str()) || name.contains('/') {
            continue;
        }
        let spans = crate::networks::overlay::spans_hosts(state, &spec);
        if spans && !used_here.contains(&(project.to_string(), name.to_string())) {
            continue;
        }
        // Holding the network's marker, so no create or delete of it runs meanwhile,
        // and only if its record is still the one read (not deleted since).
        let made: Result<_, NetworkError> =
            crate::intents::hold(state, crate::intents::Kind::Network, project, name, RECREATE, async {
                match state.store.get(&key).await? {
                    Some(now) if now.revision == v.revision && spans => {
                        let me = &state.config.host.name;
                        crate::networks::overlay::span(state, &spec, project, name, me).await?;
                        Ok(true)
                    }
                    Some(now) if now.revision == v.revision => {
                        state
                            .netd
                            .ensure_network(&spec)
                            .await
                            .map_err(crate::daemons::upstream)?;
                        Ok(true)
                    }
                    _ => Ok(false),
                }
            })
            .await;
        match made {
            Ok(Some(true)) => report.networks_recreated.push(format!("{project}/{name}")),
            Ok(_) => {}
            Err(e) => tracing::warn!(network = %spec.name, "cannot make a lost network again: {e}"),
        }
    }
    Ok(())
}

/// The marker action of a network the reconciler makes again.
const RECREATE: &str = "recreate";

/// The pass at start, before the api serves (nothing of this process runs yet).
/// Daemons that do not answer are skipped (and said so in the log); the periodic pass
/// tries again.
pub async fn reconcile(state: &std::sync::Arc<AppState>) -> Result<Report, ApiError> {
    let mut report = Report::default();
    recover_sagas(state, &mut report).await?;
    remove_cut_short(state, &mut report).await?;
    let mut known = BTreeSet::new();
    let mut ready = Vec::new();
    let records = store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await?;
    report.examined += records.len();
    // A create claims the VM's name before it records the VM: a crash in between
    // leaves a name that no VM holds, which would refuse that name for ever.
    let ids: BTreeSet<&str> = records.iter().map(|(r, _)| r.id.as_str()).collect();
    for (key, v) in state.store.list("vm-names/").await? {
        report.examined += 1;
        let holder = serde_json::from_slice::<String>(&v.value).unwrap_or_default();
        if !ids.contains(holder.as_str()) {
            state.store.delete(&key).await?;
            report.names_freed.push(key["vm-names/".len()..].to_string());
        }
    }
    // With several hosts: what another host's live api is doing is its own, and only
    // this host's VMs are compared with this host's vmm-manager.
    let others = crate::hosts::record::live_instances(state.store.as_ref(), &state.config.host.name).await?;
    let busy: BTreeSet<String> = state
        .ops
        .list()
        .await?
        .into_iter()
        .filter(|op| op.status == crate::model::OperationStatus::Running)
        .filter(|op| op.runner.as_ref().is_some_and(|r| others.contains(r)))
        .map(|op| op.target_id)
        .collect();
    let mut here = BTreeSet::new();
    for (rec, _) in records {
        let local = state.is_local(rec.host.as_deref());
        if busy.contains(&rec.id) {
            known.insert(rec.id.clone());
            if local {
                here.insert(rec.id.clone());
            }
            continue;
        }
        match rec.phase {
            Phase::Ready if !local => {
                known.insert(rec.id.clone());
            }
            Phase::Ready => {
                known.insert(rec.id.clone());
                here.insert(rec.id.clone());
                ready.push(rec);
            }
            Phase::Creating => {
                crate::vms::define::undo_create(state, &rec).await;
                report.creates_undone.push(rec.id.clone());
            }
            Phase::Deleting => match crate::vms::define::finish_delete(state, &rec).await {
                Ok(()) => report.deletes_finished.push(rec.id.clone()),
                Err(e) => tracing::warn!(vm = %rec.id, "cannot finish deleting: {e}"),
            },
        }
    }

    let held = Held::read(state).await?;
    if let Some(vms) = &held.vms {
        // Records from before `desired_running` existed learn it from what runs.
        for rec in ready.iter().filter(|r| r.desired_running.is_none()) {
            if let Some(vm) = vms.iter().find(|v| v.spec.id == rec.id) {
                use vmm_manager::VmState;
                let running = matches!(vm.status.state, VmState::Starting | VmState::Running | VmState::Paused);
                if let Err(e) = crate::vms::records::set_desired_running(state, &rec.id, running).await {
                    tracing::warn!(vm = %rec.id, "cannot record whether it should run: {e}");
                }
            }
        }
        let defined: BTreeSet<&str> = vms.iter().map(|v| v.spec.id.as_str()).collect();
        for rec in ready.iter().filter(|r| !defined.contains(r.id.as_str())) {
            match crate::vms::define::redefine(state, rec).await {
                Ok(started) => {
                    report.redefined.push(rec.id.clone());
                    if started {
                        report.restarted.push(rec.id.clone());
                    }
                }
                Err(e) => {
                    tracing::error!(vm = %rec.id, name = %rec.name, "cannot define the lost VM again: {e}");
                    report.not_redefined.push(format!("{}: {e}", rec.id));
                }
            }
        }
    }
    recreate_networks(state, &held, &mut report).await?;
    remove_orphans(state, &known, &here, held, &mut report).await;
    remove_stale_probes(state, &mut report).await;
    Ok(report)
}

/// Resumes or undoes the sagas an earlier api process left (see [`crate::saga`]); one
/// that cannot be settled now stays for the next pass.
async fn recover_sagas(state: &std::sync::Arc<AppState>, report: &mut Report) -> Result<(), ApiError> {
    use crate::saga::{recover, recover_in_background, Recovered};
    let mut records = crate::saga::left_over(state).await?;
    // A database's saga creates or deletes a VM through the VM's own saga: the VMs'
    // are settled first, so the database's finds its VM whole or gone.
    records.sort_by_key(|r| !r.kind.starts_with("vm."));
    for record in records {
        report.examined += 1;
        let id = record.id.clone();
        let outcome = match record.kind.as_str() {
            "vm.create" => recover(state, &crate::vms::create::VM_CREATE, record).await,
            "vm.delete" => recover(state, &crate::vms::delete::VM_DELETE, record).await,
            "volume.attach" => recover(state, &crate::volumes::attach::VOLUME_ATTACH, record).await,
            "vm.snapshot" => recover(state, &crate::vms::snapshot::VM_SNAPSHOT, record).await,
            "database.create" => recover(state, &crate::databases::create::DB_CREATE, record).await,
            "database.delete" => recover(state, &crate::databases::delete::DB_DELETE, record).await,
            "image.import" => recover_in_background(state, &crate::images::import::IMAGE_IMPORT, record).await,
            other => Recovered::Stuck(format!("no saga of kind {other} is known to this api")),
        };
        match outcome {
            Recovered::Finished => report.sagas_finished.push(id),
            Recovered::Undone => report.sagas_undone.push(id),
            Recovered::Resumed => report.sagas_resumed.push(id),
            Recovered::Stuck(why) => {
                tracing::warn!(saga = %id, "cannot settle the saga now: {why}");
                report.sagas_stuck.push(format!("{id}: {why}"));
            }
        }
    }
    Ok(())
}

/// Removes the remote disks an earlier api process made for a moment and left.
async fn remove_stale_probes(state: &AppState, report: &mut Report) {
    let stale = match crate::volumes::work::stale_probes(state).await {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("reconcile: cannot look for left remote disks: {e}");
            return;
        }
    };
    for name in stale {
        report.examined += 1;
        match state.blockd.delete_remote_disk(&name).await {
            Ok(()) => report.orphan_remote_disks.push(name),
            Err(e) => tracing::warn!(disk = %name, "cannot remove a left remote disk: {e}"),
        }
    }
}

/// The periodic pass, while the api serves: markers of changes cut short (by a crash,
/// or left because a daemon was down at the last pass), networks netd lost, and
/// orphans named after a VM id. What the daemons hold is read *before* the store: a
/// VM's record is written before any of its parts is made and removed after all of
/// them, so a part read earlier whose VM has no record later is an orphan, never a VM
/// being made. Volume claims are left to the start pass. VMs being created or deleted
/// are known (their operation runs in this process); VMs vmm-manager lost are defined
/// again only at start.
pub async fn live(state: &std::sync::Arc<AppState>) -> Result<Report, ApiError> {
    let mut report = Report::default();
    recover_sagas(state, &mut report).await?;
    remove_cut_short(state, &mut report).await?;
    let mut held = Held::read(state).await?;
    // Claims are keyed by volume, not by VM: one read now may belong to a VM deleted
    // since whose volume another VM has just claimed. They are swept at start only,
    // when nothing else runs.
    held.claims.clear();
    let records = store::list_json::<VmRecord>(state.store.as_ref(), "vms/").await?;
    report.examined += records.len();
    let here: BTreeSet<String> = records
        .iter()
        .filter(|(r, _)| state.is_local(r.host.as_deref()))
        .map(|(r, _)| r.id.clone())
        .collect();
    let known: BTreeSet<String> = records.into_iter().map(|(r, _)| r.id).collect();
    recreate_networks(state, &held, &mut report).await?;
    remove_orphans(state, &known, &here, held, &mut report).await;
    remove_stale_probes(state, &mut report).await;
    Ok(report)
}

/// Runs [`live`] every `every` until the process ends, counting passes and repairs
/// for `/metrics` and logging what it repaired.
pub async fn periodically(state: std::sync::Arc<AppState>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        let started = std::time::Instant::now();
        match live(&state).await {
            Ok(r) => {
                use std::sync::atomic::Ordering::Relaxed;
                state.drift.passes.fetch_add(1, Relaxed);
                state.drift.repairs.fetch_add(r.repairs() as u64, Relaxed);
                if !r.is_empty() {
                    tracing::warn!(examined = r.examined, ms = started.elapsed().as_secs_f64() * 1000.0,
                        report = %serde_json::to_string(&r).unwrap_or_default(), "reconciled drift");
                }
            }
            Err(e) => tracing::warn!("periodic reconcile failed: {e}"),
        }
    }
}

/// Settles the operations the previous process left running, once the pass has
/// finished or undone their work: a VM delete the pass finished succeeded; a VM create
/// whose VM is whole succeeded, after starting the VM if it was to be started (the
/// crash may have come between defining and starting it); anything else failed with a
/// message saying what to do.
pub async fn settle_interrupted(state: &AppState, report: Option<&Report>) {
    let interrupted = std::mem::take(&mut *state.interrupted.lock().unwrap_or_else(|p| p.into_inner()));
    if !interrupted.is_empty() {
        tracing::info!(
            count = interrupted.len(),
            "settling the operations the previous api process left running"
        );
    }
    for op in interrupted {
        // A saga resumed in a task ends its operation itself, later.
        if report.is_some_and(|r| r.sagas_resumed.contains(&op.id)) {
            continue;
        }
        // A saga the pass resumed ended its operation itself.
        if state
            .ops
            .get(&op.id)
            .await
            .is_ok_and(|o| o.status != crate::model::OperationStatus::Running)
        {
            continue;
        }
        let finished = report.is_some_and(|r| r.deletes_finished.contains(&op.target_id));
        let saga_finished = report.is_some_and(|r| r.sagas_finished.contains(&op.id));
        let saga_undone = report.is_some_and(|r| r.sagas_undone.contains(&op.id));
        let outcome = match op.kind.as_str() {
            "vm.create" | "vm.delete" if saga_finished => Ok(()),
            "vm.create" if saga_undone => Err(ApiError::unavailable(
                "the api restarted before the VM was made; nothing of it was kept; retry the create",
            )),
            "vm.delete" if finished => Ok(()),
            "vm.create" if !report.is_some_and(|r| r.creates_undone.contains(&op.target_id)) => {
                finish_create(state, &op.target_id).await
            }
            "vm.create" => Err(ApiError::unavailable(
                "the api restarted before the VM was made; nothing of it was kept; retry the create",
            )),
            _ => Err(ApiError::unavailable(
                "the api restarted while this operation ran; retry it",
            )),
        };
        match outcome {
            Ok(()) => {
                state.ops.progress(&op.id, "finished after the api restarted").await;
                state.ops.succeed(&op.id).await;
            }
            Err(e) => state.ops.fail(&op.id, &e).await,
        }
    }
}

/// A create cut short after its VM was recorded whole: started when it was to be.
async fn finish_create(state: &AppState, id: &str) -> Result<(), ApiError> {
    let Some((rec, _)) = store::get_json::<VmRecord>(state.store.as_ref(), &crate::vms::records::vm_key(id)).await?
    else {
        return Err(ApiError::unavailable(
            "the api restarted while the VM was made and it is gone; retry the create",
        ));
    };
    if rec.phase != Phase::Ready {
        return Err(ApiError::unavailable(
            "the api restarted while this operation ran; retry it",
        ));
    }
    if rec.desired_running == Some(true) {
        let d = crate::hosts::daemons::of_vm(state, &rec).await?;
        let vm = d.vmm.get(id).await.map_err(crate::daemons::upstream)?;
        use vmm_manager::VmState;
        if matches!(vm.status.state, VmState::Stopped | VmState::Failed) {
            let started = d
                .vmm
                .action(id, vmm_manager::VmAction::Start, false)
                .await
                .map_err(crate::daemons::upstream)?;
            state.observe(rec.host.as_deref(), &started);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_names_hearth_gives_are_taken_for_vm_parts() {
        let id = "0b4c6f0e-2a53-4c1e-9a57-6f1f8c1c2d3e";
        assert_eq!(vm_id_of_port(&format!("{id}-0")), Some(id));
        assert_eq!(vm_id_of_port(&format!("{id}-12")), Some(id));
        assert_eq!(vm_id_of_port("router-0"), None);
        assert_eq!(vm_id_of_port(id), None);
        assert_eq!(vm_id_of_root_disk(&format!("vm-{id}-root")), Some(id));
        assert_eq!(vm_id_of_root_disk("vm-data-root"), None);
        assert_eq!(vm_id_of_root_disk("data"), None);
    }
}
