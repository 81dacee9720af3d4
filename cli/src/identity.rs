//! `hearth project|user|key`: projects and their members, users, API keys.

use clap::Subcommand;
use serde_json::{json, Value};

use super::{print_value, s, table, ApiClient, Output};

#[derive(Subcommand, Debug)]
pub enum ProjectCommand {
    /// List the projects you have a role in (all of them, for administrators).
    List,
    /// Create a project (administrators).
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// Delete an empty project (administrators).
    Delete { name: String },
    /// List a project's members and their roles.
    Members { project: String },
    /// Give a user a role in a project: viewer, member or admin.
    Grant {
        project: String,
        user: String,
        role: String,
    },
    /// Take a user's role in a project away.
    Revoke { project: String, user: String },
}

#[derive(Subcommand, Debug)]
pub enum UserCommand {
    /// List users (administrators).
    List,
    /// Create a user (administrators).
    Create {
        name: String,
        /// A hearth administrator: every permission everywhere.
        #[arg(long)]
        admin: bool,
    },
    /// Delete a user: their roles go and their keys stop working.
    Delete { name: String },
}

#[derive(Subcommand, Debug)]
pub enum KeyCommand {
    /// List your API keys (every key, for administrators). Secrets are never shown.
    List,
    /// Make an API key; it is printed once.
    Create {
        name: String,
        /// For another user (administrators).
        #[arg(long)]
        user: Option<String>,
        /// Days until it stops working.
        #[arg(long)]
        expires_in_days: Option<u32>,
    },
    /// Revoke a key by id or prefix (hth_<id>_): it stops working at once.
    Revoke { id: String },
}

fn rows(v: &Value, cols: &[&str]) -> Vec<Vec<String>> {
    v.as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|item| cols.iter().map(|c| s(&item[*c])).collect())
        .collect()
}

pub async fn project(api: &ApiClient, out: Output, cmd: ProjectCommand) -> anyhow::Result<()> {
    match cmd {
        ProjectCommand::List => {
            let v = api.get("/v1/projects").await?;
            print_value(out, &v, |v| {
                print!(
                    "{}",
                    table(&["NAME", "DESCRIPTION"], &rows(v, &["name", "description"]))
                )
            });
        }
        ProjectCommand::Create { name, description } => {
            let v = api
                .post("/v1/projects", Some(json!({"name": name, "description": description})))
                .await?;
            print_value(out, &v, |v| println!("project {} created", s(&v["name"])));
        }
        ProjectCommand::Delete { name } => {
            api.delete_empty(&format!("/v1/projects/{name}")).await?;
            if out == Output::Table {
                println!("project {name} deleted");
            }
        }
        ProjectCommand::Members { project } => {
            let v = api.get(&format!("/v1/projects/{project}/members")).await?;
            print_value(out, &v, |v| {
                print!("{}", table(&["USER", "ROLE"], &rows(v, &["user", "role"])))
            });
        }
        ProjectCommand::Grant { project, user, role } => {
            let v = api
                .put(
                    &format!("/v1/projects/{project}/members/{user}"),
                    Some(json!({"role": role})),
                )
                .await?;
            print_value(out, &v, |v| {
                println!("{} is {} in {}", s(&v["user"]), s(&v["role"]), s(&v["project"]))
            });
        }
        ProjectCommand::Revoke { project, user } => {
            api.delete_empty(&format!("/v1/projects/{project}/members/{user}"))
                .await?;
            if out == Output::Table {
                println!("{user} has no role in {project} any more");
            }
        }
    }
    Ok(())
}

pub async fn user(api: &ApiClient, out: Output, cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::List => {
            let v = api.get("/v1/users").await?;
            print_value(out, &v, |v| {
                print!("{}", table(&["NAME", "ADMIN"], &rows(v, &["name", "admin"])))
            });
        }
        UserCommand::Create { name, admin } => {
            let v = api
                .post("/v1/users", Some(json!({"name": name, "admin": admin})))
                .await?;
            print_value(out, &v, |v| println!("user {} created", s(&v["name"])));
        }
        UserCommand::Delete { name } => {
            api.delete_empty(&format!("/v1/users/{name}")).await?;
            if out == Output::Table {
                println!("user {name} deleted");
            }
        }
    }
    Ok(())
}

pub async fn key(api: &ApiClient, out: Output, cmd: KeyCommand) -> anyhow::Result<()> {
    match cmd {
        KeyCommand::List => {
            let v = api.get("/v1/api-keys").await?;
            print_value(out, &v, |v| {
                print!(
                    "{}",
                    table(
                        &["PREFIX", "NAME", "USER", "EXPIRES_AT_MS", "REVOKED_AT_MS"],
                        &rows(v, &["prefix", "name", "user", "expires_at_ms", "revoked_at_ms"])
                    )
                )
            });
        }
        KeyCommand::Create {
            name,
            user,
            expires_in_days,
        } => {
            let v = api
                .post(
                    "/v1/api-keys",
                    Some(json!({"name": name, "user": user, "expires_in_days": expires_in_days})),
                )
                .await?;
            print_value(out, &v, |v| {
                println!("{}", s(&v["key"]));
                eprintln!(
                    "(shown once: only its hash is kept; it starts with {})",
                    s(&v["prefix"])
                );
            });
        }
        KeyCommand::Revoke { id } => {
            api.delete_empty(&format!("/v1/api-keys/{id}")).await?;
            if out == Output::Table {
                println!("key {id} revoked");
            }
        }
    }
    Ok(())
}
