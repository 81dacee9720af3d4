//! `hearth-guest-agent`: runs inside a database VM made from the `postgres` image.
//!
//! - `boot` (a oneshot unit before systemd-networkd and PostgreSQL): reads the NoCloud
//!   seed straight from its FAT disk (no mount), sets the host name, writes the
//!   network's systemd-networkd files, formats the data volume if it is blank and mounts
//!   it, makes the cluster from the image's template (with a system identifier of its
//!   own) the first time, and writes PostgreSQL's configuration, TLS files and pg_hba.
//! - `serve` (after PostgreSQL is up): sets the password and creates the extensions the
//!   seed asks for, prints `HEARTH-AGENT-READY` on the console, then answers the host
//!   on the control channel (virtio-serial under QEMU, vsock under Cloud Hypervisor).
//!
//! Settings changed over the channel are recorded on the data volume with their
//! generation, so an older seed never undoes them at the next boot.

mod channel;
mod disks;
mod ops;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use guest_agent::{PostgresSeed, SEED_KEY};
use serde::{Deserialize, Serialize};

/// Where the data volume is mounted.
pub const DATA_MOUNT: &str = "/var/lib/postgresql";
/// PostgreSQL's configuration, written at every boot (root file system).
pub const ETC: &str = "/etc/hearth/postgresql";
/// What the agent records on the data volume.
const STATE: &str = "/var/lib/postgresql/hearth-agent.json";

pub fn pgdata(version: &str) -> String {
    format!("{DATA_MOUNT}/{version}/main")
}
pub fn bindir(version: &str) -> String {
    format!("/usr/lib/postgresql/{version}/bin")
}

/// What the data volume says was applied.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub version: String,
    /// Generation of the allowed networks and parameters in force.
    pub generation: u64,
    /// Generation of the password in force (0: none set yet).
    pub password_generation: u64,
    pub allowed_cidrs: Vec<String>,
    pub parameters: std::collections::BTreeMap<String, String>,
    pub extensions: Vec<String>,
    /// Extensions already created.
    #[serde(default)]
    pub created_extensions: Vec<String>,
    #[serde(default)]
    pub system_identifier: u64,
}

pub fn load_state() -> Option<State> {
    serde_json::from_slice(&std::fs::read(STATE).ok()?).ok()
}

pub fn save_state(s: &State) -> Result<(), String> {
    write_file(
        STATE,
        serde_json::to_string_pretty(s).map_err(|e| e.to_string())?.as_bytes(),
        0o600,
    )
}

pub fn write_file(path: &str, body: &[u8], mode: u32) -> Result<(), String> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = format!("{path}.tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| format!("{tmp}: {e}"))?;
    f.write_all(body).map_err(|e| format!("{tmp}: {e}"))?;
    f.sync_all().map_err(|e| format!("{tmp}: {e}"))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{path}: {e}"))
}

/// Runs a command; its stderr in the error.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{cmd} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        ))
    }
}

/// A line on the serial console (hearth's tests and benchmarks read it).
pub fn console(line: &str) {
    eprintln!("{line}");
    if let Ok(mut c) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        let _ = writeln!(c, "{line}");
    }
}

/// The NoCloud seed, as the agent reads it.
pub struct Seed {
    pub hostname: Option<String>,
    pub network: serde_json::Value,
    pub postgres: PostgresSeed,
}

fn parse_seed(files: &disks::SeedFiles) -> Result<Seed, String> {
    let meta: serde_json::Value = serde_json::from_str(&files.meta_data).unwrap_or_default();
    let body = files
        .user_data
        .strip_prefix("#cloud-config")
        .unwrap_or(&files.user_data);
    let user: serde_json::Value =
        serde_json::from_str(body.trim()).map_err(|e| format!("user-data is not hearth's JSON cloud-config: {e}"))?;
    let postgres: PostgresSeed = serde_json::from_value(
        user.get(SEED_KEY)
            .cloned()
            .ok_or_else(|| format!("user-data has no {SEED_KEY}"))?,
    )
    .map_err(|e| format!("{SEED_KEY}: {e}"))?;
    Ok(Seed {
        hostname: meta["local-hostname"].as_str().map(str::to_string),
        network: serde_json::from_str(&files.network_config).unwrap_or_default(),
        postgres,
    })
}

