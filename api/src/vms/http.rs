//! The HTTP edge of `/v1/vms`: parse, call the work, map errors; nothing else.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use socket_http::ApiError;
use vmm_manager::spec::VmAction;

use crate::auth::keys::Caller;
use crate::daemons::upstream;
use crate::json::{JsonBody, Query};
use crate::model::{Accepted, CreateVm, Phase, UpdateVm, Vm, VmRecord};
use crate::state::AppState;
use crate::vms::command::ResizeVmCommand;
use crate::vms::error::VmError;
use crate::vms::records::{resolve, set_desired_running};
use crate::vms::snapshot::{CreateSnapshot, RestoreVm, VmSnapshot};

type AppS = State<Arc<AppState>>;

async fn view(state: &AppState, rec: &VmRecord) -> Vm {
    match crate::hosts::daemons::of_vm(state, rec).await {
        Ok(d) => match d.vmm.get(&rec.id).await {
            Ok(info) => {
                if crate::hosts::daemons::is_local(state, rec.host.as_deref()) {
                    state.live.observe(&info);
                }
                Vm::from_record(rec, Some(&info.status), true)
            }
            Err(e) if e.is_not_found() => Vm::from_record(rec, None, true),
            Err(_) => Vm::from_record(rec, None, false),
        },
        Err(e) => crate::vms::list::host_unreachable(Vm::from_record(rec, None, false), &e),
    }
}

#[utoipa::path(get, path = "/v1/vms", tag = "vms", params(crate::openapi::ProjectParam),
    responses((status = 200, description = "The project's VMs, by name", body = Vec<Vm>)))]
pub async fn list(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    headers: http::HeaderMap,
) -> Result<Response, ApiError> {
    let rendered = state.vm_list.get(state.vm_sources(), &caller.project).await?;
    Ok(rendered.respond(&headers))
}

#[utoipa::path(get, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam),
    responses((status = 200, body = Vm), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn show(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vm>, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    Ok(Json(view(&state, &rec).await))
}

fn accepted(op: crate::model::Operation, vm: Option<Vm>) -> Response {
    (StatusCode::ACCEPTED, Json(Accepted { operation: op, vm })).into_response()
}

#[utoipa::path(post, path = "/v1/vms", tag = "vms", params(crate::openapi::ProjectParam, crate::openapi::IdempotencyKey), request_body = CreateVm,
    responses((status = 202, description = "Accepted: the operation that creates (and starts) the VM", body = Accepted),
      (status = 409, description = "The name is taken", body = crate::openapi::ErrorResponse),
      (status = 422, description = "Invalid request: unknown image or network, bad key, size or YAML", body = crate::openapi::ErrorResponse)))]
pub async fn create(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    JsonBody(req): JsonBody<CreateVm>,
) -> Result<Response, ApiError> {
    let (op, vm) = crate::vms::create::begin(&state, &caller.project, req).await?;
    Ok(accepted(op, Some(vm)))
}

#[utoipa::path(delete, path = "/v1/vms/{id}", tag = "vms", params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam),
    responses((status = 202, description = "Accepted: the operation that deletes the VM and everything it owns", body = Accepted),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, description = "Another operation is running on the VM", body = crate::openapi::ErrorResponse)))]
pub async fn delete(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let (rec, rev) = resolve(&state, &caller.project, &id).await?;
    if let Some(by) = rec.managed_by.clone() {
        return Err(VmError::Managed { vm: rec.name, by }.into());
    }
    let (op, vm) = crate::vms::delete::begin(&state, rec, rev).await?;
    Ok(accepted(op, Some(vm)))
}

#[derive(Deserialize, utoipa::IntoParams)]
pub struct ResizeQuery {
    /// Restart the VM when it cannot take the new size while it runs.
    #[serde(default)]
    restart: bool,
}

