//! The writer thread: owns the backend's write side, assigns sequence
//! numbers and hashes in commit order, and commits queued appends in groups.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, AtomicU64, Ordering},
    mpsc,
};

use tokio::sync::{broadcast, oneshot};

use super::{
    AuditError, AuditEvent, AuditKey, AuditRecord, GroupCommitOptions,
    store::{Head, WriteBackend},
};

/// One queued append.
pub(crate) struct Pending {
    pub record: AuditRecord,
    pub time_unix_nanos: i64,
    pub reply: oneshot::Sender<Result<AuditEvent, AuditError>>,
}

/// What the writer, the follower and the [`AuditLog`](super::AuditLog)
/// handle share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// The last head this process committed.
    pub head: Mutex<Head>,
    /// The newest sequence known committed by anyone (a shared log's
    /// follower raises it for the other replicas' events).
    pub newest: AtomicU64,
    pub fail_writes: AtomicBool,
    pub events: AtomicU64,
    pub commits: AtomicU64,
}

impl Shared {
    pub fn head(&self) -> Head {
        *self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct Writer {
    pub backend: Box<dyn WriteBackend>,
    pub key: Arc<AuditKey>,
    pub options: GroupCommitOptions,
    pub shared: Arc<Shared>,
    pub events_tx: broadcast::Sender<AuditEvent>,
    /// `None` after a failed commit: the backend reloads it, because only
    /// the database knows what was committed.
    pub head: Option<Head>,
}

impl Writer {
    /// Runs until every sender is gone, i.e. the log was dropped.
    pub fn run(mut self, rx: &mpsc::Receiver<Pending>) {
        let max_batch = self.options.max_batch.max(1);
        let mut busy = false;
        while let Ok(first) = rx.recv() {
            if busy && !self.options.linger.is_zero() {
                // A plain sleep, not a wait on the queue: appends arriving
                // meanwhile do not wake this thread one by one.
                std::thread::sleep(self.options.linger);
            }
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match rx.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
            busy = batch.len() >= self.options.busy_batch.max(1);
            self.commit(batch);
            if let Some(head) = self.head {
                self.backend.committed(&self.key, head, false);
            }
        }
        // The log is closing: anchor the final head.
        if let Some(head) = self.head {
            self.backend.committed(&self.key, head, true);
        }
    }

    fn commit(&mut self, batch: Vec<Pending>) {
        let count = batch.len();
        // Records move into their events (no copy per event on this thread,
        // which every append waits for).
        let (records, replies): (Vec<_>, Vec<_>) = batch
            .into_iter()
            .map(|p| ((p.record, p.time_unix_nanos), p.reply))
            .unzip();
        let fail = self.shared.fail_writes.load(Ordering::SeqCst);
        match self.backend.commit(&self.key, self.head, records, fail) {
            Ok(events) => {
                if let Some(last) = events.last() {
                    self.head = Some((last.sequence, last.hash));
                    *self
                        .shared
                        .head
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = (last.sequence, last.hash);
                    self.shared
                        .newest
                        .fetch_max(last.sequence, Ordering::Relaxed);
                }
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .events
                    .fetch_add(count as u64, Ordering::Relaxed);
                let feed = self.backend.feeds_tail() && self.events_tx.receiver_count() > 0;
                for (reply, event) in replies.into_iter().zip(events) {
                    // Tail subscribers see only durable events; none listening is
                    // fine, and then there is nothing to copy.
                    if feed {
                        let _ = self.events_tx.send(event.clone());
                    }
                    let _ = reply.send(Ok(event));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, events = count, "audit commit failed; failing the batch closed");
                self.head = None;
                for reply in replies {
                    let _ = reply.send(Err(AuditError::Unavailable {
                        reason: match &err {
                            AuditError::Unavailable { reason } => reason.clone(),
                            other => other.to_string(),
                        },
                    }));
                }
            }
        }
    }
}
