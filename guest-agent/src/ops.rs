//! What the agent does for the host: each [`Request`] against the local server, which
//! it reaches as the `postgres` user over the Unix socket (pg_hba's only `local` line).

use guest_agent::{Apply, Request, PARAMETERS};
use serde_json::{json, Value};

use crate::{bindir, disks, load_state, run, save_state, write_config, State};

/// Runs SQL in the `postgres` database; its output, unaligned.
pub fn psql(version: &str, sql: &str) -> Result<String, String> {
    run(
        "runuser",
        &[
            "-u",
            "postgres",
            "--",
            &format!("{}/psql", bindir(version)),
            "-X",
            "-q",
            "-h",
            "/run/postgresql",
            "-d",
            "postgres",
            "-v",
            "ON_ERROR_STOP=1",
            "-At",
            "-c",
            sql,
        ],
    )
}

pub fn set_password(version: &str, verifier: &str) -> Result<(), String> {
    guest_agent::check_verifier(verifier)?;
    // A verifier is stored as given (PostgreSQL recognises the SCRAM format).
    psql(
        version,
        &format!("ALTER ROLE {} PASSWORD '{verifier}'", guest_agent::SUPERUSER),
    )
    .map(|_| ())
}

fn state() -> Result<State, String> {
    load_state().ok_or_else(|| "the data volume has no agent state".to_string())
}

fn health(version: &str) -> Value {
    let (up, detail) = match psql(version, "SELECT 1") {
        Ok(_) => (true, None),
        Err(e) => (false, Some(e)),
    };
    json!({"postgres_up": up, "detail": detail, "data": disks::df().ok()})
}

fn stats(version: &str) -> Result<Value, String> {
    let row = psql(
        version,
        "SELECT (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'), \
                (SELECT sum(xact_commit) FROM pg_stat_database), \
                (SELECT sum(xact_rollback) FROM pg_stat_database), \
                (SELECT sum(pg_database_size(datname)) FROM pg_database)",
    )?;
    let f: Vec<u64> = row.trim().split('|').map(|x| x.parse().unwrap_or(0)).collect();
    let at = |i: usize| f.get(i).copied().unwrap_or(0);
    Ok(json!({
        "connections": at(0),
        "xact_commit": at(1),
        "xact_rollback": at(2),
        "database_size_bytes": at(3),
        "data": disks::df().ok(),
    }))
}

fn configure(
    allowed_cidrs: Vec<String>,
    parameters: std::collections::BTreeMap<String, String>,
    generation: u64,
) -> Result<Value, String> {
    for c in &allowed_cidrs {
        guest_agent::check_cidr(c)?;
    }
    guest_agent::check_parameters(&parameters)?;
    let mut s = state()?;
    if generation <= s.generation {
        return Ok(json!({"applied": false, "generation": s.generation}));
    }
    let restart = PARAMETERS
        .iter()
        .any(|(name, apply)| *apply == Apply::Restart && s.parameters.get(*name) != parameters.get(*name));
    s.allowed_cidrs = allowed_cidrs;
    s.parameters = parameters;
    s.generation = generation;
    write_config(&s, None)?;
    save_state(&s)?;
    if restart {
        run("systemctl", &["restart", "hearth-postgresql.service"])?;
    } else {
        psql(&s.version, "SELECT pg_reload_conf()")?;
    }
    Ok(json!({"applied": true, "restarted": restart, "generation": generation}))
}

fn logs(version: &str, lines: usize) -> Result<Value, String> {
    let dir = format!("{}/log", crate::pgdata(version));
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .map_err(|e| format!("{dir}: {e}"))?
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let mut out: Vec<String> = Vec::new();
    for f in files.iter().rev() {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let mut these: Vec<String> = text.lines().map(str::to_string).collect();
        these.append(&mut out);
        out = these;
        if out.len() >= lines {
            break;
        }
    }
    let skip = out.len().saturating_sub(lines.min(10_000));
    Ok(json!({"lines": out[skip..]}))
}

/// Carries out one request.
pub fn handle(request: Request) -> Result<Value, String> {
    let version = state()?.version;
    match request {
        Request::Health => Ok(health(&version)),
        Request::Stats => stats(&version),
        Request::SetPassword { verifier, generation } => {
            let mut s = state()?;
            set_password(&version, &verifier)?;
            s.password_generation = s.password_generation.max(generation);
            save_state(&s)?;
            Ok(json!({"generation": s.password_generation}))
        }
        Request::Configure {
            allowed_cidrs,
            parameters,
            generation,
        } => configure(allowed_cidrs, parameters, generation),
        Request::GrowFs => {
            let seed = disks::read_seed()?;
            disks::grow(&seed.device)
        }
        Request::Logs { lines } => logs(&version, lines),
        Request::SetTls { tls } => {
            write_config(&state()?, Some(&tls))?;
            psql(&version, "SELECT pg_reload_conf()")?;
            Ok(json!({"reloaded": true}))
        }
    }
}
