//! The tamper-evident, fail-closed audit log both recvault services write:
//! one HMAC-chained event per RPC, durable (fsynced SQLite commit, grouped)
//! before the RPC may answer. It never records secrets, not even hashed, and
//! never hands out its key. [`grpc`] holds what every `Audit` gRPC service
//! shares, [`offline`] the `audit verify` and `audit export` commands.
//!
//! Fail closed: a service that gets *any* error from [`AuditLog::append`] must
//! answer its RPC with gRPC `UNAVAILABLE` and must not release what the event
//! is about (plaintext, recording bytes).

mod anchor;
mod chain;
mod error;
mod filter;
pub mod grpc;
mod keyfile;
pub mod offline;
mod store;
mod writer;

use std::{
    fmt,
    path::{Path, PathBuf},
    str::FromStr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread,
    time::Duration,
};

pub use recvault_pg::PgTarget;
use recvault_runtime::secret::SecretBytes;
use serde::{Serialize, Serializer};
use time::{OffsetDateTime, UtcOffset, format_description::well_known::Rfc3339};
use tokio::sync::{broadcast, oneshot};

pub use chain::GENESIS_HASH;
pub use error::AuditError;
pub use filter::AuditFilter;
pub use keyfile::KeyFileError;

use chain::HashInput;
use store::ReadBackend;
use writer::{Pending, Shared, Writer};

/// Longest string field stored, in bytes; longer ones are cut at a character
/// boundary. An over-long purpose must not make an access go unaudited.
pub const MAX_FIELD_BYTES: usize = 4096;

/// Most events one [`AuditLog::query`] returns.
pub const MAX_QUERY_LIMIT: u32 = 10_000;

/// Events buffered per [`AuditLog::subscribe`] receiver before it lags.
const TAIL_CAPACITY: usize = 4096;

/// The 256-bit HMAC key of the chain: the vault derives it from its master
/// key, the uploader reads it from its own key file ([`AuditKey::load_file`]).
pub struct AuditKey(SecretBytes);

impl AuditKey {
    /// Key length in bytes.
    pub const LEN: usize = 32;

    /// Takes a derived key; it must be exactly [`Self::LEN`] bytes.
    pub fn new(key: SecretBytes) -> Result<Self, AuditError> {
        if key.len() != Self::LEN {
            return Err(AuditError::InvalidKey { len: key.len() });
        }
        Ok(Self(key))
    }

    fn expose(&self) -> &[u8] {
        self.0.expose_secret()
    }
}

impl fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditKey([REDACTED])")
    }
}

/// Result of an audited RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Authorized and served.
    Allowed,
    /// Refused by authorization (`PERMISSION_DENIED`, `UNAUTHENTICATED`).
    Denied,
    /// Authorized but failed.
    Error,
}

impl Outcome {
    /// The wire and storage name: `allowed`, `denied` or `error`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The string is not `allowed`, `denied` or `error`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("outcome must be \"allowed\", \"denied\" or \"error\"")]
pub struct ParseOutcomeError;

impl FromStr for Outcome {
    type Err = ParseOutcomeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "allowed" => Ok(Self::Allowed),
            "denied" => Ok(Self::Denied),
            "error" => Ok(Self::Error),
            _ => Err(ParseOutcomeError),
        }
    }
}

impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// What a service records about one RPC. Never put a secret in any field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// When the RPC was handled; stored as UTC unix nanoseconds.
    pub time: OffsetDateTime,
    /// Peer identity (URI or DNS SAN), or `"unauthenticated"`.
    pub identity: String,
    /// Hex SHA-256 of the peer's leaf certificate (DER), or empty.
    pub cert_fingerprint: String,
    /// Full gRPC method, e.g. `recvault.vault.v1.Leases/AcquireLease`.
    pub operation: String,
    /// Tenant the call concerned, or empty.
    pub tenant_id: String,
    /// Credential the call concerned, or empty.
    pub credential_id: String,
    /// Lease acquired or released, or empty.
    pub lease_id: String,
    /// Allowed, denied, or failed after authorization.
    pub outcome: Outcome,
    /// gRPC status code name, e.g. `OK`, `PERMISSION_DENIED`.
    pub code: String,
    /// `x-request-id` of the call.
    pub request_id: String,
    /// Free text such as a lease purpose; never a secret.
    pub detail: String,
    /// Uploader job the call concerned, or empty (always, in the vault).
    pub job_id: String,
    /// Recording the call concerned, or empty.
    pub recording_id: String,
    /// Delivery destination the call concerned, or empty.
    pub destination_id: String,
}

impl AuditRecord {
    /// A record stamped now, with every id field empty; fill the rest with
    /// struct update syntax.
    pub fn now(operation: impl Into<String>, outcome: Outcome, code: impl Into<String>) -> Self {
        Self {
            time: OffsetDateTime::now_utc(),
            identity: String::new(),
            cert_fingerprint: String::new(),
            operation: operation.into(),
            tenant_id: String::new(),
            credential_id: String::new(),
            lease_id: String::new(),
            outcome,
            code: code.into(),
            request_id: String::new(),
            detail: String::new(),
            job_id: String::new(),
            recording_id: String::new(),
            destination_id: String::new(),
        }
    }

    fn hash_input(&self, time_unix_nanos: i64) -> HashInput<'_> {
        HashInput {
            time_unix_nanos,
            fields: [
                &self.identity,
                &self.cert_fingerprint,
                &self.operation,
                &self.tenant_id,
                &self.credential_id,
                &self.lease_id,
                self.outcome.as_str(),
                &self.code,
                &self.request_id,
                &self.detail,
            ],
            recording: [&self.job_id, &self.recording_id, &self.destination_id],
            instance: "",
        }
    }

    /// UTC time, over-long fields cut; the unix nanoseconds that get stored.
    fn normalize(mut self) -> Result<(Self, i64), AuditError> {
        self.time = self.time.to_offset(UtcOffset::UTC);
        let nanos = i64::try_from(self.time.unix_timestamp_nanos()).map_err(|_| {
            AuditError::InvalidRecord {
                reason: "time must be between the years 1678 and 2261",
            }
        })?;
        for field in [
            &mut self.identity,
            &mut self.cert_fingerprint,
            &mut self.operation,
            &mut self.tenant_id,
            &mut self.credential_id,
            &mut self.lease_id,
            &mut self.code,
            &mut self.request_id,
            &mut self.detail,
            &mut self.job_id,
            &mut self.recording_id,
            &mut self.destination_id,
        ] {
            if field.len() > MAX_FIELD_BYTES {
                let cut = (0..=MAX_FIELD_BYTES)
                    .rev()
                    .find(|&i| field.is_char_boundary(i))
                    .unwrap_or(0);
                field.truncate(cut);
            }
        }
        Ok((self, nanos))
    }
}

/// A stored, chained event: `hash = HMAC(key, domain ‖ prev_hash ‖ sequence ‖ record)`.
/// Serializes as the proto `AuditEvent` (RFC 3339 time, hex hashes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// 1-based and gapless, in commit order.
    pub sequence: u64,
    /// What happened.
    pub record: AuditRecord,
    /// Hash of event `sequence - 1`; [`GENESIS_HASH`] for the first.
    pub prev_hash: [u8; 32],
    /// This event's chain hash.
    pub hash: [u8; 32],
    /// The replica that wrote it, on a log several replicas share (hashed);
    /// empty on a log with one writer.
    pub instance_id: String,
}

