//! hearth's guest agent: what the host and the agent inside a managed-service VM say to
//! each other, and the agent's pure parts (rendering PostgreSQL's configuration, giving
//! a cloned cluster an identity of its own), unit-tested on the host.
//!
//! The agent (`hearth-guest-agent`, a static binary installed into the `postgres`
//! image) reads its settings from the NoCloud seed's user-data, under [`SEED_KEY`]
//! (cloud-init would ignore the key; the image has no cloud-init), and answers
//! [`Request`]s on its control channel: one JSON object per line each way, a
//! [`Response`] carrying the request's `id`. The channel is a virtio-serial port named
//! [`SERIAL_PORT_NAME`] under QEMU and vsock port [`VSOCK_PORT`] under Cloud
//! Hypervisor: no network, no port anyone else can reach, no key to manage.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The user-data key holding [`PostgresSeed`].
pub const SEED_KEY: &str = "hearth_postgres";
/// The virtio-serial port's name (QEMU `virtserialport,name=`).
pub const SERIAL_PORT_NAME: &str = "org.hearth.agent.0";
/// The vsock port the agent listens on (Cloud Hypervisor: `CONNECT 1024`).
pub const VSOCK_PORT: u32 = 1024;
/// The PostgreSQL major versions the image carries.
pub const VERSIONS: &[&str] = &["15"];
/// The TCP port the server listens on.
pub const PG_PORT: u16 = 5432;
/// The role users connect as.
pub const SUPERUSER: &str = "postgres";
/// The data volume's file system label.
pub const DATA_LABEL: &str = "hearth-pgdata";

/// What a database VM's seed tells the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSeed {
    /// Settings are applied when this is newer than what the data volume records
    /// (settings changed over the control channel survive a reboot of the old seed).
    pub generation: u64,
    pub version: String,
    /// The superuser's password as a SCRAM-SHA-256 verifier, never in plain text.
    pub password_verifier: String,
    pub allowed_cidrs: Vec<String>,
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
    #[serde(default)]
    pub extensions: Vec<String>,
    pub tls: TlsFiles,
}

/// The server's certificate (PEM), its key, and the CA that signed it.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles")
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// What the host asks the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Is the server up and answering queries; the data file system's size and use.
    Health,
    /// Connections, transactions, database sizes.
    Stats,
    /// Sets the superuser's password (a SCRAM verifier).
    SetPassword { verifier: String, generation: u64 },
    /// New allowed networks and parameters: reloaded, or restarted where a parameter
    /// needs it.
    Configure {
        allowed_cidrs: Vec<String>,
        parameters: BTreeMap<String, String>,
        generation: u64,
    },
    /// Grows the data file system to its (grown) disk, online.
    GrowFs,
    /// The last lines of the server's log.
    Logs { lines: usize },
    /// A new server certificate and key (and the CA): written, then loaded by a
    /// configuration reload (no restart; connections stay).
    SetTls { tls: TlsFiles },
}

/// A request with the id its answer carries.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub id: u64,
    #[serde(flatten)]
    pub request: Request,
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub id: u64,
    pub ok: bool,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// How a parameter change takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Apply {
    Reload,
    Restart,
}