/// systemd-networkd files from the seed's network-config (version 2, as imaged writes it).
fn write_network(network: &serde_json::Value) -> Result<(), String> {
    let Some(eths) = network["ethernets"].as_object() else {
        return Ok(());
    };
    std::fs::create_dir_all("/etc/systemd/network").map_err(|e| e.to_string())?;
    for (name, e) in eths {
        let mut s = String::from("[Match]\n");
        match e["match"]["macaddress"].as_str() {
            Some(mac) => s.push_str(&format!("MACAddress={mac}\n")),
            None => s.push_str(&format!("Name={name}\n")),
        }
        s.push_str("\n[Network]\nDHCP=no\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n");
        for a in e["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str())
        {
            s.push_str(&format!("Address={a}\n"));
        }
        for r in e["routes"].as_array().into_iter().flatten() {
            if let (Some("0.0.0.0/0" | "::/0"), Some(via)) = (r["to"].as_str(), r["via"].as_str()) {
                s.push_str(&format!("Gateway={via}\n"));
            }
        }
        for d in e["nameservers"]["addresses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str())
        {
            s.push_str(&format!("DNS={d}\n"));
        }
        write_file(
            &format!("/etc/systemd/network/10-hearth-{name}.network"),
            s.as_bytes(),
            0o644,
        )?;
    }
    Ok(())
}

fn set_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 63 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        return Err(format!("bad host name {name:?}"));
    }
    write_file("/etc/hostname", format!("{name}\n").as_bytes(), 0o644)?;
    let hosts = format!("127.0.0.1\tlocalhost\n127.0.1.1\t{name}\n::1\t\tlocalhost ip6-localhost ip6-loopback\n");
    write_file("/etc/hosts", hosts.as_bytes(), 0o644)?;
    // SAFETY: the pointer and length describe `name`'s bytes, which outlive the call.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        return Err(format!("sethostname: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// The first boot's cluster: the image's template, copied, with an identity of its own.
fn make_cluster(version: &str, state: &mut State) -> Result<(), String> {
    let data = pgdata(version);
    if Path::new(&format!("{data}/PG_VERSION")).exists() {
        return Ok(());
    }
    let template = format!("/usr/lib/hearth/pgdata-{version}");
    let parent = format!("{DATA_MOUNT}/{version}");
    let _ = std::fs::remove_dir_all(&data);
    std::fs::create_dir_all(&parent).map_err(|e| e.to_string())?;
    let partial = format!("{parent}/main.new");
    let _ = std::fs::remove_dir_all(&partial);
    run("cp", &["-a", &template, &partial])?;
    let control_path = format!("{partial}/global/pg_control");
    let mut control = std::fs::read(&control_path).map_err(|e| format!("{control_path}: {e}"))?;
    let id = new_system_identifier();
    guest_agent::set_system_identifier(&mut control, id)?;
    std::fs::write(&control_path, &control).map_err(|e| format!("{control_path}: {e}"))?;
    run("chown", &["-R", "postgres:postgres", &parent])?;
    run(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &format!("{}/pg_resetwal", bindir(version)),
            "-f",
            &partial,
        ],
    )?;
    std::fs::rename(&partial, &data).map_err(|e| e.to_string())?;
    state.system_identifier = id;
    Ok(())
}

/// As PostgreSQL makes one: seconds and microseconds of now, and some randomness.
fn new_system_identifier() -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let mut r = [0u8; 4];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = std::io::Read::read_exact(&mut f, &mut r);
    }
    (now.as_secs() << 32) | (u64::from(now.subsec_micros()) << 12) | u64::from(u32::from_le_bytes(r) & 0xFFF)
}

fn memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map(|kb| kb / 1024)
        .unwrap_or(512)
}

