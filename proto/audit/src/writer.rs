//! The writer thread: owns the only write connection, assigns sequence numbers
//! and hashes in commit order, and commits queued appends in groups.

use std::sync::{
    Arc, Mutex, PoisonError,
    atomic::{AtomicBool, AtomicU64, Ordering},
    mpsc,
};

use rusqlite::{Connection, TransactionBehavior};
use tokio::sync::{broadcast, oneshot};

use super::{AuditError, AuditEvent, AuditKey, AuditRecord, GroupCommitOptions, chain, store};

/// One queued append.
pub(crate) struct Pending {
    pub record: AuditRecord,
    pub time_unix_nanos: i64,
    pub reply: oneshot::Sender<Result<AuditEvent, AuditError>>,
}

/// What the writer and the [`AuditLog`](super::AuditLog) handle share.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    pub head: Mutex<(u64, [u8; 32])>,
    pub fail_writes: AtomicBool,
    pub events: AtomicU64,
    pub commits: AtomicU64,
}

impl Shared {
    pub fn head(&self) -> (u64, [u8; 32]) {
        *self.head.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(crate) struct Writer {
    pub conn: Connection,
    pub key: Arc<AuditKey>,
    pub options: GroupCommitOptions,
    pub shared: Arc<Shared>,
    pub events_tx: broadcast::Sender<AuditEvent>,
    /// `None` after a failed commit: reloaded from the database before the
    /// next batch, because only the database knows what was committed.
    pub head: Option<(u64, [u8; 32])>,
    /// The database path; its anchor file sits beside it.
    pub database: std::path::PathBuf,
    /// The sequence the anchor file names, and when it was written.
    pub anchored: (u64, std::time::Instant),
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
            if self.anchored.1.elapsed() >= super::anchor::ANCHOR_INTERVAL {
                self.anchor();
            }
        }
        // The log is closing: anchor the final head.
        self.anchor();
    }

    /// Records the committed head in the anchor file (if it moved). A failure
    /// is logged and retried after the next commit; the events themselves
    /// are durable already.
    fn anchor(&mut self) {
        let Some((sequence, hash)) = self.head else {
            return;
        };
        if sequence == self.anchored.0 {
            self.anchored.1 = std::time::Instant::now();
            return;
        }
        match super::anchor::write(
            &self.database,
            &self.key,
            super::anchor::Anchor { sequence, hash },
        ) {
            Ok(()) => self.anchored = (sequence, std::time::Instant::now()),
            Err(error) => tracing::error!(%error, sequence,
                "cannot write the audit anchor; a truncated tail would go unnoticed until it is written"),
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
        match self.write(records) {
            Ok(events) => {
                if let Some(last) = events.last() {
                    self.head = Some((last.sequence, last.hash));
                    *self
                        .shared
                        .head
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner) = (last.sequence, last.hash);
                }
                self.shared.commits.fetch_add(1, Ordering::Relaxed);
                self.shared
                    .events
                    .fetch_add(count as u64, Ordering::Relaxed);
                for (reply, event) in replies.into_iter().zip(events) {
                    // Tail subscribers see only durable events; none listening is
                    // fine, and then there is nothing to copy.
                    if self.events_tx.receiver_count() > 0 {
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

    /// Chains and stores the batch in one transaction. The in-memory head is
    /// untouched here; the caller advances it only after COMMIT returned.
    fn write(&mut self, batch: Vec<(AuditRecord, i64)>) -> Result<Vec<AuditEvent>, AuditError> {
        let (mut sequence, mut prev_hash) = match self.head {
            Some(head) => head,
            None => {
                let head = store::load_head(&self.conn, &self.key)?;
                *self
                    .shared
                    .head
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner) = head;
                self.head = Some(head);
                head
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| AuditError::unavailable(&e))?;
        let mut events = Vec::with_capacity(batch.len());
        for (record, time_unix_nanos) in batch {
            sequence += 1;
            let hash = chain::event_hash(
                &self.key,
                &prev_hash,
                sequence,
                &record.hash_input(time_unix_nanos),
            );
            let event = AuditEvent {
                sequence,
                record,
                prev_hash,
                hash,
            };
            store::insert(&tx, &event, time_unix_nanos).map_err(|e| AuditError::unavailable(&e))?;
            prev_hash = hash;
            events.push(event);
        }
        if self.shared.fail_writes.load(Ordering::SeqCst) {
            // Dropping `tx` rolls back, exactly as after a failed COMMIT.
            return Err(AuditError::Unavailable {
                reason: "write failure injected by fail_writes".into(),
            });
        }
        tx.commit().map_err(|e| AuditError::unavailable(&e))?;
        Ok(events)
    }
}
