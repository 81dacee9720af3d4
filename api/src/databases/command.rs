//! Database requests as typed commands: every check the request alone allows, made
//! before anything is created, and unit-tested without a stack.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::error::DatabaseError;
use crate::model::validate_name;

/// The least memory a database VM gets: PostgreSQL, its shared buffers and the guest.
pub const MIN_MEMORY_MIB: u64 = 512;
/// The smallest data volume.
pub const MIN_STORAGE: u64 = 1 << 30;

/// `POST /v1/databases` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateDatabase {
    pub name: String,
    /// PostgreSQL major version (default and only one so far: "15").
    #[serde(default)]
    pub version: Option<String>,
    /// Default 2.
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Default 1024; at least 512.
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// The data volume's size, e.g. "10G" (default), at least 1G.
    #[serde(default)]
    pub storage: Option<String>,
    /// The network the server is on (default: the project's default network).
    #[serde(default)]
    pub network: Option<String>,
    /// Who may connect (IPv4 addresses or CIDRs); default: the database's own network.
    /// Enforced by pg_hba.conf and netd's firewall at the VM's port. The host itself (the network's gateway) may always
    /// connect: hearth's readiness check comes from there.
    #[serde(default)]
    pub allowed_cidrs: Option<Vec<String>>,
    /// Extensions created at first boot, e.g. ["postgis"].
    #[serde(default)]
    pub extensions: Vec<String>,
    /// PostgreSQL settings from the documented list (`GET /v1/databases/parameters`).
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    /// The `postgres` user's password (12-128 characters); one is made when absent.
    /// Shown once, in this request's answer; kept only as a SCRAM verifier.
    #[serde(default)]
    pub password: Option<String>,
    /// `qemu` or `cloud-hypervisor`. By default Cloud Hypervisor where it is installed
    /// and KVM runs a stock Linux guest (probed once by booting the image's kernel),
    /// else QEMU.
    #[serde(default)]
    pub hypervisor: Option<crate::model::HypervisorKind>,
}

/// A create request that passed every check the request alone allows.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateDatabaseCommand {
    pub name: String,
    pub version: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub storage_bytes: u64,
    pub network: Option<String>,
    pub allowed_cidrs: Option<Vec<String>>,
    pub extensions: Vec<String>,
    pub parameters: BTreeMap<String, String>,
    pub password: Option<String>,
    pub hypervisor: Option<crate::model::HypervisorKind>,
}

fn invalid(m: impl Into<String>) -> DatabaseError {
    DatabaseError::Invalid(m.into())
}

pub fn check_password(p: &str) -> Result<(), DatabaseError> {
    if p.chars().count() < 12 || p.chars().count() > 128 || p.chars().any(|c| c.is_control()) {
        return Err(invalid("password must be 12-128 printable characters"));
    }
    Ok(())
}

pub fn check_cidrs(c: &[String]) -> Result<(), DatabaseError> {
    if c.len() > 64 {
        return Err(invalid("at most 64 allowed_cidrs"));
    }
    for x in c {
        guest_agent::check_cidr(x).map_err(|e| invalid(format!("allowed_cidrs: {e}")))?;
        // hearth's networks, and so a database VM, have IPv4 only: an IPv6 network
        // could never reach it, and netd's allow-list holds IPv4 networks.
        if x.split('/').next().is_some_and(|a| a.contains(':')) {
            return Err(invalid(format!(
                "allowed_cidrs: {x:?} is IPv6; a database is reached over IPv4 only (hearth's networks have no IPv6)"
            )));
        }
    }
    Ok(())
}

pub fn parse_storage(s: &str) -> Result<u64, DatabaseError> {
    let bytes = crate::volumes::command::parse_size(s).map_err(|e| invalid(format!("storage: {e}")))?;
    if bytes < MIN_STORAGE {
        return Err(invalid(format!("storage {s:?} is too small: at least 1G")));
    }
    Ok(bytes)
}

impl TryFrom<CreateDatabase> for CreateDatabaseCommand {
    type Error = DatabaseError;

