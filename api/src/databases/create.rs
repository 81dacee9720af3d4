//! Creating a database: the saga [`DB_CREATE`]. Its steps claim the name (the record,
//! `creating`), make the data volume, create the VM (its own VM-create saga, stopped,
//! with the volume attached and a guest agent channel), write the seed the guest agent
//! reads (the server's certificate for the VM's address, pg_hba's networks, settings,
//! the password's SCRAM verifier), start the VM, and wait until a real query over TLS
//! with the real password succeeds. A failure, or a crash before the database is
//! ready, undoes every step: no VM, port, volume, seed or record is left.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::command::{new_password, CreateDatabaseCommand};
use super::error::DatabaseError;
use super::record::{key, Database, DatabaseRecord, DbPhase};
use super::{pki, probe};
use crate::model::{CreateVm, HypervisorKind, Operation, VmRecord};
use crate::networks::DEFAULT_NETWORK;
use crate::saga::{Saga, SagaDef, Step};
use crate::state::AppState;
use crate::store;

/// How long a new database may take to answer its first query (a TCG guest here takes
/// ~20 s; a busy host much longer).
pub const READY_TIMEOUT: Duration = Duration::from_secs(600);

/// What the saga carries from step to step (recorded with its progress).
#[derive(Debug, Serialize, Deserialize)]
pub struct DbCreate {
    pub rec: DatabaseRecord,
    /// Kept in this process only, for the readiness query: never in the store. A
    /// create resumed after a crash is undone (readiness comes before the pivot).
    #[serde(skip)]
    pub password: Option<String>,
}

/// The hypervisor of a new database's VM: the one asked for; else Cloud Hypervisor
/// where it is installed and KVM runs a stock Linux guest, else QEMU (under TCG where
/// KVM does not work). vmm-manager learns the last by booting the image's kernel once.
async fn choose_hypervisor(
    state: &AppState,
    requested: Option<HypervisorKind>,
    image: &imaged::ImageInfo,
) -> Result<HypervisorKind, DatabaseError> {
    if let Some(kind) = requested {
        return Ok(kind);
    }
    let host = state
        .host_facts
        .get_or(|| state.vmm.host())
        .await
        .map_err(crate::daemons::upstream)?;
    let cloud_hypervisor = host
        .hypervisors
        .iter()
        .any(|h| HypervisorKind::from(h.kind) == HypervisorKind::CloudHypervisor && h.available);
    let kernel = image.boot.kernel_bzimage.as_ref().or(image.boot.kernel_elf.as_ref());
    let kvm = match kernel {
        Some(kernel) if cloud_hypervisor => Some(state.vmm.kvm(kernel).await.map_err(crate::daemons::upstream)?),
        _ => None,
    };
    let kind = default_hypervisor(cloud_hypervisor, kvm.as_ref().map(|v| v.usable));
    tracing::info!(
        hypervisor = %kind,
        cloud_hypervisor_installed = cloud_hypervisor,
        kvm = kvm.as_ref().map(|v| v.how.as_str()).unwrap_or("not asked"),
        "hypervisor for a new database"
    );
    Ok(kind)
}

/// Cloud Hypervisor when it is installed and KVM runs a Linux guest; QEMU otherwise.
fn default_hypervisor(cloud_hypervisor_installed: bool, kvm_runs_linux: Option<bool>) -> HypervisorKind {
    if cloud_hypervisor_installed && kvm_runs_linux == Some(true) {
        HypervisorKind::CloudHypervisor
    } else {
        HypervisorKind::Qemu
    }
}

