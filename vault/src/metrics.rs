//! The vault's Prometheus metrics (served on their own loopback port): calls
//! by operation and code, leases granted and denied, live leases, audit
//! commit latency. Never a credential id or anything derived from a secret.

use std::{sync::Arc, time::Duration};

use recvault_runtime::metrics::{Counter, Gauge, Histogram, Registry};

/// Handles to the vault's metrics.
#[derive(Debug)]
pub struct VaultMetrics {
    pub registry: Arc<Registry>,
    pub leases_granted: Arc<Counter>,
    pub leases_denied: Arc<Counter>,
    pub leases_active: Arc<Gauge>,
    pub audit_append: Arc<Histogram>,
    pub audit_failures: Arc<Counter>,
}

impl VaultMetrics {
    pub fn new() -> Self {
        let r = Arc::new(Registry::default());
        Self {
            leases_granted: r.counter("recvault_vault_leases_total", "AcquireLease calls by outcome.", &[("outcome", "granted")]),
            leases_denied: r.counter("recvault_vault_leases_total", "AcquireLease calls by outcome.", &[("outcome", "denied")]),
            leases_active: r.gauge("recvault_vault_leases_active", "Leases neither released nor expired.", &[]),
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
            registry: r,
        }
    }

    /// Counts one finished call.
    pub fn call(&self, operation: &str, code: &str) {
        let short = operation.rsplit('.').next().unwrap_or(operation);
        self.registry
            .counter(
                "recvault_vault_calls_total",
                "Vault API calls by operation and gRPC code.",
                &[("operation", short), ("code", code)],
            )
            .inc();
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
