//! Live leases, in memory: which credential each lease covers, for whom, until
//! when. A lease is usable until it expires or is released, never after.
//! Holds no secret: plaintext is handed out once, in the AcquireLease reply.

use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::ids::{CredentialId, LeaseId, TenantId};

/// One granted lease.
#[derive(Debug, Clone)]
pub struct Lease {
    pub credential_id: CredentialId,
    pub tenant_id: TenantId,
    /// The identity that acquired it; only it may release it.
    pub holder: String,
    pub expires: Instant,
}

/// Why a lease cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseProblem {
    Unknown,
    Expired,
    NotHolder,
}

/// The table of live leases. Released and expired ones are forgotten, so a
/// lease id cannot be used twice.
#[derive(Debug, Default)]
pub struct Leases {
    live: Mutex<HashMap<LeaseId, Lease>>,
}

impl Leases {
    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<LeaseId, Lease>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a lease unless `max_active` are already live.
    pub fn grant(&self, id: LeaseId, lease: Lease, max_active: usize) -> bool {
        let mut live = self.live();
        if live.len() >= max_active {
            let now = Instant::now();
            live.retain(|_, l| l.expires > now);
            if live.len() >= max_active {
                return false;
            }
        }
        live.insert(id, lease);
        true
    }

    /// Ends a lease held by `holder`; returns it, or why not.
    pub fn release(&self, id: &LeaseId, holder: &str) -> Result<Lease, LeaseProblem> {
        let mut live = self.live();
        let lease = live.get(id).ok_or(LeaseProblem::Unknown)?;
        if lease.holder != holder {
            return Err(LeaseProblem::NotHolder);
        }
        if lease.expires <= Instant::now() {
            live.remove(id);
            return Err(LeaseProblem::Expired);
        }
        live.remove(id).ok_or(LeaseProblem::Unknown)
    }

    /// Drops a lease without checks (the audit write for it failed).
    pub fn revoke(&self, id: &LeaseId) {
        self.live().remove(id);
    }

    /// Forgets expired leases; returns how many.
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut live = self.live();
        let before = live.len();
        live.retain(|_, l| l.expires > now);
        before - live.len()
    }

    pub fn active(&self) -> usize {
        self.live().len()
    }

    /// Sweeps every `interval` until dropped.
    pub fn spawn_sweeper(
        self: &std::sync::Arc<Self>,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = std::sync::Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.sweep();
            }
        })
    }
}
