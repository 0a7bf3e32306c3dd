//! Live leases in this process's memory, the lease store of a vault on
//! SQLite (one vault, one process): which credential each lease covers, for
//! whom, until when. A lease is usable until it expires or is released, never after.
//! Holds no secret: plaintext is handed out once, in the AcquireLease reply.
//!
//! The table is split into shards by lease id, each with its own lock and its
//! own index by expiry, so calls on different leases rarely wait for each
//! other and the sweeper removes only what has expired: no lock is ever held
//! while walking every live lease, however many there are.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher, RandomState},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    ids::LeaseId,
    store::{LeaseStore, NewLease, StoreError},
};

/// Shards of the table (a power of two is not needed; a few per core is plenty).
const SHARDS: usize = 16;

/// One granted lease: what it is for, and until when.
#[derive(Debug, Clone)]
struct Lease {
    granted: NewLease,
    expires: Instant,
}

/// Why a lease cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseProblem {
    Unknown,
    Expired,
    NotHolder,
}

#[derive(Debug, Default)]
struct Shard {
    live: HashMap<LeaseId, Lease>,
    by_expiry: BTreeSet<(Instant, LeaseId)>,
}

impl Shard {
    fn remove(&mut self, id: &LeaseId) -> Option<Lease> {
        let lease = self.live.remove(id)?;
        self.by_expiry.remove(&(lease.expires, id.clone()));
        Some(lease)
    }

    /// Removes the leases expired at `now`; returns how many.
    fn sweep(&mut self, now: Instant) -> usize {
        let mut removed = 0;
        while let Some(first) = self.by_expiry.first() {
            if first.0 > now {
                break;
            }
            if let Some((_, id)) = self.by_expiry.pop_first() {
                self.live.remove(&id);
                removed += 1;
            }
        }
        removed
    }
}

/// The table of live leases. Released and expired ones are forgotten, so a
/// lease id cannot be used twice.
#[derive(Debug)]
pub struct Leases {
    shards: Box<[Mutex<Shard>]>,
    hasher: RandomState,
    /// Live leases in all shards (expired ones count until swept).
    active: AtomicUsize,
}

impl Default for Leases {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
            active: AtomicUsize::new(0),
        }
    }
}

impl Leases {
    fn shard(&self, id: &LeaseId) -> MutexGuard<'_, Shard> {
        let index = usize::try_from(self.hasher.hash_one(id) % SHARDS as u64).unwrap_or(0);
        self.shards[index].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a lease unless `max_active` are already live.
    fn grant_lease(&self, id: LeaseId, lease: Lease, max_active: usize) -> bool {
        if self.active.fetch_add(1, Ordering::AcqRel) >= max_active {
            self.active.fetch_sub(1, Ordering::AcqRel);
            // Expired leases may still be counted: forget them, then look again.
            self.sweep_expired();
            if self.active.fetch_add(1, Ordering::AcqRel) >= max_active {
                self.active.fetch_sub(1, Ordering::AcqRel);
                return false;
            }
        }
        let mut shard = self.shard(&id);
        shard.by_expiry.insert((lease.expires, id.clone()));
        if let Some(old) = shard.live.insert(id.clone(), lease) {
            // Ids are random; a repeat replaces the old entry, counted once.
            shard.by_expiry.remove(&(old.expires, id));
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
        true
    }

    /// Ends a lease held by `holder`; returns it, or why not.
    fn release_lease(&self, id: &LeaseId, holder: &str) -> Result<Lease, LeaseProblem> {
        let mut shard = self.shard(id);
        let lease = shard.live.get(id).ok_or(LeaseProblem::Unknown)?;
        if lease.granted.holder != holder {
            return Err(LeaseProblem::NotHolder);
        }
        let expired = lease.expires <= Instant::now();
        let lease = shard.remove(id).ok_or(LeaseProblem::Unknown)?;
        self.active.fetch_sub(1, Ordering::AcqRel);
        if expired {
            return Err(LeaseProblem::Expired);
        }
        Ok(lease)
    }

    /// Drops a lease without checks (the audit write for it failed).
    fn revoke_lease(&self, id: &LeaseId) {
        if self.shard(id).remove(id).is_some() {
            self.active.fetch_sub(1, Ordering::AcqRel);
        }
    }

    /// Forgets expired leases; returns how many. Each shard is locked only
    /// while its expired leases are removed.
    fn sweep_expired(&self) -> usize {
        let now = Instant::now();
        let mut removed = 0;
        for shard in &*self.shards {
            let n = shard.lock().unwrap_or_else(|p| p.into_inner()).sweep(now);
            self.active.fetch_sub(n, Ordering::AcqRel);
            removed += n;
        }
        removed
    }

    /// Leases granted and neither released, revoked nor swept.
    fn active_now(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }
}

impl LeaseStore for Leases {
    fn blocks(&self) -> bool {
        false
    }

