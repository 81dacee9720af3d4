//! cloud-init NoCloud seeds: `meta-data`, `user-data` (hearth's settings merged with
//! the user's), `network-config` (version 2, the addresses IPAM gave), written into a
//! small FAT file system labelled `CIDATA` by the `fatfs` library (no mkfs, no mount).
//!
//! The user's `#cloud-config` is read as YAML 1.2 (serde_yaml_ng) and written back,
//! merged, as JSON. Where YAML 1.1 (cloud-init's PyYAML) reads a plain scalar
//! differently, the user's meaning follows YAML 1.2: an unquoted `on`, `yes` or `off`
//! stays a string. Quote or write `true`/`false` to be unambiguous.

use std::io::{Cursor, Write};
use std::net::IpAddr;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::ImageError;

/// What a VM's seed says.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedRequest {
    /// cloud-init runs its once-per-instance modules again when this changes.
    pub instance_id: String,
    pub hostname: String,
    /// OpenSSH public keys for the image's default user.
    #[serde(default)]
    pub ssh_keys: Vec<String>,
    /// The user's own user-data: a `#cloud-config` document (merged with hearth's),
    /// or a script or other cloud-init part (sent alongside as a MIME multipart).
    #[serde(default)]
    pub user_data: Option<String>,
    /// One entry per NIC, in order.
    #[serde(default)]
    pub nics: Vec<SeedNic>,
}

/// A NIC's addressing, from IPAM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedNic {
    pub mac: String,
    pub ip: IpAddr,
    pub prefix: u8,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    #[serde(default)]
    pub dns: Vec<IpAddr>,
}

/// The three NoCloud files.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
}

/// The user-data size cloud-init handles comfortably (and we accept).
pub const MAX_USER_DATA: usize = 256 * 1024;

fn invalid(msg: impl Into<String>) -> ImageError {
    ImageError::Invalid(msg.into())
}

/// A DNS label cloud-init and the guest accept as hostname.
fn check_hostname(h: &str) -> Result<(), ImageError> {
    let ok = !h.is_empty()
        && h.len() <= 63
        && h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !h.starts_with('-')
        && !h.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "hostname {h:?} must be a DNS label (letters, digits, '-')"
        )))
    }
}

fn check_key(k: &str) -> Result<(), ImageError> {
    let mut parts = k.split_whitespace();
    let kind = parts.next().unwrap_or("");
    let body = parts.next().unwrap_or("");
    let known = kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-");
    if !known || body.len() < 16 || k.contains('\n') || k.chars().any(|c| c.is_control()) {
        return Err(invalid(format!(
            "{:?} is not an OpenSSH public key (\"ssh-ed25519 AAAA… comment\")",
            k.chars().take(40).collect::<String>()
        )));
    }
    Ok(())
}

/// The seed's documents are written as JSON, which is YAML too: cloud-init reads them
/// with PyYAML (YAML 1.1), which would take an unquoted MAC address like
/// `52:54:00:12:34:56` for a base-60 number, or `on` for a boolean. JSON quotes every
/// string, so what hearth means is what the guest reads.
fn yaml(v: &Value) -> Result<String, ImageError> {
    serde_json::to_string_pretty(v)
        .map(|mut s| {
            s.push('\n');
            s
        })
        .map_err(|e| ImageError::Corrupt(format!("cannot write the seed: {e}")))
}

