//! What `/v1/volumes` shows and takes: the api's own types. blockd's wire types carry
//! host details (the vhost-user socket a VMM connects to); they are converted here and
//! never reach the public document.

use serde::{Deserialize, Serialize};

use crate::model::AttachVia;

/// A volume as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Volume {
    pub name: String,
    pub project: String,
    /// `local` (in this host's pool) or `remote` (an NBD export elsewhere).
    pub location: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    /// Bytes the volume really takes in its pool (blocks written and not trimmed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allocated_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format: Option<VolumeFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attached_to: Option<Attachment>,
    #[serde(default)]
    pub exports: Vec<Export>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteDiskSpec>,
    pub created_at_ms: u64,
    /// The managed service it belongs to (`database/<name>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
}

/// Which VM holds a volume (also the claim `volume-attachments/{project}/{name}` in the store).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Attachment {
    pub vm: String,
    pub vm_name: String,
    pub disk: String,
    pub via: AttachVia,
    pub read_only: bool,
}

/// How a volume's bytes are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeFormat {
    Raw,
    Qcow2,
}

impl From<blockd::volume::VolumeFormat> for VolumeFormat {
    fn from(f: blockd::volume::VolumeFormat) -> Self {
        match f {
            blockd::volume::VolumeFormat::Raw => Self::Raw,
            blockd::volume::VolumeFormat::Qcow2 => Self::Qcow2,
        }
    }
}

/// A read-only point-in-time copy of a volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Snapshot {
    pub name: String,
    pub volume: String,
    pub size_bytes: u64,
    pub allocated_bytes: u64,
    /// Volumes cloned from this snapshot.
    pub clones: Vec<String>,
}

impl Snapshot {
    /// blockd's snapshot, with volume names as `project` knows them.
    pub fn seen_in(project: &str, s: blockd::volume::Snapshot) -> Self {
        let own = |n: &str| crate::model::name_in_project(project, n).to_string();
        Self {
            name: s.name,
            volume: own(&s.volume),
            size_bytes: s.size_bytes,
            allocated_bytes: s.allocated_bytes,
            clones: s.clones.iter().map(|c| own(c)).collect(),
        }
    }
}

/// How a volume is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ExportKind {
    /// Over NBD, to other hosts and tools.
    Nbd,
    /// To a VM over vhost-user-blk.
    VhostUser,
}

/// Where an NBD export can be reached.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct NbdEndpoint {
    pub export: String,
    /// `nbd://…` and `nbd+unix://…` URIs, as qemu-img, nbdinfo and nbdcopy take them.
    pub uris: Vec<String>,
}

/// An export of a volume as it exists now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Export {
    pub volume: String,
    pub kind: ExportKind,
    pub read_only: bool,
    /// For a vhost-user export: true while a VM is connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connected: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nbd: Option<NbdEndpoint>,
}

impl Export {
    /// blockd's export of the volume `volume` (the name its project knows).
    pub fn of(volume: &str, e: blockd::exports::Export) -> Self {
        Self {
            volume: volume.to_string(),
            kind: match e.kind {
                blockd::exports::ExportKind::Nbd => ExportKind::Nbd,
                blockd::exports::ExportKind::VhostUser => ExportKind::VhostUser,
            },
            read_only: e.read_only,
            connected: e.connected,
            nbd: e.nbd.map(|n| NbdEndpoint {
                export: n.export,
                uris: n.uris,
            }),
        }
    }
}

/// A volume on another host, exported there over NBD. Exactly one of `tcp` and `unix`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RemoteDiskSpec {
    /// `host:port` of the remote NBD server.
    #[serde(default)]
    pub tcp: Option<String>,
    /// Unix socket of the remote NBD server (same host, or a forwarded socket).
    #[serde(default)]
    pub unix: Option<String>,
    /// The export name (the volume's name on the remote blockd).
    pub export: String,
    #[serde(default)]
    pub read_only: bool,
    /// Connect inside TLS (`nbds://`), verifying the server against the `ca-cert.pem`
    /// of blockd's `--nbd-tls-certificates` directory.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tls: bool,
}

impl From<&RemoteDiskSpec> for blockd::exports::RemoteDiskSpec {
    fn from(r: &RemoteDiskSpec) -> Self {
        Self {
            tcp: r.tcp.clone(),
            unix: r.unix.clone().map(Into::into),
            export: r.export.clone(),
            read_only: r.read_only,
            tls: r.tls,
        }
    }
}
