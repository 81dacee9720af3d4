//! `/v1/vms`: create, list, show, delete and lifecycle actions.
//!
//! Mutations record intent in the store first (the VM record, the name claim, the
//! operation), answer `202 Accepted`, and do the work in a task that drives
//! vmm-manager through its idempotent endpoints. A create that fails removes
//! everything it made: the VMM, its state directory and the records.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use socket_http::{ApiError, ClientError};
use vmm_manager::spec::{HypervisorKind, QemuMachine, QemuOptions, VmAction, VmSpec, MAX_VCPUS, MIN_MEMORY_MIB};

use crate::auth::Caller;
use crate::json::{JsonBody, Query};
use crate::model::{validate_name, Accepted, CreateVm, Phase, RootDisk, Vm, VmRecord};
use crate::server::AppState;
use crate::store;

type AppS = State<Arc<AppState>>;

pub(crate) fn vm_key(id: &str) -> String {
    format!("vms/{id}")
}
fn name_key(project: &str, name: &str) -> String {
    format!("vm-names/{project}/{name}")
}

/// Turns a daemon client error into an API error, keeping the daemon's status where
/// it is meaningful to the user.
pub fn upstream(e: ClientError) -> ApiError {
    match e {
        ClientError::Api {
            status,
            code,
            message,
            details,
        } => {
            let mut err = ApiError::new(status, &code, message);
            err.body.details = details;
            err
        }
        other => ApiError::unavailable(other.to_string()),
    }
}

/// Finds a VM record by id or by name.
/// VMs of other projects are not found.
pub async fn resolve(state: &AppState, project: &str, id_or_name: &str) -> Result<(VmRecord, u64), ApiError> {
    let s = state.store.as_ref();
    if let Some(found) = store::get_json::<VmRecord>(s, &vm_key(id_or_name)).await? {
        if found.0.project == project {
            return Ok(found);
        }
    }
    if let Some((id, _)) = store::get_json::<String>(s, &name_key(project, id_or_name)).await? {
        if let Some(found) = store::get_json::<VmRecord>(s, &vm_key(&id)).await? {
            return Ok(found);
        }
    }
    Err(ApiError::not_found(format!("VM {id_or_name:?} does not exist")))
}

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
    let rendered = state.vm_list.get(&state, &caller.project).await?;
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

/// Chooses the hypervisor: the request's, else the configured default, falling back to
/// QEMU where Cloud Hypervisor is not installed.
async fn choose_hypervisor(state: &AppState, requested: Option<&str>) -> Result<HypervisorKind, ApiError> {
    let requested = match requested {
        Some(h) => Some(h.parse::<HypervisorKind>().map_err(ApiError::unprocessable)?),
        None => None,
    };
    let hypervisors = state.vmm.hypervisors().await.map_err(upstream)?;
    let available = |k: HypervisorKind| {
        hypervisors
            .iter()
            .find(|h| h.kind == k)
            .filter(|h| h.available)
            .is_some()
    };
    let reason = |k: HypervisorKind| {
        hypervisors
            .iter()
            .find(|h| h.kind == k)
            .and_then(|h| h.detail.clone())
            .unwrap_or_default()
    };
    match requested {
        Some(kind) if available(kind) => Ok(kind),
        Some(kind) => Err(ApiError::unprocessable(format!(
            "hypervisor {kind} cannot run VMs on this host: {}",
            reason(kind)
        ))),
        None => {
            let kind = state.config.default_hypervisor;
            if available(kind) {
                Ok(kind)
            } else if available(HypervisorKind::Qemu) {
                Ok(HypervisorKind::Qemu)
            } else {
                Err(ApiError::unprocessable(
                    "no hypervisor is installed: install qemu-system-x86 or cloud-hypervisor",
                ))
            }
        }
    }
}