impl Serialize for AuditEvent {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        /// Field names and order of proto `recvault.vault.v1.AuditEvent`.
        #[derive(Serialize)]
        struct Wire<'a> {
            sequence: u64,
            time: String,
            identity: &'a str,
            operation: &'a str,
            tenant_id: &'a str,
            credential_id: &'a str,
            lease_id: &'a str,
            outcome: Outcome,
            code: &'a str,
            request_id: &'a str,
            prev_hash: String,
            hash: String,
            cert_fingerprint: &'a str,
            detail: &'a str,
            job_id: &'a str,
            recording_id: &'a str,
            destination_id: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            instance_id: &'a str,
        }
        let r = &self.record;
        let time = r
            .time
            .to_offset(UtcOffset::UTC)
            .format(&Rfc3339)
            .map_err(serde::ser::Error::custom)?;
        Wire {
            sequence: self.sequence,
            time,
            identity: &r.identity,
            operation: &r.operation,
            tenant_id: &r.tenant_id,
            credential_id: &r.credential_id,
            lease_id: &r.lease_id,
            outcome: r.outcome,
            code: &r.code,
            request_id: &r.request_id,
            prev_hash: hex::encode(self.prev_hash),
            hash: hex::encode(self.hash),
            cert_fingerprint: &r.cert_fingerprint,
            detail: &r.detail,
            job_id: &r.job_id,
            recording_id: &r.recording_id,
            destination_id: &r.destination_id,
            instance_id: &self.instance_id,
        }
        .serialize(s)
    }
}

/// Group commit tuning.
///
/// The writer commits whatever is queued in one transaction and one fsync.
/// Appends that arrive during a commit form the next batch, so an idle log
/// commits each event at once. Under load, the writer lingers before taking
/// the next batch: the batch grows, and the fsync (which costs the same for
/// one event or five hundred) is shared by more events. Each fsync costs
/// CPU time in the kernel as well as latency, so at high load this raises
/// throughput; the price is at most `linger` of extra latency, paid only
/// while the log is busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupCommitOptions {
    /// Most events per transaction (and per fsync).
    pub max_batch: usize,
    /// How long the writer waits before taking the next batch when the log
    /// is busy. Zero never waits.
    pub linger: Duration,
    /// The log counts as busy after a commit of at least this many events.
    pub busy_batch: usize,
}

impl Default for GroupCommitOptions {
    fn default() -> Self {
        Self {
            max_batch: 512,
            linger: Duration::from_micros(250),
            busy_batch: 4,
        }
    }
}

/// Counters since [`AuditLog::open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AuditStats {
    /// Events committed.
    pub events: u64,
    /// Successful commits (fsyncs); `events / commits` is the mean batch size.
    pub commits: u64,
}

/// Result of checking the whole chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    /// The whole chain verified.
    pub ok: bool,
    /// Events whose hash and link checked out before the first break.
    pub events_checked: u64,
    /// The first expected sequence that is missing, edited, forged or
    /// unlinked; 0 when `ok`, or when the chain is intact but its anchor
    /// file does not authenticate.
    pub first_broken_sequence: u64,
    /// Why, for the operator; empty when `ok`.
    pub reason: String,
}

/// Where a log is stored.
#[derive(Debug)]
pub enum AuditStorage {
    /// A SQLite file (the embedded default), its anchor file beside it.
    Sqlite(PathBuf),
    /// A PostgreSQL database several replicas share (tables `audit_events`
    /// and `audit_anchor`).
    Postgres(Box<PgTarget>),
}

impl AuditStorage {
    /// The file or database, for messages (never a password).
    pub fn describe(&self) -> String {
        match self {
            Self::Sqlite(path) => path.display().to_string(),
            Self::Postgres(target) => format!("postgresql {}", target.display()),
        }
    }

    fn reader(self) -> Arc<dyn ReadBackend> {
        match self {
            Self::Sqlite(path) => Arc::new(store::sqlite::SqliteReader::new(&path)),
            Self::Postgres(target) => Arc::new(store::postgres::PostgresReader::new(*target)),
        }
    }
}

