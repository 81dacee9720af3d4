//! A database as the store keeps it (`databases/<project>/<name>`), and as the API
//! shows it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

use super::error::DatabaseError;
use crate::state::AppState;
use crate::store;

/// Where a database is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DbPhase {
    Creating,
    Ready,
    Deleting,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatabaseRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub version: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_bytes: u64,
    pub network: String,
    pub allowed_cidrs: Vec<String>,
    pub extensions: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    pub hypervisor: Option<String>,
    pub phase: DbPhase,
    /// The VM (`db-<name>`) and the data volume (`db-<name>-data`).
    pub vm_name: String,
    pub volume: String,
    #[serde(default)]
    pub vm_id: Option<String>,
    #[serde(default)]
    pub address: Option<Ipv4Addr>,
    /// The network's gateway: the host's address there (always allowed in).
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// The SCRAM verifier of the current password (the password itself is kept nowhere).
    pub password_verifier: String,
    /// Bumped by every change of settings or password (the guest agent applies a
    /// change only when it is newer than what it has).
    pub generation: u64,
    pub created_at_ms: u64,
    /// When the server's certificate expires (ms since the epoch); absent in records
    /// older than renewal, whose certificate was made at create for a year.
    #[serde(default)]
    pub cert_not_after_ms: Option<u64>,
}

pub fn key(project: &str, name: &str) -> String {
    format!("databases/{project}/{name}")
}

impl DatabaseRecord {
    pub fn managed_by(&self) -> String {
        format!("database/{}", self.name)
    }

    /// When the server's certificate expires (ms since the epoch).
    pub fn cert_expires_ms(&self) -> u64 {
        self.cert_not_after_ms
            .unwrap_or(self.created_at_ms + super::pki::SERVER_CERT_DAYS as u64 * 86_400_000)
    }

    /// The addresses the server accepts: the user's, and the host's own.
    pub fn hba_cidrs(&self) -> Vec<String> {
        let mut c = self.allowed_cidrs.clone();
        if let Some(g) = self.gateway {
            let host = format!("{g}/32");
            if !c.contains(&host) {
                c.push(host);
            }
        }
        c
    }
}

pub async fn find(state: &AppState, project: &str, name: &str) -> Result<(DatabaseRecord, u64), DatabaseError> {
    store::get_json::<DatabaseRecord>(state.store.as_ref(), &key(project, name))
        .await?
        .ok_or_else(|| DatabaseError::NotFound(name.to_string()))
}

pub async fn list(state: &AppState, project: &str) -> Result<Vec<DatabaseRecord>, DatabaseError> {
    Ok(
        store::list_json::<DatabaseRecord>(state.store.as_ref(), &format!("databases/{project}/"))
            .await?
            .into_iter()
            .map(|(r, _)| r)
            .collect(),
    )
}

/// Every project's databases, with their records' revisions.
pub async fn list_all(state: &AppState) -> Result<Vec<(DatabaseRecord, u64)>, DatabaseError> {
    Ok(store::list_json::<DatabaseRecord>(state.store.as_ref(), "databases/").await?)
}

/// A database, as `GET /v1/databases/{name}` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Database {
    pub name: String,
    /// `creating`, `running`, `stopped`, `failed`, `deleting`, or `unknown` while the
    /// host's vmm-manager cannot be reached.
    pub state: String,
    pub version: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_bytes: u64,
    pub network: String,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub address: Option<Ipv4Addr>,
    pub port: u16,
    pub user: String,
    /// `postgres://postgres@ADDRESS:5432/postgres?sslmode=verify-full`; give the CA
    /// (`GET /v1/databases/{name}/ca.pem`) as `sslrootcert`.
    pub uri: Option<String>,
    pub allowed_cidrs: Vec<String>,
    pub extensions: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    /// `qemu` or `cloud-hypervisor`: what runs its VM.
    pub hypervisor: String,
    /// When the server's certificate expires (ms since the epoch). hearth renews it
    /// 30 days before (`POST …/rotate-certificate` does it at once).
    pub certificate_expires_at_ms: u64,
    /// The VM that runs it and the volume that holds its data.
    pub vm: String,
    pub volume: String,
    pub created_at_ms: u64,
    /// Only in the answer to a create or a password reset: the password, this once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
}

pub fn uri(address: Ipv4Addr) -> String {
    format!(
        "postgres://{}@{address}:{}/postgres?sslmode=verify-full",
        guest_agent::SUPERUSER,
        guest_agent::PG_PORT
    )
}

impl Database {
    pub fn of(rec: &DatabaseRecord, vm_state: Option<&str>) -> Self {
        let state = match rec.phase {
            DbPhase::Creating => "creating".to_string(),
            DbPhase::Deleting => "deleting".to_string(),
            DbPhase::Ready => vm_state.unwrap_or("unknown").to_string(),
        };
        Database {
            name: rec.name.clone(),
            state,
            version: rec.version.clone(),
            vcpus: rec.vcpus,
            memory_mib: rec.memory_mib,
            storage_bytes: rec.storage_bytes,
            network: rec.network.clone(),
            address: rec.address,
            port: guest_agent::PG_PORT,
            user: guest_agent::SUPERUSER.into(),
            uri: rec.address.map(uri),
            allowed_cidrs: rec.allowed_cidrs.clone(),
            extensions: rec.extensions.clone(),
            parameters: rec.parameters.clone(),
            hypervisor: rec.hypervisor.clone().unwrap_or_else(|| "qemu".into()),
            certificate_expires_at_ms: rec.cert_expires_ms(),
            vm: rec.vm_name.clone(),
            volume: rec.volume.clone(),
            created_at_ms: rec.created_at_ms,
            password: None,
        }
    }
}
