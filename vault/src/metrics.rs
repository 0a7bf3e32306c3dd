//! The vault's Prometheus metrics (served on their own loopback port): calls
//! by operation and code, leases granted and denied, live leases, backup
//! data-key unwraps granted, denied and refused, audit commit latency. Never a credential id or anything derived from a secret.

use std::{sync::Arc, time::Duration};

use recvault_runtime::metrics::{Counter, Gauge, Histogram, Registry};

const UNWRAPS: &str = "recvault_vault_data_key_unwraps_total";
const UNWRAPS_HELP: &str =
    "UnwrapDataKey calls by outcome (refused: the wrapped key did not open).";

/// Handles to the vault's metrics.
#[derive(Debug)]
pub struct VaultMetrics {
    pub registry: Arc<Registry>,
    pub leases_granted: Arc<Counter>,
    pub leases_denied: Arc<Counter>,
    pub leases_active: Arc<Gauge>,
    pub unwraps_granted: Arc<Counter>,
    pub unwraps_denied: Arc<Counter>,
    /// Wrapped keys that did not open (wrong tenant or recording, altered bytes).
    pub unwraps_refused: Arc<Counter>,
    pub audit_append: Arc<Histogram>,
    pub audit_failures: Arc<Counter>,
    calls: std::sync::RwLock<std::collections::HashMap<(&'static str, &'static str), Arc<Counter>>>,
}

impl VaultMetrics {
    pub fn new() -> Self {
        let r = Arc::new(Registry::default());
        Self {
            leases_granted: r.counter("recvault_vault_leases_total", "AcquireLease calls by outcome.", &[("outcome", "granted")]),
            leases_denied: r.counter("recvault_vault_leases_total", "AcquireLease calls by outcome.", &[("outcome", "denied")]),
            leases_active: r.gauge("recvault_vault_leases_active", "Leases neither released nor expired.", &[]),
            unwraps_granted: r.counter(UNWRAPS, UNWRAPS_HELP, &[("outcome", "granted")]),
            unwraps_denied: r.counter(UNWRAPS, UNWRAPS_HELP, &[("outcome", "denied")]),
            unwraps_refused: r.counter(UNWRAPS, UNWRAPS_HELP, &[("outcome", "refused")]),
            audit_append: r.histogram(
                "recvault_vault_audit_commit_seconds",
                "Time from handing an audit event to the writer until it is durable (group commit).",
                &[],
            ),
            audit_failures: r.counter(
                "recvault_vault_audit_failures_total",
                "Audit writes that failed (the call failed closed with UNAVAILABLE).",
                &[],
            ),
            calls: Default::default(),
            registry: r,
        }
    }

    /// Counts one finished call. Operation and code names are static, so the
    /// counter handle is looked up once per pair rather than rendered per call.
    pub fn call(&self, operation: &'static str, code: &'static str) {
        let key = (operation, code);
        if let Some(counter) = self
            .calls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
        {
            counter.inc();
            return;
        }
        let short = operation.rsplit('.').next().unwrap_or(operation);
        let counter = self.registry.counter(
            "recvault_vault_calls_total",
            "Vault API calls by operation and gRPC code.",
            &[("operation", short), ("code", code)],
        );
        counter.inc();
        self.calls
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, counter);
    }

    pub fn audit_committed(&self, took: Duration) {
        self.audit_append.observe(took);
    }
}

impl Default for VaultMetrics {
    fn default() -> Self {
        Self::new()
    }
}
