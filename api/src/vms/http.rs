//! The HTTP edge of `/v1/vms`: parse, call the work, map errors; nothing else.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use socket_http::ApiError;
use vmm_manager::spec::{HypervisorKind, QemuMachine, VmAction, MAX_VCPUS, MIN_MEMORY_MIB};

use crate::auth::keys::Caller;
use crate::daemons::upstream;
use crate::json::{JsonBody, Query};
use crate::model::{validate_name, Accepted, CreateVm, Phase, RootDisk, Vm, VmRecord};
use crate::state::AppState;
use crate::store;
use crate::vms::create::{attach_nics, choose_hypervisor, create_task, detach_nics, find_image};
use crate::vms::define::{finish_delete, kernel_for, undo_create};
use crate::vms::records::{name_key, resolve, set_desired_running, vm_key};

type AppS = State<Arc<AppState>>;

async fn view(state: &AppState, rec: &VmRecord) -> Vm {
    match state.vmm.get(&rec.id).await {
        Ok(info) => {
            state.live.observe(&info);
            Vm::from_record(rec, Some(&info.status), true)
        }
        Err(e) if e.is_not_found() => Vm::from_record(rec, None, true),
        Err(_) => Vm::from_record(rec, None, false),
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
    let project = caller.project.as_str();
    let id = uuid::Uuid::new_v4().to_string();
    let name = req.name.clone().unwrap_or_else(|| format!("vm-{}", &id[..8]));
    validate_name("VM", &name)?;
    if req.vcpus == 0 || req.vcpus > MAX_VCPUS {
        return Err(ApiError::unprocessable(format!(
            "vcpus must be between 1 and {MAX_VCPUS}, got {}",
            req.vcpus
        )));
    }
    let host_mib = vmm_manager::spec::host_memory_mib();
    if req.memory_mib < MIN_MEMORY_MIB || req.memory_mib > host_mib {
        return Err(ApiError::unprocessable(format!(
            "memory_mib must be between {MIN_MEMORY_MIB} and the host's {host_mib} MiB, got {}",
            req.memory_mib
        )));
    }
    if let Some(extra) = &req.cmdline_append {
        if extra.len() > 1024 || extra.chars().any(|c| c.is_control()) {
            return Err(ApiError::unprocessable(
                "cmdline_append must be at most 1024 printable characters",
            ));
        }
    }
    let hypervisor = choose_hypervisor(&state, req.hypervisor.as_deref()).await?;
    if req.vnc && hypervisor != HypervisorKind::Qemu {
        return Err(ApiError::unprocessable(
            "vnc needs the qemu hypervisor: Cloud Hypervisor has no framebuffer",
        ));
    }
    if req.machine.is_some() && hypervisor != HypervisorKind::Qemu {
        return Err(ApiError::unprocessable(
            "machine is a QEMU option; Cloud Hypervisor has one machine type",
        ));
    }
    let machine = req.machine.unwrap_or_default();
    if req.vnc && machine == QemuMachine::Microvm {
        return Err(ApiError::unprocessable(
            "vnc needs machine q35: microvm has no display device",
        ));
    }
    let image = find_image(&state, &req.image).await?;
    kernel_for(&image, hypervisor)?;
    let disk_size = match (&req.disk_size, &image.disk) {
        (None, _) => None,
        (Some(_), None) => {
            return Err(ApiError::unprocessable(format!(
                "image {:?} has no root disk; disk_size applies to images that have one",
                req.image
            )))
        }
        (Some(s), Some(d)) => {
            let bytes = crate::volumes::records::parse_size(s)?;
            if bytes < d.virtual_size {
                return Err(ApiError::unprocessable(format!(
                    "disk_size {s} is smaller than image {:?} ({} bytes)",
                    req.image, d.virtual_size
                )));
            }
            Some(bytes)
        }
    };
    // Images with a root disk are cloud images: they get a cloud-init seed, as does any
    // VM given keys or user-data. Bad keys or user-data are refused now.
    let seed = image.disk.is_some() || req.user_data.is_some() || !req.ssh_keys.is_empty();
    if seed {
        let preview = imaged::cloudinit::SeedRequest {
            instance_id: id.clone(),
            hostname: name.clone(),
            ssh_keys: req.ssh_keys.clone(),
            user_data: req.user_data.clone(),
            nics: vec![],
        };
        imaged::cloudinit::compose(&preview).map_err(ApiError::from)?;
    }

    // Intent first: claim the name, then record the VM, then the operation.
    let s = state.store.as_ref();
    s.compare_and_swap(&name_key(project, &name), None, store::encode(&id))
        .await
        .map_err(|e| match e {
            store::StoreError::Conflict { .. } => ApiError::conflict(format!("a VM named {name:?} already exists")),
            other => other.into(),
        })?;
    let rec = VmRecord {
        id: id.clone(),
        name: name.clone(),
        project: project.into(),
        image: req.image.clone(),
        vcpus: req.vcpus,
        memory_mib: req.memory_mib,
        hypervisor,
        cmdline_append: req.cmdline_append.clone(),
        vnc: req.vnc,
        machine,
        nics: vec![],
        volumes: vec![],
        image_digest: image.digest.clone(),
        root_disk: image.disk.as_ref().map(|_| RootDisk {
            volume: format!("vm-{id}-root"),
            size_bytes: disk_size,
        }),
        seed,
        ssh_keys: req.ssh_keys.clone(),
        user_data: req.user_data.clone(),
        phase: Phase::Creating,
        created_at_ms: vmm_manager::spec::now_ms(),
        desired_running: Some(req.start),
    };
    if let Err(e) = s.put(&vm_key(&id), store::encode(&rec)).await {
        let _ = s.delete(&name_key(project, &name)).await;
        return Err(e.into());
    }
    // NICs: a port (TAP + IPAM address) per NIC, made now so a taken or foreign address
    // is refused at once.
    let nic_requests = match req.nics.clone() {
        Some(n) => n,
        None if state
            .netd
            .network(&crate::model::host_name(project, crate::networks::DEFAULT_NETWORK))
            .await
            .is_ok() =>
        {
            vec![crate::model::NicRequest {
                network: crate::networks::DEFAULT_NETWORK.into(),
                ip: None,
            }]
        }
        None => vec![],
    };
    let mut rec = rec;
    match attach_nics(&state, project, &id, &nic_requests).await {
        Ok(nics) => rec.nics = nics,
        Err(e) => {
            let _ = s.delete(&vm_key(&id)).await;
            let _ = s.delete(&name_key(project, &name)).await;
            return Err(e);
        }
    }
    // Volumes: claimed now, so one already attached elsewhere is refused at once.
    for v in req.volumes.clone() {
        match crate::volumes::work::claim(&state, &rec, &v.into_attach(), &rec.volumes).await {
            Ok(a) => rec.volumes.push(a),
            Err(e) => {
                for a in &rec.volumes {
                    crate::volumes::work::release(&state, &rec.project, a).await;
                }
                detach_nics(&state, &rec.nics).await;
                let _ = s.delete(&vm_key(&id)).await;
                let _ = s.delete(&name_key(project, &name)).await;
                return Err(e);
            }
        }
    }
    // The image cannot be deleted while this VM exists.
    if let Err(e) = state.images.lease(&image.digest, &id).await {
        undo_create(&state, &rec).await;
        return Err(upstream(e));
    }
    if let Err(e) = s.put(&vm_key(&id), store::encode(&rec)).await {
        undo_create(&state, &rec).await;
        return Err(e.into());
    }
    let op = state.ops.start(project, "vm.create", "vm", &id).await?;
    let task_state = state.clone();
    let (op_id, start) = (op.id.clone(), req.start);
    let vm = Vm::from_record(&rec, None, true);
    tokio::spawn(async move { create_task(task_state, rec, image, op_id, start).await });
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
    let (mut rec, rev) = resolve(&state, &caller.project, &id).await?;
    if rec.phase == Phase::Creating {
        return Err(ApiError::conflict(format!(
            "VM {} is still being created; retry when its create operation finishes",
            rec.name
        )));
    }
    rec.phase = Phase::Deleting;
    state
        .store
        .compare_and_swap(&vm_key(&rec.id), Some(rev), store::encode(&rec))
        .await?;
    let op = state.ops.start(&rec.project, "vm.delete", "vm", &rec.id).await?;
    let vm = Vm::from_record(&rec, None, true);
    let (task_state, op_id) = (state.clone(), op.id.clone());
    tokio::spawn(async move {
        let result = async {
            task_state.ops.progress(&op_id, "stopping and removing the VMM").await;
            finish_delete(&task_state, &rec).await
        }
        .await;
        match result {
            Ok(()) => task_state.ops.succeed(&op_id).await,
            Err(e) => task_state.ops.fail(&op_id, &e).await,
        }
    });
    Ok(accepted(op, Some(vm)))
}

#[derive(Deserialize)]
pub struct ActionQuery {
    #[serde(default)]
    force: bool,
}

#[utoipa::path(post, path = "/v1/vms/{id}/{action}", tag = "vms",
    params(("id" = String, Path, description = "VM id or name"), ("action" = inline(VmAction), Path), ("force" = Option<bool>, Query, description = "stop: power off at once instead of asking the guest"), crate::openapi::ProjectParam),
    responses((status = 202, body = Accepted), (status = 404, body = crate::openapi::ErrorResponse),
      (status = 409, description = "The VM is not in a state that allows the action", body = crate::openapi::ErrorResponse)))]
