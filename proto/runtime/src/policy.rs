//! Who may do what, for both services: a TOML policy file maps peer
//! identities to roles, optionally scoped to tenants. An identity with no
//! grant may do nothing. This module decides; it does not audit (each
//! service's handlers do). Each service reads its own policy file in this one
//! format and documents which roles it honours.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use serde::Deserialize;

/// A role grants a fixed set of RPCs of the service whose policy names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Vault: put/list/get/delete credential metadata, never plaintext.
    /// Uploader: destinations, jobs and backups of its tenants.
    Manager,
    /// Vault: lease plaintext credentials, unwrap backup data keys.
    Uploader,
    /// Both: read and verify the service's audit log.
    Auditor,
    /// Vault: key rotation, rewrap, tenant limits.
    Admin,
    /// Uploader: ingest recordings for its tenants.
    Recorder,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Manager => "manager",
            Role::Uploader => "uploader",
            Role::Auditor => "auditor",
            Role::Admin => "admin",
            Role::Recorder => "recorder",
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

    /// The tenants for which `identity` holds `role`.
    pub fn scope(&self, identity: &str, role: Role) -> TenantScope {
        let mut tenants = BTreeSet::new();
        for g in self
            .grants
            .iter()
            .filter(|g| g.identity == identity && g.roles.contains(&role))
        {
            match &g.tenants {
                None => return TenantScope::All,
                Some(t) if t.contains("*") => return TenantScope::All,
                Some(t) => tenants.extend(t.iter().cloned()),
            }
        }
        TenantScope::Only(tenants)
    }

    /// The roles `identity` holds anywhere (for error messages).
    pub fn roles_of(&self, identity: &str) -> BTreeSet<Role> {
        self.grants
            .iter()
            .filter(|g| g.identity == identity)
            .flat_map(|g| g.roles.iter().copied())
            .collect()
    }

    /// Renders a policy file for dev identities: `header` (comment lines,
    /// each already starting with `#`), then one `[[grant]]` per entry:
    /// the dev identity `spiffe://recvault.local/<name>`, its roles, and its
    /// tenants (`None`: all tenants).
    pub fn dev_toml(header: &str, grants: &[DevGrant<'_>]) -> String {
        let mut out = String::from(header);
        for (name, roles, tenants) in grants {
            let id = crate::devcerts::spiffe_id(name);
            let list = |items: Vec<String>| {
                items
                    .iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            out.push_str(&format!(
                "\n[[grant]]\nidentity = \"{id}\"\nroles = [{}]\n",
                list(roles.iter().map(Role::to_string).collect())
            ));
            if let Some(tenants) = tenants {
                out.push_str(&format!(
                    "tenants = [{}]\n",
                    list(tenants.iter().map(|t| (*t).to_owned()).collect())
                ));
            }
        }
        out
    }
}

/// The uploader policy the dev runner and the tests write (the uploader and
/// the dev runner do not link each other, so it lives here): `recorder`,
/// `manager` and `auditor` for every tenant, and `manager-demo`, a manager of
/// the tenant `demo` only.
pub fn dev_uploader_toml() -> String {
    Policy::dev_toml(
        "# recvault uploader policy (written by `recvault dev`): which client-certificate\n\
         # identity holds which uploader role, for which tenants. Same format as the\n\
         # vault's; see deploy/config/uploader-policy.example.toml.\n",
        &[
            ("recorder", &[Role::Recorder], None),
            ("manager", &[Role::Manager], None),
            ("auditor", &[Role::Auditor], None),
            ("manager-demo", &[Role::Manager], Some(&["demo"])),
        ],
    )
}

/// One grant of [`Policy::dev_toml`]: the dev identity's name, its roles, and
/// its tenants (`None`: all tenants).
pub type DevGrant<'a> = (&'a str, &'a [Role], Option<&'a [&'a str]>);

/// The tenants a grant covers for one role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// Every tenant (no `tenants`, or `["*"]`).
    All,
    /// Only these (empty: the identity does not hold the role at all).
    Only(BTreeSet<String>),
}

impl TenantScope {
    /// Whether `tenant` is covered.
    pub fn covers(&self, tenant: &str) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(t) => t.contains(tenant),
        }
    }

    /// Whether the role is held for no tenant at all.
    pub fn is_empty(&self) -> bool {
        matches!(self, TenantScope::Only(t) if t.is_empty())
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
    fn scope_unions_grants_and_all_wins() {
        let p = Policy::parse(
            r#"
            [[grant]]
            identity = "m"
            roles = ["manager"]
            tenants = ["a"]
            [[grant]]
            identity = "m"
            roles = ["manager", "recorder"]
            tenants = ["b"]
            [[grant]]
            identity = "all"
            roles = ["manager"]
            tenants = ["*"]
            "#,
        )
        .expect("valid policy");
        let only = |t: &[&str]| TenantScope::Only(t.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(p.scope("m", Role::Manager), only(&["a", "b"]));
        assert_eq!(p.scope("m", Role::Recorder), only(&["b"]));
        assert!(p.scope("m", Role::Auditor).is_empty());
        assert_eq!(p.scope("all", Role::Manager), TenantScope::All);
        assert!(!p.scope("m", Role::Manager).covers("c"));
        assert!(p.scope("all", Role::Manager).covers("c"));
    }

    #[test]
    fn dev_toml_parses_with_scopes() {
        let text = Policy::dev_toml(
            "# test\n",
            &[
                ("manager", &[Role::Manager, Role::Auditor], None),
                ("manager-demo", &[Role::Manager], Some(&["demo"])),
            ],
        );
        let p = Policy::parse(&text).expect("dev policy");
        assert_eq!(p.grants.len(), 2);
        let demo = crate::devcerts::spiffe_id("manager-demo");
        assert!(p.allows(
            &demo,
            Need {
                role: Role::Manager,
                tenant: Some("demo")
            }
        ));
        assert!(!p.allows(
            &demo,
            Need {
                role: Role::Manager,
                tenant: Some("other")
            }
        ));
    }
}