/// Checks the request, claims the name (a taken one is refused at once with a 409)
/// and runs the rest in a task. The answer carries the password, once.
pub async fn begin(
    state: &Arc<AppState>,
    project: &str,
    cmd: CreateDatabaseCommand,
) -> Result<(Operation, Database), DatabaseError> {
    let network = cmd.network.clone().unwrap_or_else(|| DEFAULT_NETWORK.to_string());
    // What would fail later in the VM's create is refused now, with nothing made.
    let net = match state.netd.network(&crate::model::host_name(project, &network)).await {
        Ok(n) => n,
        Err(e) if e.is_not_found() => {
            return Err(DatabaseError::Invalid(format!("network {network:?} does not exist")))
        }
        Err(e) => return Err(crate::daemons::upstream(e).into()),
    };
    let image = crate::vms::create::find_image(&state.images, "postgres")
        .await
        .map_err(|e| DatabaseError::Invalid(format!("the postgres image is not available: {e}")))?;
    let hypervisor = choose_hypervisor(state, cmd.hypervisor, &image).await?;
    let password = cmd.password.clone().unwrap_or_else(new_password);
    let rec = DatabaseRecord {
        id: uuid::Uuid::new_v4().to_string(),
        name: cmd.name.clone(),
        project: project.to_string(),
        version: cmd.version,
        vcpus: cmd.vcpus,
        memory_mib: cmd.memory_mib,
        storage_bytes: cmd.storage_bytes,
        network,
        // By default, the database's own network.
        allowed_cidrs: cmd
            .allowed_cidrs
            .unwrap_or_else(|| vec![net.spec.subnet.trunc().to_string()]),
        extensions: cmd.extensions,
        parameters: cmd.parameters,
        hypervisor: Some(hypervisor.to_string()),
        phase: DbPhase::Creating,
        vm_name: format!("db-{}", cmd.name),
        volume: format!("db-{}-data", cmd.name),
        vm_id: None,
        address: None,
        gateway: Some(net.gateway),
        password_verifier: postgres_protocol::password::scram_sha_256(password.as_bytes()),
        generation: 1,
        created_at_ms: vmm_manager::spec::now_ms(),
        cert_not_after_ms: None,
    };
    let context = DbCreate {
        rec,
        password: Some(password.clone()),
    };
    let mut saga = Saga::begin(state, &DB_CREATE, &uuid::Uuid::new_v4().to_string(), context).await?;
    saga.run_until(state, Some("vm")).await?;
    let name = saga.context.rec.name.clone();
    let op = match saga.start_operation(state, project, "database", &name).await {
        Ok(op) => op,
        Err(e) => {
            saga.abandon(state, &e).await;
            return Err(e.into());
        }
    };
    let mut db = Database::of(&saga.context.rec, None);
    db.password = Some(password);
    let task_state = state.clone();
    tokio::spawn(async move {
        let _ = saga.finish(&task_state).await;
    });
    Ok((op, db))
}