/// The audit log of one service. Share it as `Arc<AuditLog>`; dropping it
/// finishes the queued appends and stops the writer thread.
pub struct AuditLog {
    location: String,
    key: Arc<AuditKey>,
    shared: Arc<Shared>,
    queue: Option<mpsc::Sender<Pending>>,
    writer: Option<thread::JoinHandle<()>>,
    events_tx: broadcast::Sender<AuditEvent>,
    reader: Arc<dyn ReadBackend>,
    /// Stops the follower of a shared log.
    follow_stop: Option<Arc<AtomicBool>>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("location", &self.location)
            .field("head", &self.head().0)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens or creates the SQLite log at `path` and starts its writer thread.
    ///
    /// Refuses to start ([`AuditError::Tampered`]) when the last stored event
    /// does not verify under `key`, or the log no longer reaches the head
    /// its anchor names. Blocking: call it before serving, or from
    /// `spawn_blocking`.
    pub fn open(
        path: &Path,
        key: AuditKey,
        options: GroupCommitOptions,
    ) -> Result<Self, AuditError> {
        Self::open_in(AuditStorage::Sqlite(path.to_owned()), "", key, options)
    }

    /// Opens or creates the log in `storage`. On PostgreSQL, `instance_id`
    /// names this replica in every event it writes (hashed with it); a
    /// SQLite log has one writer and ignores it. Blocking, as [`Self::open`].
    pub fn open_in(
        storage: AuditStorage,
        instance_id: &str,
        key: AuditKey,
        options: GroupCommitOptions,
    ) -> Result<Self, AuditError> {
        let location = storage.describe();
        let (backend, reader, head, follower): (
            Box<dyn store::WriteBackend>,
            Arc<dyn ReadBackend>,
            _,
            _,
        ) = match storage {
            AuditStorage::Sqlite(path) => {
                let (writer, reader, head) = store::sqlite::open(&path, &key)?;
                (Box::new(writer), Arc::new(reader), head, None)
            }
            AuditStorage::Postgres(target) => {
                let (writer, reader, head) = store::postgres::open(*target, instance_id, &key)?;
                let follower = Arc::clone(&reader);
                (Box::new(writer), reader, head, Some(follower))
            }
        };
        let key = Arc::new(key);
        let shared = Arc::new(Shared {
            head: Mutex::new(head),
            newest: AtomicU64::new(head.0),
            ..Shared::default()
        });
        let (events_tx, _) = broadcast::channel(TAIL_CAPACITY);
        let follow_stop = if let Some(follower) = follower {
            let stop = Arc::new(AtomicBool::new(false));
            let seen = Arc::clone(&shared);
            store::postgres::follow(
                follower,
                head.0,
                events_tx.clone(),
                move |n| {
                    seen.newest.fetch_max(n, Ordering::Relaxed);
                },
                Arc::clone(&stop),
            )
            .map_err(|e| AuditError::Unavailable {
                reason: format!("cannot start the audit follower thread: {e}"),
            })?;
            Some(stop)
        } else {
            None
        };
        let (queue, rx) = mpsc::channel();
        let writer = Writer {
            backend,
            key: Arc::clone(&key),
            options,
            shared: Arc::clone(&shared),
            events_tx: events_tx.clone(),
            head: Some(head),
        };
        let writer = thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| AuditError::Unavailable {
                reason: format!("cannot start the writer thread: {e}"),
            })?;
        Ok(Self {
            location,
            key,
            shared,
            queue: Some(queue),
            writer: Some(writer),
            events_tx,
            reader,
            follow_stop,
        })
    }

    /// Appends one event and returns it once it is durable (committed and
    /// fsynced). Any error means nothing was stored: fail the RPC `UNAVAILABLE`.
    pub async fn append(&self, record: AuditRecord) -> Result<AuditEvent, AuditError> {
        let (record, time_unix_nanos) = record.normalize()?;
        let (reply, done) = oneshot::channel();
        self.queue
            .as_ref()
            .ok_or(AuditError::Closed)?
            .send(Pending {
                record,
                time_unix_nanos,
                reply,
            })
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Events after `after_sequence` that match `filter`, in sequence order, at
    /// most `limit` (capped at [`MAX_QUERY_LIMIT`]; 0 returns none). Page by
    /// passing the last returned sequence as the next `after_sequence`. On a
    /// shared log, the events of every replica.
    pub async fn query(
        &self,
        filter: &AuditFilter,
        after_sequence: u64,
        limit: u32,
    ) -> Result<Vec<AuditEvent>, AuditError> {
        let filter = filter.clone();
        let limit = limit.min(MAX_QUERY_LIMIT);
        self.with_reader(move |reader| {
            let mut events = Vec::new();
            reader.query(&filter, after_sequence, Some(limit), &mut |event| {
                events.push(event);
                Ok(())
            })?;
            Ok(events)
        })
        .await
    }

    /// Committed events from now on, for tailing (on a shared log, those of
    /// every replica, in sequence order). Subscribe *before* querying history
    /// and skip sequences already seen. A receiver that falls more than 4096
    /// events behind gets `Lagged` and should resume with [`Self::query`].
    pub fn subscribe(&self) -> broadcast::Receiver<AuditEvent> {
        self.events_tx.subscribe()
    }

    /// Sequence and hash of the last event this process committed
    /// (`(0, GENESIS_HASH)` if none).
    pub fn head(&self) -> (u64, [u8; 32]) {
        self.shared.head()
    }

    /// The newest sequence known committed: [`Self::head`] on a log with one
    /// writer; on a shared log, also the other replicas' commits seen so far.
    pub fn newest_sequence(&self) -> u64 {
        self.shared
            .newest
            .load(Ordering::Relaxed)
            .max(self.shared.head().0)
    }

    /// Commit counters; `commits` much smaller than `events` shows group commit.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            events: self.shared.events.load(Ordering::Relaxed),
            commits: self.shared.commits.load(Ordering::Relaxed),
        }
    }

    /// Checks the whole chain, streaming, and also that the log still holds
    /// the head this process committed (catches truncation and rollback to an
    /// older copy, which an offline check cannot) and the anchor (which, on a
    /// shared log, every replica's commits move): the later of the two heads
    /// must still be there.
    pub async fn verify(&self) -> VerifyReport {
        let key = Arc::clone(&self.key);
        let own = self.head();
        let report = self
            .with_reader(move |reader| store::verify_anchored(reader, &key, Some(own)))
            .await;
        report.unwrap_or_else(|err| VerifyReport {
            ok: false,
            events_checked: 0,
            first_broken_sequence: 0,
            reason: err.to_string(),
        })
    }

    /// Test hook: while on, every batch fails instead of committing, through the
    /// same rollback and error path as a real write failure.
    #[doc(hidden)]
    pub fn fail_writes(&self, on: bool) {
        self.shared.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Runs `f` on the backend's readers, off the async runtime.
    async fn with_reader<T, F>(&self, f: F) -> Result<T, AuditError>
    where
        T: Send + 'static,
        F: FnOnce(&dyn ReadBackend) -> Result<T, AuditError> + Send + 'static,
    {
        let reader = Arc::clone(&self.reader);
        tokio::task::spawn_blocking(move || f(&*reader))
            .await
            .map_err(|e| AuditError::Unavailable {
                reason: format!("audit reader task failed: {e}"),
            })?
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        if let Some(stop) = self.follow_stop.take() {
            stop.store(true, Ordering::Relaxed);
        }
        // Closing the queue lets the writer commit what is queued, then exit.
        self.queue.take();
        if let Some(writer) = self.writer.take()
            && writer.join().is_err()
        {
            tracing::error!("audit writer thread panicked");
        }
    }
}

