//! Where events are stored, behind two traits: the writer thread's
//! [`WriteBackend`] (one transaction per batch) and the readers'
//! [`ReadBackend`] (queries, verification, export). One module per backend:
//! [`sqlite`] (the embedded default, one writer, an anchor file beside the
//! database) and [`postgres`] (one chain several replicas append to,
//! serialized through the database, the anchor a row in the same
//! transaction). Chaining, row decoding and verification are shared here and
//! in `chain.rs`, so the backends cannot disagree on what an event hashes to.

pub(crate) mod postgres;
pub(crate) mod sqlite;

use std::ops::ControlFlow;

use time::OffsetDateTime;

use super::{
    AuditError, AuditEvent, AuditFilter, AuditKey, AuditRecord, Outcome, VerifyReport,
    anchor::Anchor,
    chain::{self, ChainVerifier, HashInput},
};

/// Sequence and hash of a committed event (`(0, GENESIS_HASH)` before the first).
pub(crate) type Head = (u64, [u8; 32]);

/// Column list shared by every SELECT, in [`StoredRow`] field order.
pub(crate) const COLUMNS: &str = "sequence, time_unix_nanos, identity, cert_fingerprint, \
    operation, tenant_id, credential_id, lease_id, outcome, code, request_id, detail, \
    prev_hash, hash, job_id, recording_id, destination_id, instance_id";

/// The writer thread's side of a backend.
pub(crate) trait WriteBackend: Send {
    /// Chains `batch` onto the stored head and commits it in one
    /// transaction. `cached` is the head this writer committed last (`None`
    /// after a failure); a backend that is the log's only writer chains onto
    /// it, a shared one reads the head inside its transaction. With `fail`
    /// set the transaction is rolled back instead of committed (test hook).
    fn commit(
        &mut self,
        key: &AuditKey,
        cached: Option<Head>,
        batch: Vec<(AuditRecord, i64)>,
        fail: bool,
    ) -> Result<Vec<AuditEvent>, AuditError>;

    /// After each successful commit and when the log closes (`closing`):
    /// where the anchor is kept apart from the events, refresh it.
    fn committed(&mut self, _key: &AuditKey, _head: Head, _closing: bool) {}

    /// Whether the writer feeds `TailEvents` with what it committed. A
    /// shared log's follower feeds it from the database instead, with every
    /// replica's events in order.
    fn feeds_tail(&self) -> bool {
        true
    }
}

/// One row as the verifier sees it.
pub(crate) enum Scanned {
    Row(Box<StoredRow>),
    /// The sequence column decodes, another does not.
    Undecodable {
        sequence: i64,
        reason: String,
    },
}

/// The readers' side of a backend: blocking calls, run off the async runtime.
pub(crate) trait ReadBackend: Send + Sync + 'static {
    /// Events after `after` matching `filter`, in sequence order, at most `limit`.
    fn query(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: Option<u32>,
        each: &mut dyn FnMut(AuditEvent) -> Result<(), AuditError>,
    ) -> Result<(), AuditError>;

    /// Every stored row in sequence order, streaming, until `each` breaks.
    fn scan(&self, each: &mut dyn FnMut(Scanned) -> ControlFlow<()>) -> Result<(), AuditError>;

    /// The authenticated anchor, if there is one.
    fn anchor(&self, key: &AuditKey) -> Result<Option<Anchor>, AuditError>;

    /// Whether an anchor exists at all (authentic or not).
    fn has_anchor(&self) -> bool;

    /// The stored hash of the event at `sequence`, if there is such a row.
    fn stored_hash(&self, sequence: u64) -> Result<Option<Vec<u8>>, AuditError>;
}

