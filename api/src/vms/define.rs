//! A VM's definition in vmm-manager from its record (spec, root disk, seed, volumes),
//! defining it again after vmm-manager lost it, and removing everything a VM owns.

use vmm_manager::spec::{DiskFormat, DiskSource, DiskSpec};

use crate::model::HypervisorKind;
use vmm_manager::spec::{QemuOptions, VmAction, VmSpec};

use crate::daemons::upstream;
use crate::model::VmRecord;
use crate::state::AppState;
use crate::vms::error::VmError;
use crate::vms::records::{name_key, vm_key};

/// Defines a VM in vmm-manager again from its record, when vmm-manager lost it (its
/// state directory under /run is gone after a host reboot, or was removed by hand).
/// Everything holding data must still exist: a missing root disk or volume is an error,
/// never made anew empty. Ports netd lost are made again with the same MAC and address,
/// and the cloud-init seed is written again. Starts the VM when the user last wanted
/// it running; returns whether it did.
pub async fn redefine(state: &AppState, rec: &VmRecord) -> Result<bool, VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    for nic in &rec.nics {
        let spec = netd::network::PortSpec {
            network: crate::model::host_name(&rec.project, &nic.network),
            mac: Some(nic.mac.clone()),
            ip: Some(nic.ip),
            queues: 1,
            ingress: nic.ingress.as_ref().map(crate::model::NicIngress::to_netd),
        };
        let port = d.netd.ensure_port(&nic.port, &spec).await.map_err(upstream)?;
        if port.tap != nic.tap {
            return Err(VmError::PortMoved {
                port: nic.port.clone(),
                tap: port.tap,
                defined: nic.tap.clone(),
            });
        }
    }
    let image = d
        .images
        .get(if rec.image_digest.is_empty() {
            &rec.image
        } else {
            &rec.image_digest
        })
        .await
        .map_err(upstream)?;
    if let Some(root) = &rec.root_disk {
        d.blockd.volume(&root.volume).await.map_err(|e| {
            if e.is_not_found() {
                VmError::RootDiskGone(root.volume.clone())
            } else {
                upstream(e).into()
            }
        })?;
    }
    define(state, rec, &image).await?;
    if rec.desired_running != Some(true) {
        return Ok(false);
    }
    // Defined is defined: a start that fails leaves the VM stopped (or failed, with the
    // reason), and the pass goes on.
    match d.vmm.action(&rec.id, VmAction::Start, false).await {
        Ok(started) => {
            state.observe(rec.host.as_deref(), &started);
            Ok(true)
        }
        Err(e) => {
            tracing::error!(vm = %rec.id, name = %rec.name, "defined again, but it does not start: {e}");
            Ok(false)
        }
    }
}

/// Builds the spec vmm-manager gets from the record and its image.
fn vm_spec(rec: &VmRecord, image: &imaged::ImageInfo) -> Result<VmSpec, VmError> {
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
        hypervisor: rec.hypervisor.into(),
        vcpus: rec.vcpus,
        memory_mib: rec.memory_mib,
        max_vcpus: rec.max_vcpus,
        max_memory_mib: rec.max_memory_mib,
        limits: rec.limits.clone(),
        agent_channel: rec.managed_by.is_some(),
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
                fds: vec![],
            })
            .collect(),
        qemu: QemuOptions {
            machine: rec.machine.into(),
            vnc: rec.vnc,
        },
    })
}

/// What imaged writes into the VM's cloud-init seed.
fn seed_request(rec: &VmRecord, dns: Vec<std::net::IpAddr>) -> imaged::cloudinit::SeedRequest {
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

/// The root disk: a copy-on-write clone of the image, made by blockd (`None` for an
/// image without a disk). The guest sees it as vda.
pub(crate) async fn root_disk(
    state: &AppState,
    rec: &VmRecord,
    image: &imaged::ImageInfo,
) -> Result<Option<DiskSpec>, VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    let (Some(root), Some(disk)) = (&rec.root_disk, &image.disk) else {
        return Ok(None);
    };
    let source = match &root.origin {
        // From another VM's snapshot: a copy-on-write clone of its root disk then.
        Some(origin) => blockd::service::VolumeSource::Snapshot(origin.clone()),
        None => blockd::service::VolumeSource::ImageClone {
            path: disk.path.clone(),
            key: image.digest.clone(),
        },
    };
    let spec = blockd::service::VolumeSpec {
        size_bytes: root.size_bytes,
        source: Some(source),
    };
    let v = d.blockd.ensure_volume(&root.volume, &spec).await.map_err(upstream)?;
    let path = v.path.ok_or(VmError::PoolKeepsNoFiles)?;
    let format = match v.format {
        blockd::volume::VolumeFormat::Raw => DiskFormat::Raw,
        blockd::volume::VolumeFormat::Qcow2 => DiskFormat::Qcow2,
    };
    Ok(Some(DiskSpec {
        id: "root".into(),
        source: DiskSource::File { path, format },
        readonly: false,
    }))
}

