//! Who may do what: a TOML policy file maps peer identities to roles,
//! optionally scoped to tenants. An identity with no grant may do nothing.
//! This module decides; it does not audit (the service layer does).

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize;

/// A role grants a fixed set of RPCs (DESIGN.md "Identity and authorization").
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Put/list/get/delete credential metadata; never plaintext.
    Manager,
    /// Lease plaintext.
    Uploader,
    /// Read and verify the audit log.
    Auditor,
    /// Key rotation, rewrap, tenant limits.
    Admin,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Uploader => "uploader",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
        })
    }
}

/// One `[[grant]]` of the policy file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Exact identity: URI SAN (`spiffe://recvault.local/uploader`) or DNS SAN.
    pub identity: String,
    pub roles: BTreeSet<Role>,
    /// Tenants this grant covers; absent or `["*"]` means all tenants.
    #[serde(default)]
    pub tenants: Option<BTreeSet<String>>,
}

/// The parsed policy file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default, rename = "grant")]
    pub grants: Vec<Grant>,
}

/// What a request needs: a role, and for tenant-scoped calls, the tenant.
#[derive(Debug, Clone, Copy)]
pub struct Need<'a> {
    pub role: Role,
    pub tenant: Option<&'a str>,
}

impl Policy {
    /// Parses policy TOML.
    pub fn parse(text: &str) -> Result<Self, String> {
        let policy: Policy = toml::from_str(text).map_err(|e| e.to_string())?;
        for g in &policy.grants {
            if g.identity.trim().is_empty() {
                return Err("a [[grant]] has an empty identity".into());
            }
            if g.roles.is_empty() {
                return Err(format!("grant for {} lists no roles", g.identity));
            }
        }
        Ok(policy)
    }

    /// Whether `identity` holds `need.role` (for `need.tenant`, when given).
    pub fn allows(&self, identity: &str, need: Need<'_>) -> bool {
        self.grants.iter().any(|g| {
            g.identity == identity
                && g.roles.contains(&need.role)
                && match (&g.tenants, need.tenant) {
                    (None, _) => true,
                    (Some(t), _) if t.contains("*") => true,
                    (Some(t), Some(tenant)) => t.contains(tenant),
                    // A tenant-scoped grant does not cover calls that span tenants.
                    (Some(_), None) => false,
                }
        })
    }

    /// The roles `identity` holds anywhere (for error messages).
    pub fn roles_of(&self, identity: &str) -> BTreeSet<Role> {
        self.grants
            .iter()
            .filter(|g| g.identity == identity)
            .flat_map(|g| g.roles.iter().copied())
            .collect()
    }

    /// The policy the dev runner and `vaultd init` write: one identity per role.
    pub fn dev_default_toml() -> String {
        let mut out = String::from(
            "# recvault vault policy: which client-certificate identity holds which role.\n\
             # Roles: manager (credential metadata), uploader (lease plaintext),\n\
             # auditor (audit log), admin (keys and tenant limits).\n\
             # `tenants = [\"a\", \"b\"]` scopes a grant; absent means all tenants.\n",
        );
        for role in ["manager", "uploader", "auditor", "admin"] {
            let id = recvault_runtime::devcerts::spiffe_id(role);
            out.push_str(&format!(
                "\n[[grant]]\nidentity = \"{id}\"\nroles = [\"{role}\"]\n"
            ));
        }
        out
    }
}

/// The policy file, re-read when it changes. A broken edit keeps the previous
/// policy in force and logs why.
#[derive(Debug)]
pub struct PolicyFile {
    path: PathBuf,
    state: RwLock<(Arc<Policy>, Option<SystemTime>)>,
}

impl PolicyFile {
    /// Loads the file; refuses to start on a missing or invalid policy.
    pub fn load(path: &Path) -> Result<Arc<Self>, String> {
        let (policy, mtime) = read(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            state: RwLock::new((Arc::new(policy), mtime)),
        }))
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<Policy> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Re-reads the file if its modification time changed.
    pub fn reload_if_changed(&self) {
        let mtime = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if self.state.read().unwrap_or_else(|p| p.into_inner()).1 == mtime {
            return;
        }
        match read(&self.path) {
            Ok((policy, mtime)) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(policy), mtime);
                tracing::info!(path = %self.path.display(), "policy reloaded");
            }
            Err(error) => {
                tracing::warn!(%error, "policy file changed but is invalid; keeping the previous policy")
            }
        }
    }

    /// Polls the file every `interval` while `self` is alive.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.reload_if_changed();
            }
        })
    }
}

fn read(path: &Path) -> Result<(Policy, Option<SystemTime>), String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read policy file {}: {e}", path.display()))?;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let policy = Policy::parse(&text)
        .map_err(|e| format!("policy file {} is invalid: {e}", path.display()))?;
    Ok((policy, mtime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_are_exact_and_tenant_scoped() {
        let p = Policy::parse(
            r#"
            [[grant]]
            identity = "spiffe://recvault.local/uploader"
            roles = ["uploader"]
            [[grant]]
            identity = "spiffe://recvault.local/manager"
            roles = ["manager"]
            tenants = ["acme"]
            "#,
        )
        .expect("valid policy");
        let up = "spiffe://recvault.local/uploader";
        let mgr = "spiffe://recvault.local/manager";
        assert!(p.allows(
            up,
            Need {
                role: Role::Uploader,
                tenant: Some("x")
            }
        ));
        assert!(!p.allows(
            up,
            Need {
                role: Role::Manager,
                tenant: Some("x")
            }
        ));
        assert!(p.allows(
            mgr,
            Need {
                role: Role::Manager,
                tenant: Some("acme")
            }
        ));
        assert!(!p.allows(
            mgr,
            Need {
                role: Role::Manager,
                tenant: Some("other")
            }
        ));
        assert!(!p.allows(
            mgr,
            Need {
                role: Role::Manager,
                tenant: None
            }
        ));
        assert!(!p.allows(
            "spiffe://recvault.local/uploader/x",
            Need {
                role: Role::Uploader,
                tenant: None
            }
        ));
    }

    #[test]
    fn invalid_policy_is_refused() {
        assert!(Policy::parse("[[grant]]\nidentity = \"x\"\nroles = [\"root\"]\n").is_err());
        assert!(Policy::parse("[[grant]]\nidentity = \"\"\nroles = [\"admin\"]\n").is_err());
        assert!(Policy::parse("[[grant]]\nidentity = \"x\"\nroles = []\n").is_err());
    }

    #[test]
    fn dev_default_parses() {
        let p = Policy::parse(&Policy::dev_default_toml()).expect("dev policy");
        assert_eq!(p.grants.len(), 4);
    }
}
