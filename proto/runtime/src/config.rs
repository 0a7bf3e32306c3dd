//! Reading a service's TOML config file the same way in both services: parse
//! errors name the file and the field, relative paths are taken against the
//! file's directory, and `RECVAULT_*` environment overrides name the variable
//! when they do not parse. What the fields mean stays in each service.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

/// Config loading errors: they name the file or variable and what is wrong.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The TOML is invalid or a field is wrong.
    #[error("config file {path} is invalid: {message}")]
    Parse { path: PathBuf, message: String },
    /// An environment override could not be parsed.
    #[error("environment variable {name} is invalid: {message}")]
    Env { name: &'static str, message: String },
}

/// Reads and parses `path` (unknown fields are refused by the types' serde attributes).
pub fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

/// Makes every relative path in `paths` relative to the config file's directory.
pub fn resolve_relative<'a>(config_file: &Path, paths: impl IntoIterator<Item = &'a mut PathBuf>) {
    let base = config_file.parent().unwrap_or(Path::new("."));
    for p in paths {
        if p.is_relative() {
            *p = base.join(&*p);
        }
    }
}

/// An address override from the environment variable `name`, if set.
/// `example` goes into the error so it says what would be right.
pub fn env_addr(
    get: &impl Fn(&'static str) -> Option<String>,
    name: &'static str,
    example: &str,
) -> Result<Option<SocketAddr>, ConfigError> {
    get(name)
        .map(|v| {
            v.parse().map_err(|e| ConfigError::Env {
                name,
                message: format!("{e}; expected host:port such as {example}"),
            })
        })
        .transpose()
}

/// A replica's name: `configured` when set, else the host name (a pod's
/// name on Kubernetes) cut to the [`check_instance_id`] rules, else
/// `fallback`. Replicas sharing one database are told apart by it (audit
/// chains, leases, job claims and history).
pub fn instance_name(configured: Option<&str>, fallback: &str) -> String {
    if let Some(id) = configured {
        return id.to_owned();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-_.".contains(*c))
        .take(64)
        .collect();
    if host.is_empty() {
        fallback.to_owned()
    } else {
        host
    }
}

/// `instance_id` is 1 to 64 letters, digits, `-`, `_` or `.`.
pub fn check_instance_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance_id {id:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_addr_names_the_variable_and_the_expected_form() {
        let get = |n: &'static str| (n == "X_LISTEN").then(|| "nope".to_owned());
        let err = env_addr(&get, "X_LISTEN", "127.0.0.1:1").expect_err("invalid");
        assert!(err.to_string().contains("X_LISTEN") && err.to_string().contains("127.0.0.1:1"));
        assert_eq!(
            env_addr(&get, "Y_LISTEN", "127.0.0.1:1").expect("unset"),
            None
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut a = PathBuf::from("data/x.db");
        let mut b = PathBuf::from("/abs/y.db");
        resolve_relative(Path::new("/etc/recvault/v.toml"), [&mut a, &mut b]);
        assert_eq!(a, PathBuf::from("/etc/recvault/data/x.db"));
        assert_eq!(b, PathBuf::from("/abs/y.db"));
    }
}