/// Chains `batch` after `head`: sequence numbers, links and hashes, in order.
/// `instance` is the writing replica's id (empty for a single writer).
///
/// Times never go backwards along the chain: an event stamped before
/// `floor` (the time of the event it follows) takes that time instead. Calls
/// stamp their record before queueing, and replicas commit in turn, so
/// without this a few events would sit a little out of time order; with it,
/// sequence order is time order, and a time is moved only by the moment it
/// waited for an earlier event's commit.
pub(crate) fn chain_batch(
    key: &AuditKey,
    head: Head,
    mut floor: i64,
    instance: &str,
    batch: Vec<(AuditRecord, i64)>,
) -> Vec<(AuditEvent, i64)> {
    let (mut sequence, mut prev_hash) = head;
    batch
        .into_iter()
        .map(|(mut record, mut nanos)| {
            if nanos < floor
                && let Ok(time) = OffsetDateTime::from_unix_timestamp_nanos(i128::from(floor))
            {
                record.time = time;
                nanos = floor;
            }
            floor = nanos;
            sequence += 1;
            let mut input = record.hash_input(nanos);
            input.instance = instance;
            let hash = chain::event_hash(key, &prev_hash, sequence, &input);
            let event = AuditEvent {
                sequence,
                record,
                prev_hash,
                hash,
                instance_id: instance.to_owned(),
            };
            prev_hash = hash;
            (event, nanos)
        })
        .collect()
}

/// Checks the hash of a stored head row before a writer chains onto it.
pub(crate) fn verified_head(key: &AuditKey, row: &StoredRow) -> Result<Head, AuditError> {
    let sequence = u64::try_from(row.sequence)
        .ok()
        .filter(|s| *s > 0)
        .ok_or_else(|| AuditError::Tampered {
            sequence: 1,
            reason: format!("stored sequence {} is not positive", row.sequence),
        })?;
    let tampered = |reason: &str| AuditError::Tampered {
        sequence,
        reason: format!("the last event's {reason}"),
    };
    let prev_hash = <[u8; 32]>::try_from(row.prev_hash.as_slice())
        .map_err(|_| tampered("prev_hash is not 32 bytes"))?;
    let hash =
        <[u8; 32]>::try_from(row.hash.as_slice()).map_err(|_| tampered("hash is not 32 bytes"))?;
    let computed = chain::event_hash(key, &prev_hash, sequence, &row.hash_input());
    if !bool::from(subtle::ConstantTimeEq::ct_eq(&computed[..], &hash[..])) {
        return Err(tampered(
            "hash does not match its contents (edited, forged, or wrong audit key)",
        ));
    }
    Ok((sequence, hash))
}

/// At start-up: the log must still reach the head its anchor names, with
/// the same hash there. A missing anchor is only a warning (logs from before
/// anchors, or a removed anchor); the caller writes a fresh one. `anchor`
/// names where the anchor lives, for the operator.
pub(crate) fn check_anchor(
    reader: &dyn ReadBackend,
    key: &AuditKey,
    head: Head,
    anchor: &str,
) -> Result<(), AuditError> {
    let Some(anchored) = reader.anchor(key)? else {
        if head.0 > 0 {
            tracing::warn!(
                anchor,
                head = head.0,
                "the audit log has no anchor: a truncated tail cannot be ruled out for events before now"
            );
        }
        return Ok(());
    };
    if anchored.sequence > head.0 {
        return Err(AuditError::Tampered {
            sequence: head.0 + 1,
            reason: format!(
                "events {}..={} were committed (the anchor names {}) but are missing: the log was truncated or restored from an older copy \
                 (if you restored it from a backup on purpose, remove the anchor {anchor}; the service then warns and anchors the restored head)",
                head.0 + 1,
                anchored.sequence,
                anchored.sequence,
            ),
        });
    }
    if anchored.sequence > 0 {
        let stored = reader.stored_hash(anchored.sequence)?;
        if stored.as_deref() != Some(&anchored.hash[..]) {
            return Err(AuditError::Tampered {
                sequence: anchored.sequence,
                reason:
                    "the stored event differs from the one the anchor names (replaced or rewritten)"
                        .into(),
            });
        }
    }
    Ok(())
}

/// Checks every stored row in order, and that the log still reaches
/// `expected_head` (a head known to be committed: the anchor, or one this
/// process saw committed).
pub(crate) fn verify(
    reader: &dyn ReadBackend,
    key: &AuditKey,
    expected_head: Option<Head>,
) -> Result<VerifyReport, AuditError> {
    let mut verifier = ChainVerifier::new(key, expected_head);
    let mut result = Ok(());
    reader.scan(&mut |scanned| {
        result = match scanned {
            Scanned::Row(row) => verifier.check(&row),
            Scanned::Undecodable { sequence, reason } => {
                Err(verifier.undecodable(sequence, &reason))
            }
        };
        if result.is_err() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    })?;
    let result = result.and_then(|()| verifier.finish());
    Ok(match result {
        Ok(()) => VerifyReport {
            ok: true,
            events_checked: verifier.checked(),
            first_broken_sequence: 0,
            reason: String::new(),
        },
        Err(broken) => VerifyReport {
            ok: false,
            events_checked: verifier.checked(),
            first_broken_sequence: broken.sequence,
            reason: broken.reason,
        },
    })
}