/// Creating a database, step by step; once `ready` has run it is whole.
pub static DB_CREATE: SagaDef<DbCreate, DatabaseError> = SagaDef {
    kind: "database.create",
    pivot: 6,
    steps: &[
        Step {
            name: "name",
            doing: "claiming the name",
            run: |state, c| Box::pin(claim(state, c)),
            undo: |state, c| Box::pin(unclaim(state, c)),
        },
        Step {
            name: "volume",
            doing: "making the data volume",
            run: |state, c| Box::pin(make_volume(state, c)),
            undo: |state, c| Box::pin(remove_own_volume(state, &c.rec)),
        },
        Step {
            name: "vm",
            doing: "creating the VM",
            run: |state, c| Box::pin(make_vm(state, c)),
            undo: |state, c| Box::pin(remove_vm(state, &c.rec)),
        },
        Step {
            name: "seed",
            doing: "writing the guest agent's seed",
            run: |state, c| Box::pin(write_seed(state, c)),
            // The seed goes with the VM.
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: "start",
            doing: "starting the VM",
            run: |state, c| Box::pin(start_vm(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: "ready",
            doing: "waiting for PostgreSQL to answer over TLS",
            run: |state, c| Box::pin(wait_ready(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
        Step {
            name: "recorded",
            doing: "recording the database ready",
            run: |state, c| Box::pin(mark_ready(state, c)),
            undo: |_, _| Box::pin(async { Ok(()) }),
        },
    ],
};

async fn claim(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let k = key(&c.rec.project, &c.rec.name);
    state
        .store
        .compare_and_swap(&k, None, store::encode(&c.rec))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => DatabaseError::AlreadyExists(c.rec.name.clone()),
            other => other.into(),
        })?;
    Ok(())
}

/// Removes the record only when it is this create's.
async fn unclaim(state: &AppState, c: &DbCreate) -> Result<(), DatabaseError> {
    let k = key(&c.rec.project, &c.rec.name);
    if let Some((held, _)) = store::get_json::<DatabaseRecord>(state.store.as_ref(), &k).await? {
        if held.id == c.rec.id {
            state.store.delete(&k).await?;
        }
    }
    Ok(())
}

async fn put(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    state
        .store
        .put(&key(&rec.project, &rec.name), store::encode(rec))
        .await?;
    Ok(())
}

async fn make_volume(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let req = crate::volumes::command::CreateVolumeCommand {
        name: c.rec.volume.clone(),
        origin: crate::volumes::command::Origin::Empty {
            size_bytes: c.rec.storage_bytes,
        },
    };
    match crate::volumes::work::create_now(state, &c.rec.project, req, Some(c.rec.managed_by())).await {
        Ok(_) => Ok(()),
        // Someone else's (a create resumed after a crash is undone, never run on): the
        // saga's undo leaves it alone, as this step did not make it.
        Err(crate::volumes::error::VolumeError::AlreadyExists(_)) => {
            Err(DatabaseError::VolumeTaken(c.rec.volume.clone()))
        }
        Err(e) => Err(e.into()),
    }
}

/// Removes the data volume if this database's create made it (the volume records its
/// maker): a volume of that name that was someone else's stays.
async fn remove_own_volume(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    let vol = match crate::volumes::records::find_record(state, &rec.project, &rec.volume).await {
        Ok(v) => v,
        Err(crate::volumes::error::VolumeError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if vol.managed_by.as_deref() == Some(rec.managed_by().as_str()) {
        remove_volume(state, rec).await
    } else {
        tracing::info!(volume = %rec.volume, "not removing a volume this database's create did not make");
        Ok(())
    }
}

/// Removes the data volume (a missing one is fine).
pub(crate) async fn remove_volume(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    match crate::volumes::work::remove(state, &rec.project, &rec.volume).await {
        Ok(()) | Err(crate::volumes::error::VolumeError::NotFound(_)) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn make_vm(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let mut req: CreateVm = serde_json::from_value(serde_json::json!({
        "name": c.rec.vm_name,
        "image": "postgres",
        "vcpus": c.rec.vcpus,
        "memory_mib": c.rec.memory_mib,
        "hypervisor": c.rec.hypervisor.clone().unwrap_or_else(|| "qemu".into()),
        "nics": [{"network": c.rec.network}],
        "volumes": [c.rec.volume],
        "start": false,
    }))
    .map_err(|e| DatabaseError::Invalid(e.to_string()))?;
    req.managed_by = Some(c.rec.managed_by());
    if let Some(nic) = req.nics.as_mut().and_then(|n| n.first_mut()) {
        nic.ingress = Some(ingress_of(&c.rec));
    }
    let vm = crate::vms::create::run(state, &c.rec.project, req).await?;
    let nic = vm
        .nics
        .first()
        .ok_or_else(|| DatabaseError::Invalid("the database VM has no NIC".into()))?;
    c.rec.vm_id = Some(vm.id.clone());
    c.rec.address = Some(nic.ip);
    c.rec.gateway = Some(nic.gateway);
    put(state, &c.rec).await
}

/// netd's allow-list for the database's port: PostgreSQL's port only from the allowed
/// IPv4 networks and the host (IPv6 never reaches a VM: netd drops it at the TAP).
pub(crate) fn ingress_of(rec: &DatabaseRecord) -> crate::model::NicIngress {
    crate::model::NicIngress {
        tcp_ports: vec![guest_agent::PG_PORT],
        from: rec
            .hba_cidrs()
            .iter()
            .filter_map(|c| {
                if c.contains('/') {
                    c.parse::<ipnet::Ipv4Net>().ok()
                } else {
                    c.parse::<std::net::Ipv4Addr>().ok().map(ipnet::Ipv4Net::from)
                }
            })
            .map(|n| n.trunc())
            .collect(),
    }
}

/// Deletes the database's VM, if there is one and it is the database's.
pub(crate) async fn remove_vm(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    let (vm, rev) = match crate::vms::records::resolve(state, &rec.project, &rec.vm_name).await {
        Ok(found) => found,
        Err(crate::vms::error::VmError::NotFound(_)) => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if vm.managed_by.as_deref() != Some(rec.managed_by().as_str()) {
        return Ok(());
    }
    crate::vms::delete::run(state, vm, rev).await?;
    Ok(())
}

/// The guest agent's part of the seed: everything it needs to configure the server.
pub(crate) fn seed_user_data(rec: &DatabaseRecord, tls: guest_agent::TlsFiles) -> Result<String, DatabaseError> {
    let seed = guest_agent::PostgresSeed {
        generation: rec.generation,
        version: rec.version.clone(),
        password_verifier: rec.password_verifier.clone(),
        allowed_cidrs: rec.hba_cidrs(),
        parameters: rec.parameters.clone(),
        extensions: rec.extensions.clone(),
        tls,
    };
    let doc = serde_json::json!({ guest_agent::SEED_KEY: seed });
    Ok(format!("#cloud-config\n{doc}\n"))
}

/// A new server certificate for the database's address, signed by hearth's CA, and
/// when it expires.
pub(super) async fn server_tls(
    state: &AppState,
    rec: &DatabaseRecord,
) -> Result<(guest_agent::TlsFiles, u64), DatabaseError> {
    let address = rec
        .address
        .ok_or_else(|| DatabaseError::Invalid("the database VM has no address".into()))?;
    let ca = pki::ca(state).await?;
    let (cert_pem, key_pem, not_after_ms) =
        pki::server_cert(&ca, address.into(), &format!("{}.{}.db.hearth", rec.name, rec.project))?;
    let tls = guest_agent::TlsFiles {
        ca_pem: ca.cert_pem.clone(),
        cert_pem,
        key_pem,
    };
    Ok((tls, not_after_ms))
}

/// Writes the database's seed (its settings from the record, and `tls`) into its VM's
/// record and seed disk: what the guest agent reads at the next boot.
pub(super) async fn store_seed(
    state: &AppState,
    rec: &DatabaseRecord,
    tls: guest_agent::TlsFiles,
) -> Result<(), DatabaseError> {
    let user_data = seed_user_data(rec, tls)?;
    let vm_key = format!("vms/{}", rec.vm_id.as_deref().unwrap_or_default());
    store::update_json(state.store.as_ref(), &vm_key, |vm: &mut VmRecord| {
        vm.user_data = Some(user_data.clone());
        true
    })
    .await?;
    let (vm, _) = store::get_json::<VmRecord>(state.store.as_ref(), &vm_key)
        .await?
        .ok_or_else(|| DatabaseError::Invalid(format!("database {:?} has lost its VM", rec.name)))?;
    crate::vms::define::seed_disk(state, &vm).await?;
    Ok(())
}

async fn write_seed(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let (tls, not_after_ms) = server_tls(state, &c.rec).await?;
    c.rec.cert_not_after_ms = Some(not_after_ms);
    store_seed(state, &c.rec, tls).await
}

async fn start_vm(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let id = c.rec.vm_id.clone().unwrap_or_default();
    crate::vms::records::set_desired_running(state, &id, true).await?;
    let vm = state.vmm.get(&id).await.map_err(crate::daemons::upstream)?;
    if matches!(
        vm.status.state,
        vmm_manager::spec::VmState::Stopped | vmm_manager::spec::VmState::Failed
    ) {
        let started = state
            .vmm
            .action(&id, vmm_manager::spec::VmAction::Start, false)
            .await
            .map_err(crate::daemons::upstream)?;
        state.live.observe(&started);
    }
    Ok(())
}

async fn wait_ready(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    let password = c.password.clone().ok_or_else(|| DatabaseError::NotReady {
        name: c.rec.name.clone(),
        reason: "resumed after a restart: the password is no longer known".into(),
    })?;
    ready(state, &c.rec, &password).await
}

async fn mark_ready(state: &AppState, c: &mut DbCreate) -> Result<(), DatabaseError> {
    c.rec.phase = DbPhase::Ready;
    put(state, &c.rec).await?;
    event(state, &c.rec, "ready");
    Ok(())
}

/// A `database` event on the bus (`GET /v1/events?kinds=database`).
pub(crate) fn event(state: &AppState, rec: &DatabaseRecord, what: &str) {
    state.events.emit(
        "database",
        &rec.project,
        serde_json::json!({"name": rec.name, "event": what, "generation": rec.generation}),
    );
}

/// Readiness with a CA read from the store.
pub(crate) async fn ready(state: &AppState, rec: &DatabaseRecord, password: &str) -> Result<(), DatabaseError> {
    let address = rec.address.ok_or_else(|| DatabaseError::Invalid("no address".into()))?;
    let ca = pki::ca(state).await?;
    probe::until_ready(
        std::net::SocketAddr::new(address.into(), guest_agent::PG_PORT),
        &ca.cert_pem,
        password,
        READY_TIMEOUT,
    )
    .await
    .map_err(|reason| DatabaseError::NotReady {
        name: rec.name.clone(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn databases_run_under_cloud_hypervisor_only_where_kvm_runs_linux() {
        use HypervisorKind::{CloudHypervisor, Qemu};
        assert_eq!(default_hypervisor(true, Some(true)), CloudHypervisor);
        // This machine: /dev/kvm is there, but a stock kernel does not boot under it.
        assert_eq!(default_hypervisor(true, Some(false)), Qemu);
        // Not installed, or no kernel to probe with.
        assert_eq!(default_hypervisor(false, Some(true)), Qemu);
        assert_eq!(default_hypervisor(true, None), Qemu);
    }
}
