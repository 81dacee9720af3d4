//! The volume routes' request bodies as typed commands: every check the body alone
//! allows (names, sizes, where a new volume's bytes come from, a remote export's
//! address), unit-tested without a running stack. What needs the store or blockd (the
//! source volume exists, the pool has room) is checked by the work that follows.

use crate::volumes::error::VolumeError;
use serde::Deserialize;

use crate::model::validate_name;
use crate::volumes::records::validate_new_name;
use crate::volumes::view::RemoteDiskSpec;

/// Sizes as bytes or as `10G`, `512M`, `1T` (powers of 1024), in whole 512-byte
/// sectors. The volume gets the size rounded up to what its pool allocates in: an
/// extent (4 MiB by default) in an LVM thin pool, so asking again for the same size
/// changes nothing.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SizeRequest {
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub size: Option<String>,
}

impl SizeRequest {
    pub fn bytes(&self) -> Result<Option<u64>, VolumeError> {
        match (&self.size_bytes, &self.size) {
            (Some(_), Some(_)) => Err(invalid("give size_bytes or size, not both")),
            (Some(b), None) => Ok(Some(*b)),
            (None, Some(s)) => parse_size(s).map(Some),
            (None, None) => Ok(None),
        }
    }
}

fn invalid(why: impl Into<String>) -> VolumeError {
    VolumeError::Invalid(why.into())
}

/// `10G` → 10 GiB. Plain numbers are bytes.
pub fn parse_size(s: &str) -> Result<u64, VolumeError> {
    let t = s.trim();
    let bad = || {
        invalid(format!(
            "size {s:?}: write bytes or a number with K, M, G or T (powers of 1024)"
        ))
    };
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().map_err(|_| bad())?;
    n.checked_mul(mult).ok_or_else(bad)
}

#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum SourceRequest {
    /// `volume@snapshot`.
    Snapshot(String),
}

/// `POST /v1/volumes` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVolume {
    pub name: String,
    #[serde(default)]
    pub size_bytes: Option<u64>,
    #[serde(default)]
    pub size: Option<String>,
    #[serde(default)]
    pub source: Option<SourceRequest>,
    /// A volume exported over NBD by another host's blockd.
    #[serde(default)]
    pub remote: Option<RemoteDiskSpec>,
}

/// Where a new volume's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// Zeros, this many bytes.
    Empty { size_bytes: u64 },
    /// A clone of a snapshot (larger when `size_bytes` says so).
    Snapshot {
        volume: String,
        snapshot: String,
        size_bytes: Option<u64>,
    },
    /// A volume another host exports over NBD: it has the size its host gives it.
    Remote(RemoteDiskSpec),
}

/// A volume create request that passed every check the request alone allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateVolumeCommand {
    pub name: String,
    pub origin: Origin,
}

impl TryFrom<CreateVolume> for CreateVolumeCommand {
    type Error = VolumeError;

    fn try_from(req: CreateVolume) -> Result<Self, VolumeError> {
        validate_new_name(&req.name)?;
        let size = SizeRequest {
            size_bytes: req.size_bytes,
            size: req.size.clone(),
        }
        .bytes()?;
        let origin = match (req.remote, req.source, size) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(invalid(
                    "a remote volume has the size its host gives it: no size or source",
                ))
            }
            (Some(remote), None, None) => {
                match (&remote.tcp, &remote.unix) {
                    (Some(_), None) => {}
                    (None, Some(u)) if u.starts_with('/') => {}
                    (None, Some(u)) => return Err(invalid(format!("unix socket path {u} must be absolute"))),
                    _ => return Err(invalid("give exactly one of tcp (host:port) and unix (socket path)")),
                }
                if remote.export.is_empty() || remote.export.len() > 4096 {
                    return Err(invalid(
                        "remote.export names the volume on the remote host: 1 to 4096 bytes",
                    ));
                }
                Origin::Remote(remote)
            }
            (None, Some(SourceRequest::Snapshot(snap)), size_bytes) => {
                let (volume, snapshot) = snap
                    .split_once('@')
                    .ok_or_else(|| invalid(format!("{snap:?} does not name a snapshot: write volume@snapshot")))?;
                validate_name("volume", volume)?;
                validate_name("snapshot", snapshot)?;
                Origin::Snapshot {
                    volume: volume.to_string(),
                    snapshot: snapshot.to_string(),
                    size_bytes,
                }
            }
            (None, None, Some(size_bytes)) => Origin::Empty { size_bytes },
            (None, None, None) => return Err(invalid("give size_bytes or size (e.g. \"10G\") for a new volume")),
        };
        Ok(Self { name: req.name, origin })
    }
}

impl CreateVolumeCommand {
    /// The name blockd knows the volume by in `project` (see
    /// [`crate::model::host_name`]), which must fit blockd's 63 characters.
    pub fn host_name_in(&self, project: &str) -> Result<String, VolumeError> {
        let host = crate::model::host_name(project, &self.name);
        if host.len() > 63 {
            return Err(VolumeError::NameTooLong {
                name: self.name.clone(),
                project: project.to_string(),
            });
        }
        Ok(host)
    }

    pub fn remote(&self) -> Option<&RemoteDiskSpec> {
        match &self.origin {
            Origin::Remote(r) => Some(r),
            _ => None,
        }
    }
}