#[utoipa::path(patch, path = "/v1/vms/{id}", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), ResizeQuery, crate::openapi::ProjectParam),
    request_body = UpdateVm,
    responses((status = 200, description = "The VM with its new size (hot-plugged while it runs, or restarted when asked)", body = Vm),
      (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "`restart_required`: the running VM cannot take the new size without a restart (nothing changed); or the VM is being created or deleted", body = crate::openapi::ErrorResponse),
      (status = 422, description = "Invalid size", body = crate::openapi::ErrorResponse)))]
pub async fn resize(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ResizeQuery>,
    JsonBody(req): JsonBody<UpdateVm>,
) -> Result<Json<Vm>, ApiError> {
    let cmd = ResizeVmCommand::try_from(req)?;
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    Ok(Json(crate::vms::resize::resize(&state, rec, cmd, q.restart).await?))
}

/// `202 Accepted` for a snapshot: the operation that takes it, and the snapshot.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct SnapshotAccepted {
    pub operation: crate::model::Operation,
    pub snapshot: VmSnapshot,
}

#[utoipa::path(post, path = "/v1/vms/{id}/snapshots", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam),
    request_body = CreateSnapshot,
    responses((status = 202, description = "Accepted: the operation that pauses the VM, snapshots its disks (and its memory), and resumes it", body = SnapshotAccepted),
      (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "The name is taken, or a snapshot with memory of a VM that does not run", body = crate::openapi::ErrorResponse),
      (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn create_snapshot(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshot>,
) -> Result<Response, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    let (operation, snapshot) = crate::vms::snapshot::begin(&state, rec, req).await?;
    Ok((StatusCode::ACCEPTED, Json(SnapshotAccepted { operation, snapshot })).into_response())
}

#[utoipa::path(get, path = "/v1/vms/{id}/snapshots", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam),
    responses((status = 200, description = "The VM's snapshots, by name, with their size and whether they hold memory", body = Vec<VmSnapshot>),
      (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn snapshots(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Json<Vec<VmSnapshot>>, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    Ok(Json(crate::vms::snapshot::list(&state, &rec).await?))
}

#[utoipa::path(delete, path = "/v1/vms/{id}/snapshots/{name}", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), ("name" = String, Path, description = "Snapshot name"), crate::openapi::ProjectParam),
    responses((status = 204, description = "Deleted: its disk snapshots and saved memory are gone"),
      (status = 404, body = crate::openapi::ErrorResponse), (status = 409, body = crate::openapi::ErrorResponse)))]
pub async fn delete_snapshot(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((id, name)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    crate::vms::snapshot::delete(&state, &rec, &name).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/vms/{id}/restore", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), crate::openapi::ProjectParam),
    request_body = RestoreVm,
    responses((status = 202, description = "Accepted: the operation that takes the VM back to the snapshot (running from that instant with memory; stopped without)", body = Accepted),
      (status = 404, description = "No such VM, or the VM has no such snapshot", body = crate::openapi::ErrorResponse),
      (status = 409, description = "The snapshot is still being taken, or the VM's volumes changed since", body = crate::openapi::ErrorResponse),
      (status = 422, body = crate::openapi::ErrorResponse)))]
pub async fn restore(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<RestoreVm>,
) -> Result<Response, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    // The VM as the restore begins (its task starts stopping it at once).
    let before = view(&state, &rec).await;
    let op = crate::vms::restore::begin(&state, rec, req).await?;
    Ok(accepted(op, Some(before)))
}

/// The action's name in the path: how the public document spells
/// [`VmAction`] (vmm-manager's enum, parsed from the path and carried to its driver;
/// the daemon itself knows nothing of OpenAPI). A test holds the two to the same names.
#[derive(utoipa::ToSchema)]
#[schema(as = VmAction)]
#[allow(dead_code)]
#[serde(rename_all = "lowercase")]
pub enum ActionName {
    Start,
    /// ACPI power button, forced after the stop timeout (or at once with `force`).
    Stop,
    Reboot,
    Pause,
    Resume,
}

