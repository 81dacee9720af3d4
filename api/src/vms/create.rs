//! Creating a VM: checks that need the daemons (hypervisor, image, networks, volumes),
//! the records and claims made before the `202`, and the task that defines and starts
//! it. A create that fails removes everything it made: the VMM, its state directory,
//! ports, disks and the records.

use std::sync::Arc;

use socket_http::ApiError;
use vmm_manager::spec::{HypervisorKind, VmAction};

use crate::daemons::upstream;
use crate::model::{Phase, VmRecord};
use crate::state::AppState;
use crate::store;
use crate::vms::define::{define, undo_create};
use crate::vms::records::vm_key;

/// Chooses the hypervisor: the request's, else the configured default, falling back to
/// QEMU where Cloud Hypervisor is not installed.
pub(crate) async fn choose_hypervisor(state: &AppState, requested: Option<&str>) -> Result<HypervisorKind, ApiError> {
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
pub(crate) async fn find_image(state: &AppState, name: &str) -> Result<imaged::ImageInfo, ApiError> {
    imaged::validate_name(name).map_err(|e| ApiError::unprocessable(e.to_string()))?;
    state.images.get(name).await.map_err(|e| {
        if e.is_not_found() {
            ApiError::unprocessable(format!("unknown image {name:?}: {e}"))
        } else {
            upstream(e)
        }
    })
}

fn port_id(vm_id: &str, index: usize) -> String {
    format!("{vm_id}-{index}")
}

/// Creates the ports of a VM's NICs; on failure removes the ones already made.
pub(crate) async fn attach_nics(
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
pub(crate) async fn detach_nics(state: &AppState, nics: &[crate::model::Nic]) {
    for nic in nics {
        if let Err(e) = state.netd.delete_port(&nic.port).await {
            tracing::error!(port = %nic.port, "cannot remove port: {e}");
        }
    }
}

pub(crate) async fn create_task(
    state: Arc<AppState>,
    rec: VmRecord,
    image: imaged::ImageInfo,
    op_id: String,
    start: bool,
) {
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
