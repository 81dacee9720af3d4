//! `/etc/hearth/hearth.toml`: one section per program (`[api]`, `[vmm-manager]`,
//! `[netd]`, `[blockd]`, `[imaged]`) holding its command-line options by their long
//! names (`state_dir` or `state-dir` for `--state-dir`). The file is read when the
//! program is started with `--config PATH` (or `HEARTH_CONFIG=PATH`); its options come
//! first on the command line, so options given on the real command line win (the
//! programs let a later option override an earlier one).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Why the configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, std::io::Error),
    #[error("{0} is not valid TOML: {1}")]
    Parse(PathBuf, String),
    #[error("{path}: [{section}] {key}: {why}")]
    Value {
        path: PathBuf,
        section: String,
        key: String,
        why: String,
    },
}

/// The options in `[section]` of the TOML text, as command-line arguments.
pub fn section_args(text: &str, path: &Path, section: &str) -> Result<Vec<OsString>, ConfigError> {
    let doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigError::Parse(path.to_path_buf(), e.to_string()))?;
    let Some(table) = doc.get(section) else {
        return Ok(Vec::new());
    };
    let bad = |key: &str, why: &str| ConfigError::Value {
        path: path.to_path_buf(),
        section: section.to_string(),
        key: key.to_string(),
        why: why.to_string(),
    };
    let table = table.as_table().ok_or_else(|| bad("", "must be a table"))?;
    let mut args = Vec::new();
    for (key, value) in table {
        let flag = format!("--{}", key.replace('_', "-"));
        let scalar = |v: &toml::Value| -> Result<String, ConfigError> {
            match v {
                toml::Value::String(s) => Ok(s.clone()),
                toml::Value::Integer(i) => Ok(i.to_string()),
                toml::Value::Float(f) => Ok(f.to_string()),
                _ => Err(bad(key, "must be a string, a number, true/false or a list of them")),
            }
        };
        match value {
            toml::Value::Boolean(true) => args.push(flag.into()),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(items) => {
                for item in items {
                    args.push(flag.clone().into());
                    args.push(scalar(item)?.into());
                }
            }
            other => {
                args.push(flag.into());
                args.push(scalar(other)?.into());
            }
        }
    }
    Ok(args)
}

/// This process's arguments with the options of `[section]` of the configuration
/// file put in front (after the program name). `--config PATH` is taken out.
pub fn args_with_config(section: &str) -> Result<Vec<OsString>, ConfigError> {
    let mut argv: Vec<OsString> = std::env::args_os().collect();
    let mut path = std::env::var_os("HEARTH_CONFIG").map(PathBuf::from);
    let mut i = 1;
    while i < argv.len() {
        let a = argv[i].to_string_lossy().into_owned();
        if a == "--config" && i + 1 < argv.len() {
            path = Some(PathBuf::from(argv.remove(i + 1)));
            argv.remove(i);
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(PathBuf::from(p));
            argv.remove(i);
        } else {
            i += 1;
        }
    }
    let Some(path) = path else { return Ok(argv) };
    let text = std::fs::read_to_string(&path).map_err(|e| ConfigError::Read(path.clone(), e))?;
    let extra = section_args(&text, &path, section)?;
    let mut out = Vec::with_capacity(argv.len() + extra.len());
    out.extend(argv.first().cloned());
    out.extend(extra);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_section_becomes_long_options() {
        let text = r#"
[blockd]
pool = "lvm:vg0/thin"
nbd_allow = ["10.0.0.0/8", "192.168.1.0/24"]
stop-timeout = 30
verbose = true
quiet = false

[netd]
state_dir = "/x"
"#;
        let args: Vec<String> = section_args(text, Path::new("t.toml"), "blockd")
            .expect("args")
            .into_iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "--nbd-allow",
                "10.0.0.0/8",
                "--nbd-allow",
                "192.168.1.0/24",
                "--pool",
                "lvm:vg0/thin",
                "--stop-timeout",
                "30",
                "--verbose"
            ]
        );
        assert!(section_args(text, Path::new("t.toml"), "imaged")
            .expect("none")
            .is_empty());
        assert!(matches!(
            section_args("[blockd]\npool = {a = 1}\n", Path::new("t.toml"), "blockd"),
            Err(ConfigError::Value { .. })
        ));
        assert!(matches!(
            section_args("[blockd\n", Path::new("t.toml"), "blockd"),
            Err(ConfigError::Parse(..))
        ));
    }
}