    fn try_from(r: CreateDatabase) -> Result<Self, DatabaseError> {
        validate_name("database", &r.name)?;
        if r.name.len() > 60 {
            return Err(invalid(
                "a database name has at most 60 characters (its VM is named db-NAME)",
            ));
        }
        let version = r.version.unwrap_or_else(|| guest_agent::VERSIONS[0].to_string());
        if !guest_agent::VERSIONS.contains(&version.as_str()) {
            return Err(invalid(format!(
                "unknown PostgreSQL version {version:?}; available: {}",
                guest_agent::VERSIONS.join(", ")
            )));
        }
        let vcpus = r.vcpus.unwrap_or(2);
        if !(1..=64).contains(&vcpus) {
            return Err(invalid("vcpus must be 1-64"));
        }
        let memory_mib = r.memory_mib.unwrap_or(1024);
        if memory_mib < MIN_MEMORY_MIB {
            return Err(invalid(format!(
                "memory_mib {memory_mib} is too little for PostgreSQL: at least {MIN_MEMORY_MIB}"
            )));
        }
        let storage_bytes = parse_storage(r.storage.as_deref().unwrap_or("10G"))?;
        if let Some(c) = &r.allowed_cidrs {
            check_cidrs(c)?;
        }
        guest_agent::check_extensions(&r.extensions).map_err(invalid)?;
        guest_agent::check_parameters(&r.parameters).map_err(invalid)?;
        if let Some(p) = &r.password {
            check_password(p)?;
        }
        if let Some(n) = &r.network {
            validate_name("network", n)?;
        }
        Ok(Self {
            name: r.name,
            version,
            vcpus,
            memory_mib,
            storage_bytes,
            network: r.network,
            allowed_cidrs: r.allowed_cidrs,
            extensions: r.extensions,
            parameters: r.parameters,
            password: r.password,
            hypervisor: r.hypervisor,
        })
    }
}

/// `PATCH /v1/databases/{name}` body: what changes, each optional.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateDatabase {
    /// New vCPUs (the VM restarts).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// New memory (the VM restarts).
    #[serde(default)]
    pub memory_mib: Option<u64>,
    /// A larger data volume, e.g. "20G": grown online, the file system with it.
    #[serde(default)]
    pub storage: Option<String>,
    /// Replaces the allowed networks (reloaded, no restart).
    #[serde(default)]
    pub allowed_cidrs: Option<Vec<String>>,
    /// Replaces the user-set parameters (reloaded, or restarted where one needs it).
    #[serde(default)]
    pub parameters: Option<BTreeMap<String, String>>,
}

/// `POST /v1/databases/{name}/reset-password` body.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResetPassword {
    /// The new password; one is made when absent. Shown once in the answer.
    #[serde(default)]
    pub password: Option<String>,
}

/// A new password: 24 letters and digits.
pub fn new_password() -> String {
    use rand::Rng;
    const CHARS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789";
    let mut rng = rand::rng();
    (0..24)
        .map(|_| CHARS[rng.random_range(0..CHARS.len())] as char)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn command(json: &str) -> Result<CreateDatabaseCommand, DatabaseError> {
        CreateDatabaseCommand::try_from(serde_json::from_str::<CreateDatabase>(json).expect("json"))
    }

    #[test]
    fn defaults_and_bad_input() {
        let c = command(r#"{"name": "app"}"#).expect("ok");
        assert_eq!(
            (c.version.as_str(), c.vcpus, c.memory_mib, c.storage_bytes),
            ("15", 2, 1024, 10 << 30)
        );
        let msg = |j: &str| command(j).expect_err(j).to_string();
        assert!(msg(r#"{"name": "app", "version": "9.6"}"#).contains("unknown PostgreSQL version"));
        assert!(msg(r#"{"name": "app", "memory_mib": 256}"#).contains("too little"));
        assert!(msg(r#"{"name": "app", "storage": "0"}"#).contains("storage"));
        assert!(msg(r#"{"name": "app", "parameters": {"ssl": "off"}}"#).contains("cannot be set"));
        assert!(msg(r#"{"name": "app", "extensions": ["timescaledb"]}"#).contains("not available"));
        assert!(msg(r#"{"name": "app", "password": "short"}"#).contains("12-128"));
        assert!(msg(r#"{"name": "app", "allowed_cidrs": ["10.0.0.0/99"]}"#).contains("prefix"));
        assert!(msg(r#"{"name": "App"}"#).contains("App"));
        assert!(serde_json::from_str::<CreateDatabase>(r#"{"name": "a", "size": "1G"}"#).is_err());
    }

    #[test]
    fn made_passwords_are_long_and_differ() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 24);
        assert_ne!(a, b);
        assert!(check_password(&a).is_ok());
    }
}
