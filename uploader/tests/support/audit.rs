//! The audit settings every test config of the uploader needs: a fresh
//! audit key file (32 random bytes, mode 0600) and the audit database,
//! both in the test's own directory.

use std::path::Path;

/// Top-level TOML lines (`audit_database`, `audit_key_file`) for `dir`,
/// creating the key file on first use.
pub fn audit_settings(dir: &Path) -> String {
    let key = dir.join("audit.key");
    if !key.exists() {
        recvault_audit::AuditKey::generate_file(&key).expect("audit key file");
    }
    format!(
        "audit_database = \"{}\"\naudit_key_file = \"{}\"\n",
        dir.join("audit.db").display(),
        key.display()
    )
}
