//! SQLite storage for audit events: schema, migrations, connections, row
//! mapping. Only the writer thread inserts (and migrates); everything else
//! opens read-only and never changes the file.

use std::{path::Path, time::Duration};

use rusqlite::{Connection, OpenFlags, Row, Transaction, TransactionBehavior};
use time::OffsetDateTime;

use super::{
    AuditError, AuditEvent, AuditKey, AuditRecord, Outcome,
    chain::{self, HashInput},
};

/// `PRAGMA user_version` of the newest schema: [`SCHEMA_V1`], then [`MIGRATE_V2`].
pub(crate) const SCHEMA_VERSION: i64 = 2;

/// Version 1, as the first vault releases created it. A new database is
/// created with it and then migrated, so every database takes the same path.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS audit_events (
    sequence         INTEGER PRIMARY KEY,  -- 1-based, gapless, assigned by the writer
    time_unix_nanos  INTEGER NOT NULL,
    identity         TEXT NOT NULL,
    cert_fingerprint TEXT NOT NULL,
    operation        TEXT NOT NULL,
    tenant_id        TEXT NOT NULL,
    credential_id    TEXT NOT NULL,
    lease_id         TEXT NOT NULL,
    outcome          TEXT NOT NULL,
    code             TEXT NOT NULL,
    request_id       TEXT NOT NULL,
    detail           TEXT NOT NULL,
    prev_hash        BLOB NOT NULL,
    hash             BLOB NOT NULL
) STRICT;
-- Filters are exact matches paged by sequence: (column, sequence) serves both.
CREATE INDEX IF NOT EXISTS audit_events_tenant ON audit_events (tenant_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_credential ON audit_events (credential_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_request ON audit_events (request_id, sequence);
CREATE INDEX IF NOT EXISTS audit_events_time ON audit_events (time_unix_nanos);
";

/// Version 2: the uploader's job, recording and destination ids. Existing
/// rows get empty strings, which is exactly what they hashed (an event with
/// all three empty has no extension block, see `chain.rs`), so old chains
/// still verify. SQLite adds a column with a constant default without
/// rewriting the table.
const MIGRATE_V2: &str = "
ALTER TABLE audit_events ADD COLUMN job_id TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN recording_id TEXT NOT NULL DEFAULT '';
ALTER TABLE audit_events ADD COLUMN destination_id TEXT NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS audit_events_job ON audit_events (job_id, sequence);
";

/// Lets a read-only connection read a version-1 file as version 2 (the new
/// columns empty, as they would be after the migration) without writing to
/// it: a TEMP view shadows the table for unqualified names, and the temp
/// schema lives with the connection, not in the file.
const READ_V1_AS_V2: &str = "
CREATE TEMP VIEW audit_events AS
    SELECT *, '' AS job_id, '' AS recording_id, '' AS destination_id FROM main.audit_events;
";

/// Column list shared by every SELECT, in [`StoredRow::from_row`] order.
pub(crate) const COLUMNS: &str = "sequence, time_unix_nanos, identity, cert_fingerprint, \
    operation, tenant_id, credential_id, lease_id, outcome, code, request_id, detail, \
    prev_hash, hash, job_id, recording_id, destination_id";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Opens (creating if needed) the database for the writer thread.
pub(crate) fn open_writer(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // WAL: readers never block the writer. synchronous=FULL: every COMMIT
    // fsyncs the WAL, so a committed event survives power loss.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(open_err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!(
                "journal_mode is {mode}, the audit log requires WAL"
            )),
        )));
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction: a crash
/// midway leaves the old version, intact, for the next start to migrate.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(open_err)?;
    let version = schema_version(&tx, path)?;
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(open_err)?;
    }
    if version < 2 {
        tx.execute_batch(MIGRATE_V2).map_err(open_err)?;
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(open_err)?;
        if version > 0 {
            tracing::info!(database = %path.display(), from = version, to = SCHEMA_VERSION,
                "audit database schema migrated");
        }
    }
    tx.commit().map_err(open_err)
}