/// Builds the seed files. The user's `#cloud-config` wins where it sets something
/// itself (e.g. its own hostname); SSH keys are added to the user's.
pub fn compose(req: &SeedRequest) -> Result<SeedFiles, ImageError> {
    check_hostname(&req.hostname)?;
    if req.instance_id.is_empty() || req.instance_id.len() > 128 || req.instance_id.chars().any(|c| c.is_control()) {
        return Err(invalid("instance_id must be 1-128 printable characters"));
    }
    for k in &req.ssh_keys {
        check_key(k)?;
    }
    let meta_data = yaml(&json!({
        "instance-id": req.instance_id,
        "local-hostname": req.hostname,
    }))?;

    let mut ours = Map::new();
    ours.insert("hostname".into(), json!(req.hostname));
    ours.insert("preserve_hostname".into(), json!(false));
    ours.insert("manage_etc_hosts".into(), json!(true));
    if !req.ssh_keys.is_empty() {
        ours.insert("ssh_authorized_keys".into(), json!(req.ssh_keys));
    }
    let user = req.user_data.as_deref().unwrap_or("");
    if user.len() > MAX_USER_DATA {
        return Err(invalid(format!(
            "user_data is {} bytes; at most {MAX_USER_DATA}",
            user.len()
        )));
    }
    let user_data = if user.trim().is_empty() || user.starts_with("#cloud-config") {
        let theirs: Value = if user.trim().is_empty() {
            Value::Object(Map::new())
        } else {
            serde_yaml_ng::from_str(user).map_err(|e| invalid(format!("user_data is not valid YAML: {e}")))?
        };
        let theirs = match theirs {
            Value::Object(m) => m,
            Value::Null => Map::new(),
            _ => return Err(invalid("user_data #cloud-config must be a mapping (key: value lines)")),
        };
        let mut merged = ours;
        for (k, v) in theirs {
            if k == "ssh_authorized_keys" {
                let mut keys: Vec<Value> = match v {
                    Value::Array(a) => a,
                    Value::String(s) => vec![Value::String(s)],
                    _ => return Err(invalid("ssh_authorized_keys in user_data must be a list")),
                };
                if let Some(Value::Array(ours)) = merged.remove("ssh_authorized_keys") {
                    for k in ours {
                        if !keys.contains(&k) {
                            keys.push(k);
                        }
                    }
                }
                merged.insert(k, Value::Array(keys));
            } else {
                merged.insert(k, v);
            }
        }
        format!("#cloud-config\n{}", yaml(&Value::Object(merged))?)
    } else {
        multipart(&format!("#cloud-config\n{}", yaml(&Value::Object(ours))?), user)?
    };

    let mut ethernets = Map::new();
    for (i, nic) in req.nics.iter().enumerate() {
        let mut e = Map::new();
        e.insert("match".into(), json!({ "macaddress": nic.mac.to_ascii_lowercase() }));
        e.insert("set-name".into(), json!(format!("eth{i}")));
        e.insert("addresses".into(), json!([format!("{}/{}", nic.ip, nic.prefix)]));
        if let Some(gw) = nic.gateway.filter(|_| i == 0) {
            let to = if gw.is_ipv4() { "0.0.0.0/0" } else { "::/0" };
            e.insert("routes".into(), json!([{ "to": to, "via": gw.to_string() }]));
        }
        if !nic.dns.is_empty() {
            let dns: Vec<String> = nic.dns.iter().map(|d| d.to_string()).collect();
            e.insert("nameservers".into(), json!({ "addresses": dns }));
        }
        ethernets.insert(format!("eth{i}"), Value::Object(e));
    }
    let network_config = yaml(&json!({ "version": 2, "ethernets": ethernets }))?;
    Ok(SeedFiles {
        meta_data,
        user_data,
        network_config,
    })
}

/// Ours plus the user's part (a script, an include, a boothook), as cloud-init's
/// MIME multipart.
fn multipart(ours: &str, theirs: &str) -> Result<String, ImageError> {
    let kind = if theirs.starts_with("#!") {
        "text/x-shellscript"
    } else if theirs.starts_with("#include") {
        "text/x-include-url"
    } else if theirs.starts_with("#cloud-boothook") {
        "text/cloud-boothook"
    } else if theirs.starts_with("Content-Type: multipart/") {
        return Err(invalid(
            "user_data is already MIME multipart; give a #cloud-config or a script and hearth adds its part",
        ));
    } else {
        return Err(invalid(
            "user_data must start with #cloud-config, #!, #include or #cloud-boothook",
        ));
    };
    let boundary = format!("hearth-{}", uuid::Uuid::new_v4().simple());
    let mut out = String::new();
    out.push_str(&format!(
        "Content-Type: multipart/mixed; boundary=\"{boundary}\"\nMIME-Version: 1.0\n\n"
    ));
    for (i, (ct, body)) in [("text/cloud-config", ours), (kind, theirs)].into_iter().enumerate() {
        out.push_str(&format!(
            "--{boundary}\nContent-Type: {ct}; charset=\"utf-8\"\nMIME-Version: 1.0\n\
             Content-Transfer-Encoding: 8bit\nContent-Disposition: attachment; filename=\"part-{i}\"\n\n{body}\n"
        ));
    }
    out.push_str(&format!("--{boundary}--\n"));
    Ok(out)
}

/// The seed's FAT image: 1 MiB, or more for large user-data.
pub fn vfat_image(files: &SeedFiles) -> Result<Vec<u8>, ImageError> {
    let content = files.meta_data.len() + files.user_data.len() + files.network_config.len();
    let size = (1usize << 20).max((content * 2 + (256 << 10)).next_power_of_two());
    let mut disk = Cursor::new(vec![0u8; size]);
    let fat = |e: std::io::Error| ImageError::Corrupt(format!("writing the seed's FAT file system: {e}"));
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new()
            .volume_label(*b"CIDATA     ")
            .volume_id(0x4845_4152),
    )
    .map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(fat)?;
        for (name, body) in [
            ("meta-data", &files.meta_data),
            ("user-data", &files.user_data),
            ("network-config", &files.network_config),
        ] {
            let mut f = fs.root_dir().create_file(name).map_err(fat)?;
            f.truncate().map_err(fat)?;
            f.write_all(body.as_bytes()).map_err(fat)?;
            f.flush().map_err(fat)?;
        }
        fs.unmount().map_err(fat)?;
    }
    Ok(disk.into_inner())
}