/// The PostgreSQL parameters a user may set, and what applying each one takes.
/// Anything else (file locations, TLS, listen addresses, authentication) is hearth's.
pub const PARAMETERS: &[(&str, Apply)] = &[
    ("autovacuum", Apply::Reload),
    ("autovacuum_max_workers", Apply::Restart),
    ("autovacuum_naptime", Apply::Reload),
    ("autovacuum_vacuum_scale_factor", Apply::Reload),
    ("checkpoint_completion_target", Apply::Reload),
    ("checkpoint_timeout", Apply::Reload),
    ("default_statistics_target", Apply::Reload),
    ("effective_cache_size", Apply::Reload),
    ("effective_io_concurrency", Apply::Reload),
    ("idle_in_transaction_session_timeout", Apply::Reload),
    ("jit", Apply::Reload),
    ("lock_timeout", Apply::Reload),
    ("log_connections", Apply::Reload),
    ("log_disconnections", Apply::Reload),
    ("log_min_duration_statement", Apply::Reload),
    ("log_statement", Apply::Reload),
    ("maintenance_work_mem", Apply::Reload),
    ("max_connections", Apply::Restart),
    ("max_parallel_workers", Apply::Reload),
    ("max_parallel_workers_per_gather", Apply::Reload),
    ("max_wal_size", Apply::Reload),
    ("max_worker_processes", Apply::Restart),
    ("min_wal_size", Apply::Reload),
    ("random_page_cost", Apply::Reload),
    ("shared_buffers", Apply::Restart),
    ("statement_timeout", Apply::Reload),
    ("timezone", Apply::Reload),
    ("wal_compression", Apply::Reload),
    ("work_mem", Apply::Reload),
];

/// The extensions a database may ask for (`CREATE EXTENSION` at first boot), and the
/// library each needs preloaded, if any. All come from Debian's packages for 15.
pub const EXTENSIONS: &[(&str, Option<&str>)] = &[
    ("btree_gin", None),
    ("btree_gist", None),
    ("citext", None),
    ("hstore", None),
    ("hypopg", None),
    ("ip4r", None),
    ("pg_cron", Some("pg_cron")),
    ("pg_partman", None),
    ("pg_repack", None),
    ("pg_stat_statements", Some("pg_stat_statements")),
    ("pg_trgm", None),
    ("pgaudit", Some("pgaudit")),
    ("pgcrypto", None),
    ("postgis", None),
    ("postgis_raster", None),
    ("postgis_topology", None),
    ("rum", None),
    ("tablefunc", None),
    ("unaccent", None),
    ("uuid-ossp", None),
];

/// Checks user-set parameters: known names, values without quotes or line breaks.
pub fn check_parameters(parameters: &BTreeMap<String, String>) -> Result<(), String> {
    for (name, value) in parameters {
        if !PARAMETERS.iter().any(|(p, _)| p == name) {
            let known: Vec<&str> = PARAMETERS.iter().map(|(p, _)| *p).collect();
            return Err(format!(
                "parameter {name:?} cannot be set; these can: {}",
                known.join(", ")
            ));
        }
        if value.is_empty()
            || value.len() > 64
            || !value
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/' | ':' | '+'))
        {
            return Err(format!(
                "parameter {name}: {value:?} is not a value hearth passes on (1-64 letters, digits and . _ - / : +)"
            ));
        }
    }
    Ok(())
}

/// Checks an extension list against [`EXTENSIONS`].
pub fn check_extensions(extensions: &[String]) -> Result<(), String> {
    for e in extensions {
        if !EXTENSIONS.iter().any(|(x, _)| x == e) {
            let known: Vec<&str> = EXTENSIONS.iter().map(|(x, _)| *x).collect();
            return Err(format!(
                "extension {e:?} is not available; these are: {}",
                known.join(", ")
            ));
        }
    }
    Ok(())
}

/// A SCRAM-SHA-256 verifier as PostgreSQL stores it (`SCRAM-SHA-256$<iter>:<salt>$<key>:<key>`),
/// in characters that are safe inside a SQL string literal.
pub fn check_verifier(v: &str) -> Result<(), String> {
    let ok = v.starts_with("SCRAM-SHA-256$")
        && v.len() < 512
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '$' | ':' | '+' | '/' | '=' | '-'));
    if ok {
        Ok(())
    } else {
        Err("the password must be given as a SCRAM-SHA-256 verifier".into())
    }
}