/// `PRAGMA user_version`, refused when newer than this build knows.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, AuditError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(|source| AuditError::Open {
            path: path.to_owned(),
            source,
        })?;
    if version > SCHEMA_VERSION {
        return Err(AuditError::Schema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// Opens an existing database read-only (queries, verification, export).
pub(crate) fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    let open_err = |source| AuditError::Open {
        path: path.to_owned(),
        source,
    };
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
    // A log that no writer of this version has opened yet (offline verify or
    // export right after an upgrade) is read as it will look once migrated.
    if schema_version(&conn, path)? == 1 {
        conn.execute_batch(READ_V1_AS_V2).map_err(open_err)?;
    }
    Ok(conn)
}

/// The last stored event's sequence and hash, after checking that hash.
/// `(0, GENESIS_HASH)` for an empty log.
pub(crate) fn load_head(conn: &Connection, key: &AuditKey) -> Result<(u64, [u8; 32]), AuditError> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events ORDER BY sequence DESC LIMIT 1");
    let mut stmt = conn.prepare(&sql).map_err(AuditError::read)?;
    let mut rows = stmt.query([]).map_err(AuditError::read)?;
    let Some(row) = rows.next().map_err(AuditError::read)? else {
        return Ok((0, chain::GENESIS_HASH));
    };
    let row = StoredRow::from_row(row).map_err(AuditError::read)?;
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

/// The stored hash of the event at `sequence`, if there is such a row.
pub(crate) fn stored_hash(conn: &Connection, sequence: u64) -> Result<Option<Vec<u8>>, AuditError> {
    let sequence = i64::try_from(sequence).map_err(|_| AuditError::Tampered {
        sequence,
        reason: "sequence out of range".into(),
    })?;
    let mut stmt = conn
        .prepare_cached("SELECT hash FROM audit_events WHERE sequence = ?1")
        .map_err(AuditError::read)?;
    let mut rows = stmt.query([sequence]).map_err(AuditError::read)?;
    match rows.next().map_err(AuditError::read)? {
        Some(row) => Ok(Some(row.get(0).map_err(AuditError::read)?)),
        None => Ok(None),
    }
}

/// Inserts one event inside the writer's transaction.
pub(crate) fn insert(
    tx: &Transaction<'_>,
    event: &AuditEvent,
    time_unix_nanos: i64,
) -> rusqlite::Result<()> {
    let r = &event.record;
    let sequence = i64::try_from(event.sequence)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    let mut stmt = tx.prepare_cached(
        "INSERT INTO audit_events (sequence, time_unix_nanos, identity, cert_fingerprint, \
         operation, tenant_id, credential_id, lease_id, outcome, code, request_id, detail, \
         prev_hash, hash, job_id, recording_id, destination_id) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
    )?;
    stmt.execute(rusqlite::params![
        sequence,
        time_unix_nanos,
        r.identity,
        r.cert_fingerprint,
        r.operation,
        r.tenant_id,
        r.credential_id,
        r.lease_id,
        r.outcome.as_str(),
        r.code,
        r.request_id,
        r.detail,
        &event.prev_hash[..],
        &event.hash[..],
        r.job_id,
        r.recording_id,
        r.destination_id,
    ])?;
    Ok(())
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
}

impl StoredRow {
    pub fn from_row(row: &Row<'_>) -> rusqlite::Result<Self> {
        Ok(Self {
            sequence: row.get(0)?,
            time_unix_nanos: row.get(1)?,
            identity: row.get(2)?,
            cert_fingerprint: row.get(3)?,
            operation: row.get(4)?,
            tenant_id: row.get(5)?,
            credential_id: row.get(6)?,
            lease_id: row.get(7)?,
            outcome: row.get(8)?,
            code: row.get(9)?,
            request_id: row.get(10)?,
            detail: row.get(11)?,
            prev_hash: row.get(12)?,
            hash: row.get(13)?,
            job_id: row.get(14)?,
            recording_id: row.get(15)?,
            destination_id: row.get(16)?,
        })
    }

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
        })
    }
}