/// Writes the seed image to `path` (by temporary name and rename).
pub fn write_seed(files: &SeedFiles, path: &Path) -> Result<(), ImageError> {
    let bytes = vfat_image(files)?;
    crate::store::write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const KEY: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl test@hearth";

    fn req(user_data: Option<&str>) -> SeedRequest {
        SeedRequest {
            instance_id: "i-1".into(),
            hostname: "web-1".into(),
            ssh_keys: vec![KEY.into()],
            user_data: user_data.map(str::to_string),
            nics: vec![SeedNic {
                mac: "52:54:00:AB:CD:EF".into(),
                ip: "10.1.0.5".parse().expect("ip"),
                prefix: 24,
                gateway: Some("10.1.0.1".parse().expect("ip")),
                dns: vec!["10.1.0.1".parse().expect("ip")],
            }],
        }
    }

    fn parse_cloud_config(s: &str) -> Value {
        let body = s.strip_prefix("#cloud-config\n").expect("header");
        serde_yaml_ng::from_str(body).expect("yaml")
    }

    #[test]
    fn users_cloud_config_is_merged_with_ours() {
        let user = "#cloud-config\nwrite_files:\n  - path: /etc/hello\n    content: hi\nssh_authorized_keys:\n  - ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQ mine\n";
        let files = compose(&req(Some(user))).expect("compose");
        let v = parse_cloud_config(&files.user_data);
        assert_eq!(v["hostname"], "web-1");
        assert_eq!(v["write_files"][0]["path"], "/etc/hello");
        let keys = v["ssh_authorized_keys"].as_array().expect("keys");
        assert_eq!(keys.len(), 2, "the user's key and ours: {keys:?}");
        // The user's own hostname wins.
        let files = compose(&req(Some("#cloud-config\nhostname: theirs\n"))).expect("compose");
        assert_eq!(parse_cloud_config(&files.user_data)["hostname"], "theirs");
        let meta: Value = serde_yaml_ng::from_str(&files.meta_data).expect("yaml");
        assert_eq!(meta["instance-id"], "i-1");
        assert_eq!(meta["local-hostname"], "web-1");
    }

    #[test]
    fn network_config_has_the_ipam_address() {
        let files = compose(&req(None)).expect("compose");
        let v: Value = serde_yaml_ng::from_str(&files.network_config).expect("yaml");
        assert_eq!(v["version"], 2);
        let eth0 = &v["ethernets"]["eth0"];
        assert_eq!(eth0["match"]["macaddress"], "52:54:00:ab:cd:ef");
        assert_eq!(eth0["addresses"][0], "10.1.0.5/24");
        assert_eq!(eth0["routes"][0]["via"], "10.1.0.1");
        assert_eq!(eth0["nameservers"]["addresses"][0], "10.1.0.1");
    }

    #[test]
    fn scripts_travel_as_multipart_and_bad_input_is_refused() {
        let files = compose(&req(Some("#!/bin/sh\necho hi > /tmp/x\n"))).expect("compose");
        assert!(files.user_data.starts_with("Content-Type: multipart/mixed"));
        assert!(files.user_data.contains("text/x-shellscript"));
        assert!(files.user_data.contains("text/cloud-config"));
        for bad in ["#cloud-config\n[1, 2", "#cloud-config\n- a\n- b\n", "plain text"] {
            assert!(
                matches!(compose(&req(Some(bad))), Err(ImageError::Invalid(_))),
                "{bad:?}"
            );
        }
        let mut r = req(None);
        r.ssh_keys = vec!["not a key".into()];
        assert!(compose(&r).is_err());
        let mut r = req(None);
        r.hostname = "bad_name!".into();
        assert!(compose(&r).is_err());
    }

    #[test]
    fn the_seed_is_a_fat_file_system_labelled_cidata() {
        let files = compose(&req(Some("#cloud-config\nruncmd: [[touch, /x]]\n"))).expect("compose");
        let image = vfat_image(&files).expect("image");
        let mut cur = Cursor::new(image);
        let fs = fatfs::FileSystem::new(&mut cur, fatfs::FsOptions::new()).expect("fat");
        assert_eq!(fs.volume_label().trim(), "CIDATA");
        for (name, want) in [
            ("meta-data", &files.meta_data),
            ("user-data", &files.user_data),
            ("network-config", &files.network_config),
        ] {
            let mut s = String::new();
            fs.root_dir()
                .open_file(name)
                .expect("file")
                .read_to_string(&mut s)
                .expect("read");
            assert_eq!(&s, want, "{name}");
        }
    }
}