/// Verifies the SQLite log at `path` offline (read-only), e.g. from a CLI;
/// see [`verify_storage`].
pub fn verify_path(path: &Path, key: &AuditKey) -> Result<VerifyReport, AuditError> {
    verify_storage(AuditStorage::Sqlite(path.to_owned()), key)
}

/// Verifies a log offline (read-only), against its anchor.
///
/// It cannot see events removed from the end of the log past the anchor;
/// the running service's [`AuditLog::verify`] can, against the head it
/// committed.
pub fn verify_storage(storage: AuditStorage, key: &AuditKey) -> Result<VerifyReport, AuditError> {
    let reader = storage.reader();
    store::verify_anchored(&*reader, key, None)
}

/// Whether the log has an anchor (see [`verify_storage`]); without one, a
/// truncated tail cannot be told from a shorter log.
pub fn has_anchor(storage: AuditStorage) -> bool {
    storage.reader().has_anchor()
}

/// Writes every event matching `filter` as one JSON object per line, streaming.
/// Returns how many were written. Does not verify; run [`verify_storage`] too.
pub fn export_jsonl(
    storage: AuditStorage,
    filter: &AuditFilter,
    out: &mut impl std::io::Write,
) -> Result<u64, AuditError> {
    let reader = storage.reader();
    let mut written = 0;
    reader.query(filter, 0, None, &mut |event| {
        serde_json::to_writer(&mut *out, &event)
            .map_err(|e| AuditError::Export { source: e.into() })?;
        out.write_all(b"\n")
            .map_err(|source| AuditError::Export { source })?;
        written += 1;
        Ok(())
    })?;
    out.flush()
        .map_err(|source| AuditError::Export { source })?;
    Ok(written)
}

