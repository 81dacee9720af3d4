//! Changing a ready database: its settings and password (the guest agent applies them
//! at once; the seed is rewritten too, so a reboot or a replaced VM gets them), its
//! storage (the volume grows, then the file system, online), its size (the VM
//! restarts), and stop, start, restart.

use std::time::Duration;

use guest_agent::Request;

use super::command::{check_cidrs, check_password, new_password, parse_storage, UpdateDatabase};
use super::create::{server_tls, store_seed};
use super::error::DatabaseError;
use super::record::{key, Database, DatabaseRecord, DbPhase};
use crate::model::VmRecord;
use crate::state::AppState;
use crate::store;

/// How long the agent may take over one change (a restart of PostgreSQL under TCG).
const AGENT_TIMEOUT: Duration = Duration::from_secs(180);

fn ready(rec: &DatabaseRecord, action: &'static str) -> Result<(), DatabaseError> {
    if rec.phase != DbPhase::Ready {
        return Err(DatabaseError::Busy {
            name: rec.name.clone(),
            phase: format!("{:?}", rec.phase).to_lowercase(),
            action,
        });
    }
    Ok(())
}

async fn vm_record(state: &AppState, rec: &DatabaseRecord) -> Result<(VmRecord, u64), DatabaseError> {
    let id = rec.vm_id.as_deref().unwrap_or_default();
    store::get_json::<VmRecord>(state.store.as_ref(), &format!("vms/{id}"))
        .await?
        .ok_or_else(|| DatabaseError::Invalid(format!("database {:?} has lost its VM", rec.name)))
}

/// Is the database's VM running now?
pub async fn vm_state(state: &AppState, rec: &DatabaseRecord) -> Option<String> {
    let id = rec.vm_id.as_deref()?;
    state
        .vmm
        .get(id)
        .await
        .ok()
        .map(|v| v.status.state.as_str().to_string())
}

/// Writes the seed again from the record (same certificate and key), so that the next
/// boot starts from the record's settings and password.
async fn reseed(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    let (vm, _) = vm_record(state, rec).await?;
    let old = vm.user_data.as_deref().unwrap_or_default();
    let doc: serde_json::Value = serde_json::from_str(old.trim_start_matches("#cloud-config").trim())
        .map_err(|e| DatabaseError::Invalid(format!("the database VM's seed is unreadable: {e}")))?;
    let tls: guest_agent::TlsFiles = serde_json::from_value(doc[guest_agent::SEED_KEY]["tls"].clone())
        .map_err(|e| DatabaseError::Invalid(format!("the database VM's seed has no TLS files: {e}")))?;
    store_seed(state, rec, tls).await
}

/// A new server certificate from hearth's CA for the same address: into the seed first
/// (a reboot serves it), then to a running server, which loads it with a configuration
/// reload (no restart: open connections stay). The CA, and so every client's
/// `sslrootcert`, stays the same. The record learns the new expiry last, once the
/// certificate is in place: a renewal cut short is made again at the next look.
pub async fn rotate_certificate(
    state: &AppState,
    mut rec: DatabaseRecord,
    rev: u64,
) -> Result<Database, DatabaseError> {
    ready(&rec, "renew its certificate")?;
    let running = vm_state(state, &rec).await.as_deref() == Some("running");
    let (tls, not_after_ms) = server_tls(state, &rec).await?;
    store_seed(state, &rec, tls.clone()).await?;
    if running {
        super::agent::call(state, &rec, &Request::SetTls { tls }, AGENT_TIMEOUT).await?;
    }
    rec.cert_not_after_ms = Some(not_after_ms);
    save(state, &rec, rev).await?;
    super::create::event(state, &rec, "certificate_renewed");
    let vm_state = vm_state(state, &rec).await;
    Ok(Database::of(&rec, vm_state.as_deref()))
}

/// netd's allow-list at the database's port: the new networks, in place (no restart).
async fn allow(state: &AppState, rec: &DatabaseRecord) -> Result<(), DatabaseError> {
    let (vm, _) = vm_record(state, rec).await?;
    let Some(nic) = vm.nics.first() else {
        return Ok(());
    };
    let ingress = super::create::ingress_of(rec);
    let spec = netd::network::PortSpec {
        network: crate::model::host_name(&vm.project, &nic.network),
        mac: Some(nic.mac.clone()),
        ip: Some(nic.ip),
        queues: 1,
        ingress: Some(ingress.to_netd()),
    };
    state
        .netd
        .ensure_port(&nic.port, &spec)
        .await
        .map_err(crate::daemons::upstream)?;
    store::update_json(state.store.as_ref(), &format!("vms/{}", vm.id), |v: &mut VmRecord| {
        if let Some(n) = v.nics.first_mut() {
            n.ingress = Some(ingress.clone());
        }
        true
    })
    .await?;
    Ok(())
}