    fn grant(
        &self,
        id: &LeaseId,
        lease: &NewLease,
        ttl: Duration,
        max_active: usize,
    ) -> Result<bool, StoreError> {
        let lease = Lease {
            granted: lease.clone(),
            expires: Instant::now() + ttl,
        };
        Ok(self.grant_lease(id.clone(), lease, max_active))
    }

    fn release(
        &self,
        id: &LeaseId,
        holder: &str,
    ) -> Result<Result<NewLease, LeaseProblem>, StoreError> {
        Ok(self.release_lease(id, holder).map(|l| l.granted))
    }

    fn revoke(&self, id: &LeaseId) -> Result<(), StoreError> {
        self.revoke_lease(id);
        Ok(())
    }

    fn sweep(&self) -> Result<usize, StoreError> {
        Ok(self.sweep_expired())
    }

    fn active(&self) -> Result<usize, StoreError> {
        Ok(self.active_now())
    }
}

/// Sweeps `leases` every `interval` until dropped, and reports how many are
/// active to `report` after each sweep.
pub fn spawn_sweeper(
    leases: &std::sync::Arc<dyn LeaseStore>,
    interval: Duration,
    report: impl Fn(usize) + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    let this = std::sync::Arc::downgrade(leases);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        loop {
            tick.tick().await;
            let Some(this) = this.upgrade() else { return };
            let swept = tokio::task::spawn_blocking(move || {
                this.sweep()?;
                this.active()
            })
            .await;
            match swept {
                Ok(Ok(active)) => report(active),
                Ok(Err(error)) => tracing::warn!(%error, "sweeping expired leases failed"),
                Err(error) => tracing::warn!(%error, "the lease sweeper task failed"),
            }
        }
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::ids::{CredentialId, TenantId};

    fn lease(holder: &str, ttl: Duration) -> Lease {
        Lease {
            granted: NewLease {
                credential_id: CredentialId::generate(),
                tenant_id: TenantId::parse("acme").unwrap(),
                holder: holder.into(),
            },
            expires: Instant::now() + ttl,
        }
    }

    #[test]
    fn grant_release_revoke_and_the_cap() {
        let leases = Leases::default();
        let hour = Duration::from_secs(3600);
        let ids: Vec<LeaseId> = (0..40).map(|_| LeaseId::generate()).collect();
        for id in &ids {
            assert!(leases.grant_lease(id.clone(), lease("u", hour), 40));
        }
        assert_eq!(leases.active_now(), 40);
        // The cap holds across every shard.
        assert!(!leases.grant_lease(LeaseId::generate(), lease("u", hour), 40));
        assert_eq!(leases.active_now(), 40);

        assert_eq!(
            leases.release_lease(&ids[0], "someone-else").unwrap_err(),
            LeaseProblem::NotHolder
        );
        leases.release_lease(&ids[0], "u").unwrap();
        assert_eq!(
            leases.release_lease(&ids[0], "u").unwrap_err(),
            LeaseProblem::Unknown
        );
        leases.revoke_lease(&ids[1]);
        leases.revoke_lease(&ids[1]);
        assert_eq!(leases.active_now(), 38);
        assert!(leases.grant_lease(LeaseId::generate(), lease("u", hour), 40));
        assert_eq!(leases.active_now(), 39);
    }

    #[test]
    fn expired_leases_are_swept_and_make_room_under_the_cap() {
        let leases = Leases::default();
        let short: Vec<LeaseId> = (0..10).map(|_| LeaseId::generate()).collect();
        for id in &short {
            assert!(leases.grant_lease(id.clone(), lease("u", Duration::ZERO), 10));
        }
        let kept = LeaseId::generate();
        // Full, but every counted lease has expired: granting sweeps them.
        assert!(leases.grant_lease(kept.clone(), lease("u", Duration::from_secs(60)), 10));
        assert_eq!(leases.active_now(), 1);
        assert_eq!(
            leases.release_lease(&short[3], "u").unwrap_err(),
            LeaseProblem::Unknown
        );
        assert_eq!(leases.sweep_expired(), 0);
        leases.release_lease(&kept, "u").unwrap();
        assert_eq!(leases.active_now(), 0);
    }

    #[test]
    fn an_expired_lease_is_refused_once_then_forgotten() {
        let leases = Leases::default();
        let id = LeaseId::generate();
        assert!(leases.grant_lease(id.clone(), lease("u", Duration::ZERO), 10));
        assert_eq!(
            leases.release_lease(&id, "u").unwrap_err(),
            LeaseProblem::Expired
        );
        assert_eq!(
            leases.release_lease(&id, "u").unwrap_err(),
            LeaseProblem::Unknown
        );
        assert_eq!(leases.active_now(), 0);
    }
}