/// Checks an allowed network (`10.0.0.0/8`, `2001:db8::/32`); a bare address is a /32.
pub fn check_cidr(c: &str) -> Result<(), String> {
    let (addr, prefix) = c.split_once('/').unwrap_or((c, ""));
    let ip: std::net::IpAddr = addr
        .parse()
        .map_err(|_| format!("{c:?} is not an address or network"))?;
    if !prefix.is_empty() {
        let p: u8 = prefix.parse().map_err(|_| format!("{c:?} has a bad prefix length"))?;
        if p > if ip.is_ipv4() { 32 } else { 128 } {
            return Err(format!("{c:?} has a bad prefix length"));
        }
    }
    Ok(())
}

/// `pg_hba.conf`: the agent itself over the local socket; everyone else over TLS only,
/// with SCRAM only, from the allowed networks only. A connection without TLS matches no
/// line and is refused.
pub fn render_hba(allowed_cidrs: &[String]) -> String {
    let mut s = String::from(
        "# Written by hearth's guest agent; changes are made through hearth's API.\n\
         # TYPE  DATABASE  USER  ADDRESS  METHOD\n\
         local   all       postgres       peer\n",
    );
    for c in allowed_cidrs {
        let c = if c.contains('/') {
            c.clone()
        } else if c.contains(':') {
            format!("{c}/128")
        } else {
            format!("{c}/32")
        };
        s.push_str(&format!("hostssl all       all   {c}  scram-sha-256\n"));
    }
    s
}

/// The server's settings: hearth's fixed ones, sizes from the VM's memory, the
/// libraries the extensions need, then the user's parameters (which win).
pub fn render_conf(
    pgdata: &str,
    etc: &str,
    memory_mib: u64,
    extensions: &[String],
    parameters: &BTreeMap<String, String>,
) -> String {
    let shared_buffers = (memory_mib / 4).max(32);
    let cache = (memory_mib * 3 / 4).max(64);
    let maint = (memory_mib / 16).clamp(16, 2048);
    let work = (memory_mib / 64).clamp(4, 256);
    let preload: Vec<&str> = EXTENSIONS
        .iter()
        .filter(|(name, lib)| lib.is_some() && extensions.iter().any(|e| e == name))
        .filter_map(|(_, lib)| *lib)
        .collect();
    let mut s = format!(
        "# Written by hearth's guest agent at every boot and change; do not edit.\n\
         data_directory = '{pgdata}'\n\
         hba_file = '{etc}/pg_hba.conf'\n\
         ident_file = '{etc}/pg_ident.conf'\n\
         listen_addresses = '*'\n\
         port = {PG_PORT}\n\
         unix_socket_directories = '/run/postgresql'\n\
         ssl = on\n\
         ssl_cert_file = '{etc}/server.crt'\n\
         ssl_key_file = '{etc}/server.key'\n\
         ssl_ca_file = '{etc}/ca.crt'\n\
         ssl_min_protocol_version = 'TLSv1.2'\n\
         password_encryption = 'scram-sha-256'\n\
         max_connections = 100\n\
         shared_buffers = {shared_buffers}MB\n\
         effective_cache_size = {cache}MB\n\
         maintenance_work_mem = {maint}MB\n\
         work_mem = {work}MB\n\
         wal_level = replica\n\
         max_wal_senders = 10\n\
         logging_collector = on\n\
         log_directory = 'log'\n\
         log_filename = 'postgresql-%Y-%m-%d.log'\n\
         log_line_prefix = '%m [%p] %q%u@%d '\n\
         log_timezone = 'UTC'\n\
         timezone = 'UTC'\n\
         shared_preload_libraries = '{}'\n",
        preload.join(",")
    );
    if extensions.iter().any(|e| e == "pg_cron") {
        s.push_str("cron.database_name = 'postgres'\n");
    }
    for (k, v) in parameters {
        s.push_str(&format!("{k} = '{v}'\n"));
    }
    s
}