/// Writes the record if it is still at `rev`; its new revision.
async fn save(state: &AppState, rec: &DatabaseRecord, rev: u64) -> Result<u64, DatabaseError> {
    state
        .store
        .compare_and_swap(&key(&rec.project, &rec.name), Some(rev), store::encode(rec))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => DatabaseError::Busy {
                name: rec.name.clone(),
                phase: "being changed by another request".into(),
                action: "change it now",
            },
            other => other.into(),
        })
}

/// `PATCH`: every part checked first, then applied in order: storage, settings, size.
pub async fn update(
    state: &AppState,
    mut rec: DatabaseRecord,
    rev: u64,
    req: UpdateDatabase,
) -> Result<Database, DatabaseError> {
    ready(&rec, "change it")?;
    let storage = req.storage.as_deref().map(parse_storage).transpose()?;
    if let Some(s) = storage {
        if s < rec.storage_bytes {
            return Err(DatabaseError::Invalid(format!(
                "storage can only grow: it is {} bytes, {s} asked",
                rec.storage_bytes
            )));
        }
    }
    if let Some(c) = &req.allowed_cidrs {
        check_cidrs(c)?;
    }
    if let Some(p) = &req.parameters {
        guest_agent::check_parameters(p).map_err(DatabaseError::Invalid)?;
    }
    if let Some(m) = req.memory_mib {
        if m < super::command::MIN_MEMORY_MIB {
            return Err(DatabaseError::Invalid(format!(
                "memory_mib {m} is too little for PostgreSQL: at least {}",
                super::command::MIN_MEMORY_MIB
            )));
        }
    }
    let running = vm_state(state, &rec).await.as_deref() == Some("running");
    let mut rev = rev;
    if let Some(size) = storage.filter(|s| *s > rec.storage_bytes) {
        let vol = crate::volumes::records::find_record(state, &rec.project, &rec.volume).await?;
        crate::volumes::work::resize_local(state, &rec.project, &vol, size).await?;
        rec.storage_bytes = size;
        rev = save(state, &rec, rev).await?;
        if running {
            super::agent::call(state, &rec, &Request::GrowFs, AGENT_TIMEOUT).await?;
        }
    }
    if req.allowed_cidrs.is_some() || req.parameters.is_some() {
        if let Some(c) = req.allowed_cidrs {
            rec.allowed_cidrs = c;
        }
        if let Some(p) = req.parameters {
            rec.parameters = p;
        }
        rec.generation += 1;
        rev = save(state, &rec, rev).await?;
        reseed(state, &rec).await?;
        allow(state, &rec).await?;
        if running {
            let configure = Request::Configure {
                allowed_cidrs: rec.hba_cidrs(),
                parameters: rec.parameters.clone(),
                generation: rec.generation,
            };
            super::agent::call(state, &rec, &configure, AGENT_TIMEOUT).await?;
        }
    }
    if req.vcpus.is_some() || req.memory_mib.is_some() {
        let (vm, _) = vm_record(state, &rec).await?;
        let cmd = crate::vms::command::ResizeVmCommand::try_from(crate::model::UpdateVm {
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
        })?;
        let vm = crate::vms::resize::resize(state, vm, cmd, true).await?;
        rec.vcpus = vm.vcpus;
        rec.memory_mib = vm.memory_mib;
        save(state, &rec, rev).await?;
    }
    super::create::event(state, &rec, "changed");
    let vm_state = vm_state(state, &rec).await;
    Ok(Database::of(&rec, vm_state.as_deref()))
}

/// A new password (the given one or a made one), set by the agent; shown once.
pub async fn reset_password(
    state: &AppState,
    mut rec: DatabaseRecord,
    rev: u64,
    password: Option<String>,
) -> Result<Database, DatabaseError> {
    ready(&rec, "reset its password")?;
    if let Some(p) = &password {
        check_password(p)?;
    }
    let password = password.unwrap_or_else(new_password);
    let running = vm_state(state, &rec).await.as_deref() == Some("running");
    rec.password_verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
    rec.generation += 1;
    if running {
        let set = Request::SetPassword {
            verifier: rec.password_verifier.clone(),
            generation: rec.generation,
        };
        super::agent::call(state, &rec, &set, AGENT_TIMEOUT).await?;
    }
    save(state, &rec, rev).await?;
    reseed(state, &rec).await?;
    super::create::event(state, &rec, "password_reset");
    let vm_state = vm_state(state, &rec).await;
    let mut db = Database::of(&rec, vm_state.as_deref());
    db.password = Some(password);
    Ok(db)
}

/// The last `lines` lines of the server's log.
pub async fn logs(state: &AppState, rec: &DatabaseRecord, lines: usize) -> Result<Vec<String>, DatabaseError> {
    ready(rec, "read its log")?;
    let r = super::agent::call(state, rec, &Request::Logs { lines }, Duration::from_secs(30)).await?;
    Ok(r["lines"]
        .as_array()
        .map(|a| a.iter().filter_map(|l| l.as_str().map(str::to_string)).collect())
        .unwrap_or_default())
}