/// Verifies against the stored anchor and, for a running log, the head this
/// process committed (`own`): the later of the two must still be there. An
/// intact chain whose anchor does not authenticate is reported as such
/// (first broken 0); a broken chain (say, the wrong key) is the better
/// answer otherwise.
pub(crate) fn verify_anchored(
    reader: &dyn ReadBackend,
    key: &AuditKey,
    own: Option<Head>,
) -> Result<VerifyReport, AuditError> {
    match reader.anchor(key) {
        Ok(anchored) => {
            let anchored = anchored.map(|a| (a.sequence, a.hash));
            let expected = match (anchored, own) {
                (Some(a), Some(o)) => Some(if a.0 > o.0 { a } else { o }),
                (a, o) => a.or(o),
            };
            verify(reader, key, expected)
        }
        Err(AuditError::Tampered { reason, .. }) => {
            let report = verify(reader, key, own)?;
            Ok(if report.ok {
                VerifyReport {
                    ok: false,
                    first_broken_sequence: 0,
                    reason,
                    ..report
                }
            } else {
                report
            })
        }
        Err(e) => Err(e),
    }
}

/// A bound query parameter, in either backend's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Param {
    Int(i64),
    Text(String),
}

/// One row exactly as stored: strings are not parsed, so the verifier hashes
/// what is on disk, and an edited `outcome` shows up as a broken hash.
#[derive(Debug)]
pub(crate) struct StoredRow {
    pub sequence: i64,
    pub time_unix_nanos: i64,
    pub identity: String,
    pub cert_fingerprint: String,
    pub operation: String,
    pub tenant_id: String,
    pub credential_id: String,
    pub lease_id: String,
    pub outcome: String,
    pub code: String,
    pub request_id: String,
    pub detail: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
    pub job_id: String,
    pub recording_id: String,
    pub destination_id: String,
    pub instance_id: String,
}

impl StoredRow {
    pub fn hash_input(&self) -> HashInput<'_> {
        HashInput {
            time_unix_nanos: self.time_unix_nanos,
            fields: [
                &self.identity,
                &self.cert_fingerprint,
                &self.operation,
                &self.tenant_id,
                &self.credential_id,
                &self.lease_id,
                &self.outcome,
                &self.code,
                &self.request_id,
                &self.detail,
            ],
            recording: [&self.job_id, &self.recording_id, &self.destination_id],
            instance: &self.instance_id,
        }
    }

    /// Decodes into an event. Does not verify the chain.
    pub fn into_event(self) -> Result<AuditEvent, AuditError> {
        let sequence = u64::try_from(self.sequence).map_err(|_| AuditError::Corrupt {
            sequence: 0,
            reason: format!("sequence {} is negative", self.sequence),
        })?;
        let corrupt = |reason: &str| AuditError::Corrupt {
            sequence,
            reason: reason.to_owned(),
        };
        let time = OffsetDateTime::from_unix_timestamp_nanos(i128::from(self.time_unix_nanos))
            .map_err(|_| corrupt("time is out of range"))?;
        let outcome = self
            .outcome
            .parse::<Outcome>()
            .map_err(|_| corrupt("outcome is not allowed, denied or error"))?;
        let prev_hash = <[u8; 32]>::try_from(self.prev_hash.as_slice())
            .map_err(|_| corrupt("prev_hash is not 32 bytes"))?;
        let hash = <[u8; 32]>::try_from(self.hash.as_slice())
            .map_err(|_| corrupt("hash is not 32 bytes"))?;
        Ok(AuditEvent {
            sequence,
            record: AuditRecord {
                time,
                identity: self.identity,
                cert_fingerprint: self.cert_fingerprint,
                operation: self.operation,
                tenant_id: self.tenant_id,
                credential_id: self.credential_id,
                lease_id: self.lease_id,
                outcome,
                code: self.code,
                request_id: self.request_id,
                detail: self.detail,
                job_id: self.job_id,
                recording_id: self.recording_id,
                destination_id: self.destination_id,
            },
            prev_hash,
            hash,
            instance_id: self.instance_id,
        })
    }
}