/// CRC-32C (Castagnoli), as PostgreSQL checks its control file.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Gives a cluster copied from the image's template a system identifier of its own:
/// `pg_control` starts with it (a u64), and its CRC-32C sits right after the fields it
/// covers. The CRC is found where it matches (so no version's struct layout is
/// hard-coded) and rewritten. Afterwards `pg_resetwal -f` writes WAL that carries the
/// new identifier. Two databases cloned from one image thus never look like the same
/// system to replication or backup tools.
pub fn set_system_identifier(control: &mut [u8], id: u64) -> Result<u64, String> {
    let at = (8..control.len().min(1024).saturating_sub(4))
        .step_by(4)
        .find(|&off| {
            let stored = u32::from_le_bytes([control[off], control[off + 1], control[off + 2], control[off + 3]]);
            stored == crc32c(&control[..off])
        })
        .ok_or("pg_control: no valid CRC found (not a PostgreSQL control file?)")?;
    let old = u64::from_le_bytes(control[..8].try_into().map_err(|_| "pg_control too short")?);
    control[..8].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c(&control[..at]);
    control[at..at + 4].copy_from_slice(&crc.to_le_bytes());
    Ok(old)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn system_identifier_is_replaced_and_the_crc_follows() {
        let mut control = vec![0u8; 8192];
        control[..8].copy_from_slice(&7u64.to_le_bytes());
        control[8..16].copy_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
        let crc = crc32c(&control[..296]);
        control[296..300].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(set_system_identifier(&mut control, 42), Ok(7));
        assert_eq!(&control[..8], &42u64.to_le_bytes());
        let crc = u32::from_le_bytes(control[296..300].try_into().expect("4"));
        assert_eq!(crc, crc32c(&control[..296]));
        let mut garbage = vec![0xAAu8; 8192];
        assert!(set_system_identifier(&mut garbage, 1).is_err());
    }

    #[test]
    fn hba_is_tls_and_scram_only_from_the_allowed_networks() {
        let hba = render_hba(&["10.0.0.0/8".into(), "192.168.1.5".into(), "2001:db8::1".into()]);
        assert!(hba.contains("hostssl all       all   10.0.0.0/8  scram-sha-256"));
        assert!(hba.contains("192.168.1.5/32"));
        assert!(hba.contains("2001:db8::1/128"));
        assert!(!hba.lines().any(|l| l.starts_with("host ")), "{hba}");
        assert!(!hba.contains("trust"));
    }

    #[test]
    fn conf_is_sized_from_memory_and_user_parameters_win() {
        let mut p = BTreeMap::new();
        p.insert("work_mem".to_string(), "64MB".to_string());
        let c = render_conf("/d", "/e", 1024, &["pg_cron".into(), "postgis".into()], &p);
        assert!(c.contains("shared_buffers = 256MB"));
        assert!(c.contains("effective_cache_size = 768MB"));
        assert!(c.contains("shared_preload_libraries = 'pg_cron'"));
        let last_work_mem = c.lines().rfind(|l| l.starts_with("work_mem")).expect("work_mem");
        assert_eq!(last_work_mem, "work_mem = '64MB'");
    }

    #[test]
    fn bad_settings_are_refused_with_a_reason() {
        let mut p = BTreeMap::new();
        p.insert("ssl".to_string(), "off".to_string());
        assert!(check_parameters(&p).expect_err("refused").contains("cannot be set"));
        let mut p = BTreeMap::new();
        p.insert("work_mem".to_string(), "1MB'\nssl = off".to_string());
        assert!(check_parameters(&p).is_err());
        assert!(check_extensions(&["postgis".into()]).is_ok());
        assert!(check_extensions(&["timescaledb".into()]).is_err());
        assert!(check_verifier("SCRAM-SHA-256$4096:c2FsdA==$a2V5:c2Vy").is_ok());
        assert!(check_verifier("hunter2").is_err());
        assert!(check_verifier("SCRAM-SHA-256$4096:x'; DROP").is_err());
        assert!(check_cidr("10.0.0.0/8").is_ok());
        assert!(check_cidr("10.0.0.0/33").is_err());
        assert!(check_cidr("nope").is_err());
    }
}