/// A resize: the new size, which must be given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeCommand {
    pub size_bytes: u64,
}

impl TryFrom<SizeRequest> for ResizeCommand {
    type Error = VolumeError;

    fn try_from(req: SizeRequest) -> Result<Self, VolumeError> {
        let size_bytes = req.bytes()?.ok_or_else(|| invalid("give size_bytes or size"))?;
        Ok(Self { size_bytes })
    }
}

/// `POST /v1/volumes/{name}/snapshots` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NameRequest {
    pub name: String,
}

/// A snapshot's name, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotCommand {
    pub name: String,
}

impl TryFrom<NameRequest> for SnapshotCommand {
    type Error = VolumeError;

    fn try_from(req: NameRequest) -> Result<Self, VolumeError> {
        validate_name("snapshot", &req.name)?;
        Ok(Self { name: req.name })
    }
}

/// `POST /v1/volumes/{name}/clone` body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CloneRequest {
    pub name: String,
    /// Clone this snapshot of the volume; without it, a snapshot named after the clone
    /// is taken first.
    #[serde(default)]
    pub snapshot: Option<String>,
}

/// A clone request, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneCommand {
    pub name: String,
    pub snapshot: Option<String>,
}

impl TryFrom<CloneRequest> for CloneCommand {
    type Error = VolumeError;

    fn try_from(req: CloneRequest) -> Result<Self, VolumeError> {
        validate_new_name(&req.name)?;
        if let Some(s) = &req.snapshot {
            validate_name("snapshot", s)?;
        }
        Ok(Self {
            name: req.name,
            snapshot: req.snapshot,
        })
    }
}

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::json;
    use socket_http::ApiError;

    use super::*;

    fn create(v: serde_json::Value) -> Result<CreateVolumeCommand, VolumeError> {
        CreateVolumeCommand::try_from(serde_json::from_value::<CreateVolume>(v).expect("shape"))
    }

    fn refused<T: std::fmt::Debug>(r: Result<T, VolumeError>, says: &str) {
        let e = ApiError::from(r.expect_err("refused"));
        assert_eq!(e.status, StatusCode::UNPROCESSABLE_ENTITY);
        assert!(e.body.message.contains(says), "{:?} lacks {says:?}", e.body.message);
    }

    #[test]
    fn a_new_volume_has_exactly_one_origin() {
        assert_eq!(
            create(json!({"name": "data", "size": "10G"})).expect("valid").origin,
            Origin::Empty { size_bytes: 10 << 30 }
        );
        assert_eq!(
            create(json!({"name": "copy", "source": {"snapshot": "data@monday"}, "size_bytes": 1 << 30}))
                .expect("valid")
                .origin,
            Origin::Snapshot {
                volume: "data".into(),
                snapshot: "monday".into(),
                size_bytes: Some(1 << 30)
            }
        );
        let remote =
            create(json!({"name": "far", "remote": {"tcp": "10.0.0.2:10809", "export": "data"}})).expect("valid");
        assert_eq!(remote.remote().map(|r| r.export.as_str()), Some("data"));
        refused(create(json!({"name": "data"})), "give size_bytes or size");
        refused(
            create(json!({"name": "data", "size": "10G", "size_bytes": 1})),
            "not both",
        );
        refused(create(json!({"name": "data", "size": "10Q"})), "K, M, G or T");
        refused(
            create(json!({"name": "copy", "source": {"snapshot": "data"}})),
            "write volume@snapshot",
        );
        refused(
            create(json!({"name": "copy", "source": {"snapshot": "data@Mon day"}})),
            "invalid snapshot name",
        );
        refused(
            create(json!({"name": "far", "size": "1G", "remote": {"tcp": "h:1", "export": "x"}})),
            "no size or source",
        );
        refused(
            create(json!({"name": "far", "remote": {"tcp": "h:1", "unix": "/s", "export": "x"}})),
            "exactly one of tcp",
        );
        refused(
            create(json!({"name": "far", "remote": {"unix": "s.sock", "export": "x"}})),
            "must be absolute",
        );
        refused(
            create(json!({"name": "far", "remote": {"tcp": "h:1", "export": ""}})),
            "remote.export",
        );
        refused(create(json!({"name": "Data", "size": "1G"})), "invalid volume name");
    }

    #[test]
    fn host_names_fit_blockd_and_other_requests_are_checked() {
        let c = create(json!({"name": "a".repeat(40), "size": "1M"})).expect("valid");
        assert_eq!(c.host_name_in("default").expect("fits"), "a".repeat(40));
        refused(c.host_name_in(&"p".repeat(24)), "at most 62 characters");
        refused(
            ResizeCommand::try_from(SizeRequest::default()),
            "give size_bytes or size",
        );
        assert_eq!(
            ResizeCommand::try_from(SizeRequest {
                size: Some("48M".into()),
                size_bytes: None
            })
            .expect("valid")
            .size_bytes,
            48 << 20
        );
        refused(
            SnapshotCommand::try_from(NameRequest { name: "a/b".into() }),
            "invalid snapshot name",
        );
        refused(
            CloneCommand::try_from(CloneRequest {
                name: "ok".into(),
                snapshot: Some("A".into()),
            }),
            "invalid snapshot name",
        );
        assert_eq!(parse_size(" 2 k").expect("valid"), 2048);
        refused(parse_size("99999999999T"), "powers of 1024");
    }
}