/// Writes PostgreSQL's configuration from the state (and the seed's TLS files).
pub fn write_config(state: &State, tls: Option<&guest_agent::TlsFiles>) -> Result<(), String> {
    std::fs::create_dir_all(ETC).map_err(|e| e.to_string())?;
    let conf = guest_agent::render_conf(
        &pgdata(&state.version),
        ETC,
        memory_mib(),
        &state.extensions,
        &state.parameters,
    );
    write_file(&format!("{ETC}/postgresql.conf"), conf.as_bytes(), 0o644)?;
    write_file(
        &format!("{ETC}/pg_hba.conf"),
        guest_agent::render_hba(&state.allowed_cidrs).as_bytes(),
        0o644,
    )?;
    write_file(&format!("{ETC}/pg_ident.conf"), b"", 0o644)?;
    if let Some(tls) = tls {
        write_file(&format!("{ETC}/ca.crt"), tls.ca_pem.as_bytes(), 0o644)?;
        write_file(&format!("{ETC}/server.crt"), tls.cert_pem.as_bytes(), 0o644)?;
        write_file(&format!("{ETC}/server.key"), tls.key_pem.as_bytes(), 0o600)?;
    }
    run("chown", &["-R", "postgres:postgres", ETC])?;
    Ok(())
}

fn boot() -> Result<(), String> {
    let t = std::time::Instant::now();
    let files = disks::read_seed()?;
    let seed = parse_seed(&files)?;
    if let Some(h) = &seed.hostname {
        set_hostname(h)?;
    }
    write_network(&seed.network)?;
    let p = &seed.postgres;
    if !guest_agent::VERSIONS.contains(&p.version.as_str()) {
        return Err(format!("PostgreSQL {} is not in this image", p.version));
    }
    disks::mount_data(&files.device)?;
    let mut state = load_state().unwrap_or_default();
    state.version = p.version.clone();
    if p.generation > state.generation {
        state.generation = p.generation;
        state.allowed_cidrs = p.allowed_cidrs.clone();
        state.parameters = p.parameters.clone();
        state.extensions = p.extensions.clone();
    }
    make_cluster(&p.version, &mut state)?;
    // No server runs yet at this point of the boot: a pid file is left from a VM that
    // was powered off. PostgreSQL would refuse to start if its PID now belongs to
    // another process (at boot, PIDs repeat).
    let _ = std::fs::remove_file(format!("{}/postmaster.pid", pgdata(&p.version)));
    write_config(&state, Some(&p.tls))?;
    save_state(&state)?;
    console(&format!("HEARTH-AGENT-BOOT ok {:.2}s", t.elapsed().as_secs_f64()));
    Ok(())
}

/// After PostgreSQL is up: what the seed asks for that needs a running server.
fn first_settings() -> Result<(), String> {
    let files = disks::read_seed()?;
    let seed = parse_seed(&files)?;
    let mut state = load_state().ok_or("the data volume has no agent state (boot did not run?)")?;
    // The server must answer before anything else (READY means it does).
    if let Err(e) = ops::psql(&state.version, "SELECT 1") {
        // What the server said, on the console, where the host keeps it.
        let journal = run(
            "journalctl",
            &["-u", "hearth-postgresql.service", "-n", "20", "--no-pager", "-o", "cat"],
        )
        .unwrap_or_default();
        return Err(format!(
            "PostgreSQL does not answer: {e}
{journal}"
        ));
    }
    let p = &seed.postgres;
    if p.generation > state.password_generation {
        ops::set_password(&state.version, &p.password_verifier)?;
        state.password_generation = p.generation;
        save_state(&state)?;
    }
    for e in state.extensions.clone() {
        if !state.created_extensions.contains(&e) {
            ops::psql(
                &state.version,
                &format!("CREATE EXTENSION IF NOT EXISTS \"{e}\" CASCADE"),
            )?;
            state.created_extensions.push(e);
            save_state(&state)?;
        }
    }
    Ok(())
}

fn main() {
    let arg = std::env::args().nth(1).unwrap_or_default();
    let result = match arg.as_str() {
        "boot" => boot(),
        "serve" => {
            channel::watch_power_button();
            first_settings()
        }
        .and_then(|()| {
            console("HEARTH-AGENT-READY");
            channel::serve()
        }),
        _ => Err("usage: hearth-guest-agent boot|serve".into()),
    };
    if let Err(e) = result {
        console(&format!("HEARTH-AGENT-ERROR {arg}: {e}"));
        std::process::exit(1);
    }
}
