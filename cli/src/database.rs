//! `hearth db …`: managed PostgreSQL databases.

use std::os::unix::process::CommandExt;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::vm::wait_operation;
use crate::{print_value, s, table, ApiClient, Output};

#[derive(Subcommand, Debug)]
pub enum DbCommand {
    /// Create a database and wait until it answers; prints its URI and password (shown once).
    Create {
        name: String,
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        /// Data volume size, e.g. 10G.
        #[arg(long)]
        storage: Option<String>,
        #[arg(long)]
        network: Option<String>,
        /// Who may connect (repeatable; default: the database's network).
        #[arg(long = "allow")]
        allowed_cidrs: Vec<String>,
        /// Extensions to create (repeatable), e.g. postgis.
        #[arg(long = "extension")]
        extensions: Vec<String>,
        /// A PostgreSQL setting NAME=VALUE (repeatable).
        #[arg(long = "set")]
        parameters: Vec<String>,
        /// Read the password from this environment variable instead of making one.
        #[arg(long)]
        password_env: Option<String>,
        #[arg(long)]
        hypervisor: Option<String>,
    },
    /// List databases.
    List,
    /// Show one database.
    Show {
        name: String,
    },
    /// Run psql connected to the database (TLS verified against hearth's CA).
    Psql {
        name: String,
        /// More arguments for psql (after --).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Change its size, storage (grows online), allowed networks or settings.
    Resize {
        name: String,
        #[arg(long)]
        vcpus: Option<u32>,
        #[arg(long)]
        memory_mib: Option<u64>,
        #[arg(long)]
        storage: Option<String>,
        /// Replaces the allowed networks (repeatable).
        #[arg(long = "allow")]
        allowed_cidrs: Vec<String>,
        /// Replaces the settings: NAME=VALUE (repeatable).
        #[arg(long = "set")]
        parameters: Vec<String>,
    },
    /// Set a new password (made, or read from --password-env); prints it once.
    ResetPassword {
        name: String,
        #[arg(long)]
        password_env: Option<String>,
    },
    /// A new server certificate now (same CA; a running server loads it without a
    /// restart). hearth renews it by itself 30 days before it expires.
    RotateCertificate {
        name: String,
    },
    /// The end of the server's log.
    Logs {
        name: String,
        #[arg(long, default_value_t = 200)]
        lines: usize,
    },
    Start {
        name: String,
    },
    Stop {
        name: String,
    },
    Restart {
        name: String,
    },
    /// Delete the database: VM, port, seed and data volume (unless --keep-volume).
    Delete {
        name: String,
        #[arg(long)]
        keep_volume: bool,
    },
}

fn parameters(items: &[String]) -> anyhow::Result<Value> {
    let mut m = serde_json::Map::new();
    for p in items {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--set takes NAME=VALUE, got {p:?}"))?;
        m.insert(k.to_string(), json!(v));
    }
    Ok(Value::Object(m))
}

fn password_from(env: Option<String>) -> anyhow::Result<Option<String>> {
    env.map(|e| std::env::var(&e).map_err(|_| anyhow::anyhow!("environment variable {e} is not set")))
        .transpose()
}

fn show(db: &Value) {
    println!("name:     {}", s(&db["name"]));
    println!("state:    {}", s(&db["state"]));
    println!("version:  {}", s(&db["version"]));
    println!(
        "size:     {} vCPUs, {} MiB, {} bytes of storage",
        s(&db["vcpus"]),
        s(&db["memory_mib"]),
        s(&db["storage_bytes"])
    );
    println!("uri:      {}", s(&db["uri"]));
    println!(
        "allowed:  {}",
        db["allowed_cidrs"]
            .as_array()
            .map(|a| a.iter().map(s).collect::<Vec<_>>().join(", "))
            .unwrap_or_default()
    );
    if let Some(p) = db["password"].as_str() {
        println!("password: {p}   (shown only now)");
    }
}

pub(crate) async fn run(api: &ApiClient, out: Output, cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Create {
            name,
            version,
            vcpus,
            memory_mib,
            storage,
            network,
            allowed_cidrs,
            extensions,
            parameters: params,
            password_env,
            hypervisor,
        } => {
            let mut body = json!({"name": name, "extensions": extensions, "parameters": parameters(&params)?});
            for (k, v) in [
                ("version", version.map(Value::from)),
                ("vcpus", vcpus.map(Value::from)),
                ("memory_mib", memory_mib.map(Value::from)),
                ("storage", storage.map(Value::from)),
                ("network", network.map(Value::from)),
                ("hypervisor", hypervisor.map(Value::from)),
                ("password", password_from(password_env)?.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            if !allowed_cidrs.is_empty() {
                body["allowed_cidrs"] = json!(allowed_cidrs);
            }
            let accepted = api.post("/v1/databases", Some(body)).await?;
            let password = accepted["database"]["password"].clone();
            wait_operation(api, out, accepted["operation"]["id"].as_str().unwrap_or_default()).await?;
            let mut db = api.get(&format!("/v1/databases/{name}")).await?;
            db["password"] = password;
            print_value(out, &db, show);
        }
        DbCommand::List => {
            let dbs = api.get("/v1/databases").await?;
            print_value(out, &dbs, |v| {
                let rows: Vec<Vec<String>> = v
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                    .iter()
                    .map(|d| {
                        vec![
                            s(&d["name"]),
                            s(&d["state"]),
                            s(&d["version"]),
                            s(&d["address"]),
                            s(&d["storage_bytes"]),
                        ]
                    })
                    .collect();
                println!("{}", table(&["NAME", "STATE", "VERSION", "ADDRESS", "STORAGE"], &rows));
            });
        }
        DbCommand::Show { name } => {
            let db = api.get(&format!("/v1/databases/{name}")).await?;
            print_value(out, &db, show);
        }
        DbCommand::Psql { name, args } => {
            let db = api.get(&format!("/v1/databases/{name}")).await?;
            let uri = db["uri"]
                .as_str()
                .ok_or_else(|| anyhow::anyhow!("database {name} has no address yet"))?;
            let ca = api.get_bytes(&format!("/v1/databases/{name}/ca.pem")).await?;
            let dir = std::env::temp_dir().join(format!("hearth-db-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir)?;
            let ca_path = dir.join("ca.pem");
            std::fs::write(&ca_path, &ca)?;
            // psql replaces this process; the CA file stays in the temp directory.
            let err = std::process::Command::new("psql")
                .arg(format!("{uri}&sslrootcert={}", ca_path.display()))
                .args(args)
                .exec();
            anyhow::bail!("cannot run psql (install postgresql-client): {err}");
        }
        DbCommand::Resize {
            name,
            vcpus,
            memory_mib,
            storage,
            allowed_cidrs,
            parameters: params,
        } => {
            let mut body = json!({});
            if let Some(v) = vcpus {
                body["vcpus"] = json!(v);
            }
            if let Some(m) = memory_mib {
                body["memory_mib"] = json!(m);
            }
            if let Some(st) = storage {
                body["storage"] = json!(st);
            }
            if !allowed_cidrs.is_empty() {
                body["allowed_cidrs"] = json!(allowed_cidrs);
            }
            if !params.is_empty() {
                body["parameters"] = parameters(&params)?;
            }
            let db = api.patch(&format!("/v1/databases/{name}"), body).await?;
            print_value(out, &db, show);
        }
        DbCommand::ResetPassword { name, password_env } => {
            let body = json!({"password": password_from(password_env)?});
            let db = api
                .post(&format!("/v1/databases/{name}/reset-password"), Some(body))
                .await?;
            print_value(out, &db, show);
        }
        DbCommand::RotateCertificate { name } => {
            let db = api
                .post(&format!("/v1/databases/{name}/rotate-certificate"), None)
                .await?;
            print_value(out, &db, show);
        }
        DbCommand::Logs { name, lines } => {
            let text = api
                .get_bytes(&format!("/v1/databases/{name}/logs?lines={lines}"))
                .await?;
            print!("{}", String::from_utf8_lossy(&text));
        }
        DbCommand::Start { name } => action(api, out, &name, "start").await?,
        DbCommand::Stop { name } => action(api, out, &name, "stop").await?,
        DbCommand::Restart { name } => action(api, out, &name, "restart").await?,
        DbCommand::Delete { name, keep_volume } => {
            let q = if keep_volume { "?keep_volume=true" } else { "" };
            let accepted = api.delete(&format!("/v1/databases/{name}{q}")).await?;
            wait_operation(api, out, accepted["operation"]["id"].as_str().unwrap_or_default()).await?;
            println!("deleted {name}");
        }
    }
    Ok(())
}

/// start, stop and restart: the VM's operation, followed to its end.
async fn action(api: &ApiClient, out: Output, name: &str, action: &str) -> anyhow::Result<()> {
    let accepted = api.post(&format!("/v1/databases/{name}/{action}"), None).await?;
    wait_operation(api, out, accepted["operation"]["id"].as_str().unwrap_or_default()).await?;
    let db = api.get(&format!("/v1/databases/{name}")).await?;
    print_value(out, &db, show);
    Ok(())
}