pub async fn action(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path((id, action)): Path<(String, String)>,
    Query(q): Query<ActionQuery>,
) -> Result<Response, ApiError> {
    let action: VmAction = action.parse().map_err(ApiError::not_found)?;
    let (rec, _) = resolve(&state, &caller.project, &id).await?;
    if rec.phase != Phase::Ready {
        return Err(ApiError::conflict(format!(
            "VM {} is {:?}: cannot {action}",
            rec.name, rec.phase
        )));
    }
    // Refuse what cannot work now, synchronously, so the caller gets a 409 at once.
    let live = state.vmm.get(&rec.id).await.map_err(upstream)?;
    let st = live.status.state;
    let ok = action.allowed_in(st);
    if !ok {
        return Err(ApiError::conflict(format!(
            "VM {} is {}: cannot {action}",
            rec.name,
            st.as_str()
        )));
    }
    // Intent first: what the reconciler restores if the VMM definition is lost.
    if let Some(running) = action.desired_running() {
        set_desired_running(&state, &rec.id, running).await?;
    }
    let op = state
        .ops
        .start(&rec.project, &format!("vm.{action}"), "vm", &rec.id)
        .await?;
    let (task_state, op_id, vm_id, force) = (state.clone(), op.id.clone(), rec.id.clone(), q.force);
    tokio::spawn(async move {
        task_state.ops.progress(&op_id, &format!("{action} in progress")).await;
        match task_state.vmm.action(&vm_id, action, force).await {
            Ok(info) => {
                task_state.live.observe(&info);
                task_state.ops.succeed(&op_id).await
            }
            Err(e) => task_state.ops.fail(&op_id, &upstream(e)).await,
        }
    });
    Ok(accepted(op, Some(view(&state, &rec).await)))
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
    let bytes = state
        .vmm
        .console_log(&rec.id, q.bytes.unwrap_or(256 * 1024))
        .await
        .map_err(upstream)?;
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response())
}