/// Looks an image up in imaged; an unknown image is the request's fault (422).
async fn find_image(state: &AppState, name: &str) -> Result<imaged::ImageInfo, ApiError> {
    imaged::validate_name(name).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    state.images.get(name).await.map_err(|e| {
        if e.is_not_found() {
            ApiError::unprocessable(format!("unknown image {name:?}: {e}"))
        } else {
            upstream(e)
        }
    })
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
            let bytes = crate::volumes::parse_size(s)?;
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
        match crate::volumes::claim(&state, &rec, &v.into_attach(), &rec.volumes).await {
            Ok(a) => rec.volumes.push(a),
            Err(e) => {
                for a in &rec.volumes {
                    crate::volumes::release(&state, &rec.project, a).await;
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

fn kernel_for(image: &imaged::ImageInfo, hypervisor: HypervisorKind) -> Result<std::path::PathBuf, ApiError> {
    let boot = &image.boot;
    let kernel = match hypervisor {
        // Cloud Hypervisor boots only the uncompressed PVH ELF.
        HypervisorKind::CloudHypervisor => boot.kernel_elf.clone(),
        HypervisorKind::Qemu => boot.kernel_bzimage.clone().or_else(|| boot.kernel_elf.clone()),
    };
    kernel.ok_or_else(|| {
        ApiError::unprocessable(format!(
            "image {:?} has no kernel that {hypervisor} can boot",
            image.name
        ))
    })
}

fn port_id(vm_id: &str, index: usize) -> String {
    format!("{vm_id}-{index}")
}

/// Creates the ports of a VM's NICs; on failure removes the ones already made.
async fn attach_nics(
    state: &AppState,
    project: &str,
    vm_id: &str,
    requests: &[crate::model::NicRequest],
) -> Result<Vec<crate::model::Nic>, ApiError> {
    let mut nics = Vec::new();
    for (i, req) in requests.iter().enumerate() {
        let made = async {
            let host_network = crate::model::host_name(project, &req.network);
            let net = state.netd.network(&host_network).await.map_err(|e| {
                if e.is_not_found() {
                    ApiError::unprocessable(format!("unknown network {:?}", req.network))
                } else {
                    upstream(e)
                }
            })?;
            if let Some(ip) = req.ip {
                if !net.spec.subnet.contains(&ip) {
                    return Err(ApiError::unprocessable(format!(
                        "address {ip} is outside network {}'s subnet {}",
                        req.network, net.spec.subnet
                    )));
                }
            }
            let spec = netd::network::PortSpec {
                network: host_network.clone(),
                mac: None,
                ip: req.ip,
                queues: 1,
            };
            let port = state
                .netd
                .ensure_port(&port_id(vm_id, i), &spec)
                .await
                .map_err(upstream)?;
            Ok(crate::model::Nic {
                network: req.network.clone(),
                port: port.id,
                tap: port.tap,
                mac: port.mac,
                ip: port.ip,
                prefix: port.prefix,
                gateway: port.gateway,
                dhcp: net.spec.dhcp,
            })
        }
        .await;
        match made {
            Ok(nic) => nics.push(nic),
            Err(e) => {
                detach_nics(state, &nics).await;
                return Err(e);
            }
        }
    }
    Ok(nics)
}

/// Removes a VM's ports (TAPs and addresses).
async fn detach_nics(state: &AppState, nics: &[crate::model::Nic]) {
    for nic in nics {
        if let Err(e) = state.netd.delete_port(&nic.port).await {
            tracing::error!(port = %nic.port, "cannot remove port: {e}");
        }
    }
}

/// Records whether the user wants VM `id` running (compare-and-swap, retried when
/// another writer changed the record meanwhile).
pub async fn set_desired_running(state: &AppState, id: &str, running: bool) -> Result<(), ApiError> {
    let changed = store::update_json(state.store.as_ref(), &vm_key(id), |rec: &mut VmRecord| {
        let was = rec.desired_running.replace(running);
        was != Some(running)
    })
    .await;
    match changed {
        Ok(_) => Ok(()),
        Err(store::StoreError::Conflict { .. }) => Err(ApiError::conflict("the VM's record kept changing; retry")),
        Err(e) => Err(e.into()),
    }
}

/// Defines a VM in vmm-manager again from its record, when vmm-manager lost it (its
/// state directory under /run is gone after a host reboot, or was removed by hand).
/// Everything holding data must still exist: a missing root disk or volume is an error,
/// never made anew empty. Ports netd lost are made again with the same MAC and address,
/// and the cloud-init seed is written again. Starts the VM when the user last wanted
/// it running; returns whether it did.
pub async fn redefine(state: &AppState, rec: &VmRecord) -> Result<bool, ApiError> {
    for nic in &rec.nics {
        let spec = netd::network::PortSpec {
            network: crate::model::host_name(&rec.project, &nic.network),
            mac: Some(nic.mac.clone()),
            ip: Some(nic.ip),
            queues: 1,
        };
        let port = state.netd.ensure_port(&nic.port, &spec).await.map_err(upstream)?;
        if port.tap != nic.tap {
            return Err(ApiError::conflict(format!(
                "port {} came back as TAP {}, the VM was defined with {}",
                nic.port, port.tap, nic.tap
            )));
        }
    }
    let image = state
        .images
        .get(if rec.image_digest.is_empty() {
            &rec.image
        } else {
            &rec.image_digest
        })
        .await
        .map_err(upstream)?;
    if let Some(root) = &rec.root_disk {
        state.blockd.volume(&root.volume).await.map_err(|e| {
            if e.is_not_found() {
                ApiError::conflict(format!(
                    "the root disk {} is gone; the VM cannot be defined again",
                    root.volume
                ))
            } else {
                upstream(e)
            }
        })?;
    }
    define(state, rec, &image, None).await?;
    if rec.desired_running != Some(true) {
        return Ok(false);
    }
    // Defined is defined: a start that fails leaves the VM stopped (or failed, with the
    // reason), and the pass goes on.
    match state.vmm.action(&rec.id, VmAction::Start, false).await {
        Ok(started) => {
            state.live.observe(&started);
            Ok(true)
        }
        Err(e) => {
            tracing::error!(vm = %rec.id, name = %rec.name, "defined again, but it does not start: {e}");
            Ok(false)
        }
    }
}

/// Builds the spec vmm-manager gets from the record and its image.
fn vm_spec(rec: &VmRecord, image: &imaged::ImageInfo) -> Result<VmSpec, ApiError> {
    let kernel = kernel_for(image, rec.hypervisor)?;
    let mut cmdline = format!("{} hearth.hostname={}", image.boot.cmdline, rec.name);
    // Guests on networks without DHCP learn their address from the kernel command line
    // (the tiny image reads hearth.ip/hearth.gw).
    if let Some(nic) = rec.nics.first().filter(|n| !n.dhcp) {
        cmdline.push_str(&format!(
            " hearth.ip={}/{} hearth.gw={}",
            nic.ip, nic.prefix, nic.gateway
        ));
    }
    if let Some(extra) = &rec.cmdline_append {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    Ok(VmSpec {
        id: rec.id.clone(),
        name: rec.name.clone(),
        hypervisor: rec.hypervisor,
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        kernel,
        initramfs: image.boot.initramfs.clone(),
        cmdline,
        disks: vec![],
        nics: rec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| vmm_manager::spec::NicSpec {
                id: format!("net{i}"),
                tap: n.tap.clone(),
                mac: n.mac.clone(),
                queue_pairs: 1,
            })
            .collect(),
        qemu: QemuOptions {
            machine: rec.machine,
            vnc: rec.vnc,
        },
    })
}

/// The host's resolvers (not loopback ones, which mean nothing inside a VM).
fn host_resolvers() -> Vec<std::net::IpAddr> {
    std::fs::read_to_string("/etc/resolv.conf")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|a| a.trim().parse::<std::net::IpAddr>().ok())
        .filter(|a| !a.is_loopback())
        .take(3)
        .collect()
}

/// What imaged writes into the VM's cloud-init seed.
fn seed_request(rec: &VmRecord) -> imaged::cloudinit::SeedRequest {
    let dns = host_resolvers();
    imaged::cloudinit::SeedRequest {
        instance_id: rec.id.clone(),
        hostname: rec.name.clone(),
        ssh_keys: rec.ssh_keys.clone(),
        user_data: rec.user_data.clone(),
        nics: rec
            .nics
            .iter()
            .map(|n| imaged::cloudinit::SeedNic {
                mac: n.mac.clone(),
                ip: n.ip.into(),
                prefix: n.prefix,
                gateway: Some(n.gateway.into()),
                dns: dns.clone(),
            })
            .collect(),
    }
}

/// The root disk (a copy-on-write clone of the image, made by blockd) and the
/// cloud-init seed, in that order: the guest sees them as vda and vdb.
async fn boot_disks(
    state: &AppState,
    rec: &VmRecord,
    image: &imaged::ImageInfo,
    op_id: Option<&str>,
) -> Result<Vec<vmm_manager::spec::DiskSpec>, ApiError> {
    use vmm_manager::spec::{DiskFormat, DiskSource, DiskSpec};
    let mut disks = Vec::new();
    if let (Some(root), Some(disk)) = (&rec.root_disk, &image.disk) {
        if let Some(op) = op_id {
            state.ops.progress(op, "cloning the root disk from the image").await;
        }
        let spec = blockd::service::VolumeSpec {
            size_bytes: root.size_bytes,
            source: Some(blockd::service::VolumeSource::ImageClone {
                path: disk.path.clone(),
                key: image.digest.clone(),
            }),
        };
        let v = state
            .blockd
            .ensure_volume(&root.volume, &spec)
            .await
            .map_err(upstream)?;
        let path = v.path.ok_or_else(|| {
            ApiError::conflict("the volume pool keeps no files (memory pool): root disks need a file or LVM pool")
        })?;
        let format = match v.format {
            blockd::volume::VolumeFormat::Raw => DiskFormat::Raw,
            blockd::volume::VolumeFormat::Qcow2 => DiskFormat::Qcow2,
        };
        disks.push(DiskSpec {
            id: "root".into(),
            source: DiskSource::File { path, format },
            readonly: false,
        });
    }
    if rec.seed {
        if let Some(op) = op_id {
            state.ops.progress(op, "writing the cloud-init seed").await;
        }
        let seed = state.images.seed(&rec.id, &seed_request(rec)).await.map_err(upstream)?;
        disks.push(DiskSpec {
            id: "seed".into(),
            source: DiskSource::File {
                path: seed.path,
                format: DiskFormat::Raw,
            },
            readonly: true,
        });
    }
    Ok(disks)
}

/// Removes what a VM owns on the host, in dependency order: the VMM, its ports, its
/// root disk and seed, its volume attachments, its image lease. Each step is
/// idempotent; errors are logged and the rest still runs.
async fn remove_vm_parts(state: &AppState, rec: &VmRecord) -> Result<(), ApiError> {
    let mut first_error = None;
    let mut note = |what: &str, e: ApiError| {
        tracing::error!(vm = %rec.id, "cannot remove the {what}: {}", e.body.message);
        first_error.get_or_insert(e);
    };
    if let Err(e) = state.vmm.delete(&rec.id).await {
        note("VMM", upstream(e));
    }
    for nic in &rec.nics {
        if let Err(e) = state.netd.delete_port(&nic.port).await {
            note("port", upstream(e));
        }
    }
    if let Some(root) = &rec.root_disk {
        match state.blockd.delete_volume(&root.volume).await {
            Ok(()) => {}
            Err(e) if e.is_not_found() => {}
            Err(e) => note("root disk", upstream(e)),
        }
    }
    if rec.seed {
        if let Err(e) = state.images.delete_seed(&rec.id).await {
            note("cloud-init seed", upstream(e));
        }
    }
    // Volumes outlive the VM: only the attachment goes.
    for v in &rec.volumes {
        crate::volumes::release(state, &rec.project, v).await;
    }
    if let Err(e) = state.images.release(&rec.id).await {
        note("image lease", upstream(e));
    }
    first_error.map_or(Ok(()), Err)
}

/// Finishes a delete: everything on the host, then the records.
pub(crate) async fn finish_delete(state: &AppState, rec: &VmRecord) -> Result<(), ApiError> {
    remove_vm_parts(state, rec).await?;
    state.store.delete(&vm_key(&rec.id)).await?;
    state.store.delete(&name_key(&rec.project, &rec.name)).await?;
    Ok(())
}

/// Undoes a create that failed: everything on the host and the records.
pub(crate) async fn undo_create(state: &AppState, rec: &VmRecord) {
    let _ = remove_vm_parts(state, rec).await;
    let _ = state.store.delete(&vm_key(&rec.id)).await;
    let _ = state.store.delete(&name_key(&rec.project, &rec.name)).await;
}

/// Gives vmm-manager the VM as its record describes it: root disk and seed, data
/// volumes, NICs. Progress goes to operation `op_id` when there is one.
async fn define(
    state: &AppState,
    rec: &VmRecord,
    image: &imaged::ImageInfo,
    op_id: Option<&str>,
) -> Result<(), ApiError> {
    let mut spec = vm_spec(rec, image)?;
    spec.disks = boot_disks(state, rec, image, op_id).await?;
    for v in &rec.volumes {
        spec.disks
            .push(crate::volumes::disk_spec(state, &rec.project, v).await?);
    }
    let defined = state.vmm.ensure(&spec).await.map_err(upstream)?;
    state.live.observe(&defined);
    Ok(())
}

async fn create_task(state: Arc<AppState>, rec: VmRecord, image: imaged::ImageInfo, op_id: String, start: bool) {
    let result = async {
        state.ops.progress(&op_id, "defining the VM").await;
        define(&state, &rec, &image, Some(&op_id)).await?;
        let mut ready = rec.clone();
        ready.phase = Phase::Ready;
        state.store.put(&vm_key(&rec.id), store::encode(&ready)).await?;
        if start {
            state.ops.progress(&op_id, "starting the VMM").await;
            let started = state
                .vmm
                .action(&rec.id, VmAction::Start, false)
                .await
                .map_err(upstream)?;
            state.live.observe(&started);
        }
        Ok::<_, ApiError>(())
    }
    .await;
    match result {
        Ok(()) => state.ops.succeed(&op_id).await,
        Err(e) => {
            // Leave nothing behind: no VMM, state directory, disk, seed or records.
            undo_create(&state, &rec).await;
            state.ops.fail(&op_id, &e).await;
        }
    }
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
pub struct WaitQuery {
    #[serde(default)]
    wait: Option<f64>,
}

#[utoipa::path(get, path = "/v1/operations/{id}", tag = "operations",
    params(("id" = String, Path), ("wait" = Option<f64>, Query, description = "Seconds to wait for the operation to finish (at most 60)")),
    responses((status = 200, body = crate::model::Operation), (status = 404, body = crate::openapi::ErrorResponse)))]
pub async fn operation(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<WaitQuery>,
) -> Result<Json<crate::model::Operation>, ApiError> {
    let wait = q.wait.unwrap_or(0.0);
    if !(0.0..=3600.0).contains(&wait) {
        return Err(ApiError::unprocessable("wait must be between 0 and 3600 seconds"));
    }
    // Long-polls are capped so proxies and clients do not time out first.
    let wait = Duration::from_secs_f64(wait.min(60.0));
    // Operations of other projects are not found.
    let op = state.ops.get(&id).await?;
    if op.project != caller.project {
        return Err(ApiError::not_found(format!("operation {id:?} does not exist")));
    }
    Ok(Json(state.ops.wait(&id, wait).await?))
}

#[utoipa::path(get, path = "/v1/operations", tag = "operations", params(crate::openapi::ProjectParam),
    responses((status = 200, description = "Operations, newest first", body = Vec<crate::model::Operation>)))]
pub async fn operations(
    State(state): AppS,
    Extension(caller): Extension<Caller>,
) -> Result<Json<Vec<crate::model::Operation>>, ApiError> {
    let mut ops = state.ops.list().await?;
    ops.retain(|o| o.project == caller.project);
    Ok(Json(ops))
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