/// The chain hash of `record` at `sequence` after `prev_hash`, as the writer
/// computes it. For tools that check exported events; `record.time` is taken
/// in unix nanoseconds, as stored.
pub fn chain_hash(
    key: &AuditKey,
    prev_hash: &[u8; 32],
    sequence: u64,
    record: &AuditRecord,
) -> Result<[u8; 32], AuditError> {
    let (record, nanos) = record.clone().normalize()?;
    Ok(chain::event_hash(
        key,
        prev_hash,
        sequence,
        &record.hash_input(nanos),
    ))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn outcome_round_trips() {
        for outcome in [Outcome::Allowed, Outcome::Denied, Outcome::Error] {
            assert_eq!(outcome.as_str().parse::<Outcome>(), Ok(outcome));
        }
        assert!("ALLOWED".parse::<Outcome>().is_err());
    }

    #[test]
    fn normalize_cuts_long_fields_at_char_boundaries_and_uses_utc() {
        let mut record = AuditRecord::now("op", Outcome::Allowed, "OK");
        record.detail = "é".repeat(MAX_FIELD_BYTES); // 2 bytes each
        record.lease_id = "x".repeat(MAX_FIELD_BYTES + 1);
        record.time = record.time.to_offset(UtcOffset::from_hms(2, 0, 0).unwrap());
        let instant = record.time;
        let (record, nanos) = record.normalize().unwrap();
        assert_eq!(record.detail.len(), MAX_FIELD_BYTES);
        assert_eq!(record.lease_id.len(), MAX_FIELD_BYTES);
        assert_eq!(record.time, instant);
        assert_eq!(record.time.offset(), UtcOffset::UTC);
        assert_eq!(i128::from(nanos), instant.unix_timestamp_nanos());
    }

    #[test]
    fn time_outside_i64_nanos_is_rejected() {
        let mut record = AuditRecord::now("op", Outcome::Allowed, "OK");
        record.time = OffsetDateTime::from_unix_timestamp(i64::MAX / 1_000_000_000 + 1).unwrap();
        assert!(matches!(
            record.normalize(),
            Err(AuditError::InvalidRecord { .. })
        ));
    }
}