/// The cloud-init seed imaged writes (`None` for a VM without one); after the root disk,
/// so the guest sees it as vdb.
pub(crate) async fn seed_disk(state: &AppState, rec: &VmRecord) -> Result<Option<DiskSpec>, VmError> {
    if !rec.seed {
        return Ok(None);
    }
    // The resolvers of the host the VM runs on, as its netd sees them.
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    let dns = if crate::hosts::daemons::is_local(state, rec.host.as_deref()) {
        state.host_network.get_or(|| state.netd.host()).await
    } else {
        d.netd.host().await
    }
    .map_err(upstream)?
    .resolvers;
    let seed = d
        .images
        .seed(&rec.id, &seed_request(rec, dns))
        .await
        .map_err(upstream)?;
    Ok(Some(DiskSpec {
        id: "seed".into(),
        source: DiskSource::File {
            path: seed.path,
            format: DiskFormat::Raw,
        },
        readonly: true,
    }))
}

/// Removes what a VM owns on the host, in dependency order: the VMM, its ports, its
/// root disk and seed, its volume attachments, its image lease. Each step is
/// idempotent; errors are logged and the rest still runs.
async fn remove_vm_parts(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
    use crate::vms::parts;
    let results = [
        ("VMM", parts::remove_vmm(state, rec).await),
        ("ports", parts::remove_ports(state, rec).await),
        ("root disk", parts::remove_root_disk(state, rec).await),
        ("cloud-init seed", parts::remove_seed(state, rec).await),
        ("volume attachments", parts::release_volumes(state, rec).await),
        ("image lease", parts::release_image(state, rec).await),
    ];
    let mut first_error = None;
    for (what, result) in results {
        if let Err(e) = result {
            tracing::error!(vm = %rec.id, "cannot remove the {what}: {e}");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Finishes a delete: everything on the host, then the records.
pub(crate) async fn finish_delete(state: &AppState, rec: &VmRecord) -> Result<(), VmError> {
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

/// Gives vmm-manager the VM as its record describes it: root disk and seed (made or
/// found again), data volumes, NICs.
pub(crate) async fn define(state: &AppState, rec: &VmRecord, image: &imaged::ImageInfo) -> Result<(), VmError> {
    let mut boot = Vec::new();
    boot.extend(root_disk(state, rec, image).await?);
    boot.extend(seed_disk(state, rec).await?);
    define_with(state, rec, image, boot).await
}

/// [`define`] with the boot disks already made.
pub(crate) async fn define_with(
    state: &AppState,
    rec: &VmRecord,
    image: &imaged::ImageInfo,
    boot: Vec<DiskSpec>,
) -> Result<(), VmError> {
    let d = crate::hosts::daemons::of_vm(state, rec).await?;
    let mut spec = vm_spec(rec, image)?;
    spec.disks = boot;
    for v in &rec.volumes {
        spec.disks
            .push(crate::volumes::work::disk_spec(state, &rec.project, v).await?);
    }
    let defined = d.vmm.ensure(&spec).await.map_err(upstream)?;
    state.observe(rec.host.as_deref(), &defined);
    Ok(())
}

pub(crate) fn kernel_for(image: &imaged::ImageInfo, hypervisor: HypervisorKind) -> Result<std::path::PathBuf, VmError> {
    let boot = &image.boot;
    let kernel = match hypervisor {
        // Cloud Hypervisor boots only the uncompressed PVH ELF.
        HypervisorKind::CloudHypervisor => boot.kernel_elf.clone(),
        HypervisorKind::Qemu => boot.kernel_bzimage.clone().or_else(|| boot.kernel_elf.clone()),
    };
    kernel.ok_or_else(|| VmError::NoKernel {
        image: image.name.clone(),
        hypervisor,
    })
}