#[derive(Deserialize)]
pub struct ActionQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(post, path = "/v1/vms/{id}/{action}", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), ("action" = inline(ActionName), Path), ("force" = Option<bool>, Query, description = "stop: power off at once instead of asking the guest"), crate::openapi::ProjectParam),
    responses((status = 202, body = Accepted), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "The VM is not in a state that allows the action", body = crate::openapi::ErrorResponse)))]
pub async fn action(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> Result<Response, ApiError> {
    let action: VmAction = action.parse().map_err(ApiError::not_found)?;
    act(&state, &caller.project, &id, action, q.force).await
}

/// Carries out a VM action (also for a managed service's VM): refused at once when it
/// cannot work now, else `202` with the operation that does it.
pub async fn act(
    state: &Arc<AppState>,
    project: &str,
    id: &str,
    action: VmAction,
    force: bool,
) -> Result<Response, ApiError> {
    let (rec, _) = resolve(state, project, id).await?;
    if rec.phase != Phase::Ready {
        return Err(VmError::ActionRefused {
            vm: rec.name,
            state: format!("{:?}", rec.phase),
            action,
        }
        .into());
    }
    // Refuse what cannot work now, synchronously, so the caller gets a 409 at once.
    let d = crate::hosts::daemons::of_vm(state, &rec).await.map_err(VmError::from)?;
    let local = crate::hosts::daemons::is_local(state, rec.host.as_deref());
    let live = d.vmm.get(&rec.id).await.map_err(upstream)?;
    let st = live.status.state;
    let ok = action.allowed_in(st);
    if !ok {
        return Err(VmError::ActionRefused {
            vm: rec.name,
            state: st.as_str().to_string(),
            action,
        }
        .into());
    }
    // Intent first: what the reconciler restores if the VMM definition is lost.
    if let Some(running) = action.desired_running() {
        set_desired_running(state, &rec.id, running).await?;
    }
    let op = state
        .ops
        .start(&rec.project, &format!("vm.{action}"), "vm", &rec.id)
        .await?;
    let (task_state, op_id, vm_id) = (state.clone(), op.id.clone(), rec.id.clone());
    tokio::spawn(async move {
        task_state.ops.progress(&op_id, &format!("{action} in progress")).await;
        match d.vmm.action(&vm_id, action, force).await {
            Ok(info) => {
                if local {
                    task_state.live.observe(&info);
                }
                task_state.ops.succeed(&op_id).await
            }
            Err(e) => task_state.ops.fail(&op_id, &upstream(e).into()).await,
        }
    });
    Ok(accepted(op, Some(view(state, &rec).await)))
}

#[derive(Deserialize)]
pub struct LogQuery {
    bytes: Option<usize>,
}

#[utoipa::path(get, path = "/v1/vms/{id}/console/log", tag = "consoles",
    params(("id" = String, Path, description = "VM id or name"), ("bytes" = Option<u64>, Query, description = "How much of the end of the log"), crate::openapi::ProjectParam),
    responses((status = 200, description = "The serial console's scrollback", content_type = "text/plain", body = String), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn console_log(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> Result<Response, ApiError> {
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    let d = crate::hosts::daemons::of_vm(&state, &rec)
        .await
        .map_err(VmError::from)?;
    let bytes = d
        .vmm
        .console_log(&rec.id, q.bytes.unwrap_or(256 * 1024))
        .await
        .map_err(upstream)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}

#[cfg(test)]
mod tests {
    use utoipa::PartialSchema;

    use super::*;

    #[test]
    fn the_documented_actions_are_vmm_managers() {
        let schema = serde_json::to_value(ActionName::schema()).expect("schema");
        let documented: Vec<&str> = schema["enum"]
            .as_array()
            .expect("an enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        let real: Vec<&str> = VmAction::ALL.iter().map(|a| a.as_str()).collect();
        assert_eq!(documented, real);
    }
}
