//! The vault's use of the shared policy format (`recvault_runtime::policy`).
//! Roles it honours: `manager` (credential metadata, never plaintext),
//! `uploader` (lease plaintext, unwrap backup data keys), `auditor` (audit
//! log), `admin` (keys and tenant limits). `recorder` grants nothing here.

pub use recvault_runtime::policy::{Grant, Need, Policy, PolicyFile, Role, TenantScope};

/// The policy the dev runner and `vaultd init` write: one identity per role,
/// plus `manager-demo`, a manager scoped to the tenant `demo` only.
pub fn dev_default_toml() -> String {
    Policy::dev_toml(
        "# recvault vault policy: which client-certificate identity holds which role.\n\
         # Roles: manager (credential metadata), uploader (lease plaintext),\n\
         # auditor (audit log), admin (keys and tenant limits).\n\
         # `tenants = [\"a\", \"b\"]` scopes a grant; absent means all tenants.\n",
        &[
            ("manager", &[Role::Manager], None),
            ("uploader", &[Role::Uploader], None),
            ("auditor", &[Role::Auditor], None),
            ("admin", &[Role::Admin], None),
            ("manager-demo", &[Role::Manager], Some(&["demo"])),
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_default_parses() {
        let p = Policy::parse(&dev_default_toml()).expect("dev policy");
        assert_eq!(p.grants.len(), 5);
        let demo = recvault_runtime::devcerts::spiffe_id("manager-demo");
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
                tenant: Some("acme")
            }
        ));
    }
}
