//! The embedded backend: one SQLite file, one writer (this process), the
//! anchor in a file beside it. Schema and migrations, connections, the
//! writer's transaction and the pooled read-only readers. Only the writer
//! thread inserts (and migrates); everything else opens read-only and never
//! changes the file.

use std::{
    ops::ControlFlow,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use rusqlite::{Connection, OpenFlags, Row, TransactionBehavior};

use super::{
    COLUMNS, Head, Param, ReadBackend, Scanned, StoredRow, WriteBackend, chain_batch, verified_head,
};
use crate::{
    AuditError, AuditEvent, AuditFilter, AuditKey, AuditRecord, GENESIS_HASH,
    anchor::{self, Anchor},
};

/// `PRAGMA user_version` of the newest schema: [`SCHEMA_V1`], then
/// [`MIGRATE_V2`] and [`MIGRATE_V3`].
pub(crate) const SCHEMA_VERSION: i64 = 3;

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

/// Version 3: the writing replica's instance id, for logs several replicas
/// share (the PostgreSQL backend). A SQLite log has one writer and stores
/// it empty, which hashes as before (see `chain.rs`).
const MIGRATE_V3: &str = "
ALTER TABLE audit_events ADD COLUMN instance_id TEXT NOT NULL DEFAULT '';
";

/// Lets a read-only connection read an older file as the newest version
/// (the new columns empty, as they would be after the migrations) without
/// writing to it: a TEMP view shadows the table for unqualified names, and
/// the temp schema lives with the connection, not in the file.
const READ_V1_AS_V3: &str = "
CREATE TEMP VIEW audit_events AS
    SELECT *, '' AS job_id, '' AS recording_id, '' AS destination_id, '' AS instance_id
    FROM main.audit_events;
";
const READ_V2_AS_V3: &str = "
CREATE TEMP VIEW audit_events AS SELECT *, '' AS instance_id FROM main.audit_events;
";

const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

fn open_err(path: &Path) -> impl Fn(rusqlite::Error) -> AuditError + '_ {
    move |source| AuditError::Open {
        location: path.display().to_string(),
        reason: source.to_string(),
    }
}

fn read_err(source: rusqlite::Error) -> AuditError {
    AuditError::Read {
        reason: source.to_string(),
    }
}

fn unavailable(source: &rusqlite::Error) -> AuditError {
    AuditError::Unavailable {
        reason: source.to_string(),
    }
}

/// Opens (creating if needed) the database for the writer thread.
fn open_writer(path: &Path) -> Result<Connection, AuditError> {
    let open_err = open_err(path);
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&open_err)?;
    // WAL: readers never block the writer. synchronous=FULL: every COMMIT
    // fsyncs the WAL, so a committed event survives power loss.
    let mode: String = conn
        .pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))
        .map_err(&open_err)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(AuditError::Open {
            location: path.display().to_string(),
            reason: format!("journal_mode is {mode}, the audit log requires WAL"),
        });
    }
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(&open_err)?;
    migrate(&mut conn, path)?;
    Ok(conn)
}

/// Brings the schema to [`SCHEMA_VERSION`] in one transaction: a crash
/// midway leaves the old version, intact, for the next start to migrate.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), AuditError> {
    let open_err = open_err(path);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(&open_err)?;
    let version = schema_version(&tx, path)?;
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(&open_err)?;
    }
    if version < 2 {
        tx.execute_batch(MIGRATE_V2).map_err(&open_err)?;
    }
    if version < 3 {
        tx.execute_batch(MIGRATE_V3).map_err(&open_err)?;
    }
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(&open_err)?;
        if version > 0 {
            tracing::info!(database = %path.display(), from = version, to = SCHEMA_VERSION,
                "audit database schema migrated");
        }
    }
    tx.commit().map_err(&open_err)
}

/// `PRAGMA user_version`, refused when newer than this build knows.
fn schema_version(conn: &Connection, path: &Path) -> Result<i64, AuditError> {
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |row| row.get(0))
        .map_err(open_err(path))?;
    if version > SCHEMA_VERSION {
        return Err(AuditError::Schema {
            location: path.display().to_string(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(version)
}

/// Opens an existing database read-only (queries, verification, export).
fn open_reader(path: &Path) -> Result<Connection, AuditError> {
    let open_err = open_err(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(&open_err)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(&open_err)?;
    // A log that no writer of this version has opened yet (offline verify or
    // export right after an upgrade) is read as it will look once migrated.
    match schema_version(&conn, path)? {
        1 => conn.execute_batch(READ_V1_AS_V3).map_err(&open_err)?,
        2 => conn.execute_batch(READ_V2_AS_V3).map_err(&open_err)?,
        _ => {}
    }
    Ok(conn)
}

/// The last stored event's sequence and hash, after checking that hash,
/// and its time. `(0, GENESIS_HASH)` and 0 for an empty log.
fn load_head(conn: &Connection, key: &AuditKey) -> Result<(Head, i64), AuditError> {
    let sql = format!("SELECT {COLUMNS} FROM audit_events ORDER BY sequence DESC LIMIT 1");
    let mut stmt = conn.prepare(&sql).map_err(read_err)?;
    let mut rows = stmt.query([]).map_err(read_err)?;
    match rows.next().map_err(read_err)? {
        None => Ok(((0, GENESIS_HASH), 0)),
        Some(row) => {
            let row = from_row(row).map_err(read_err)?;
            Ok((verified_head(key, &row)?, row.time_unix_nanos))
        }
    }
}

/// Inserts the chained batch inside the writer's transaction.
fn insert(tx: &rusqlite::Transaction<'_>, events: &[(AuditEvent, i64)]) -> rusqlite::Result<()> {
    let mut stmt = tx.prepare_cached(&format!(
        "INSERT INTO audit_events ({COLUMNS}) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)"
    ))?;
    for (event, time_unix_nanos) in events {
        let r = &event.record;
        let sequence = i64::try_from(event.sequence)
            .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
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
            event.instance_id,
        ])?;
    }
    Ok(())
}

fn from_row(row: &Row<'_>) -> rusqlite::Result<StoredRow> {
    Ok(StoredRow {
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
        instance_id: row.get(17)?,
    })
}

fn to_sql(param: &Param) -> rusqlite::types::Value {
    match param {
        Param::Int(i) => rusqlite::types::Value::Integer(*i),
        Param::Text(t) => rusqlite::types::Value::Text(t.clone()),
    }
}

/// The writer's connection, and the anchor file it keeps beside the database.
pub(crate) struct SqliteWriter {
    conn: Connection,
    database: PathBuf,
    /// The sequence the anchor file names, and when it was written.
    anchored: (u64, Instant),
    /// Time of the last committed event (the next one's floor).
    last_nanos: i64,
}

/// Opens the log for writing: migrates, verifies the stored head against
/// its anchor file, and (re)anchors that head. Returns the head.
pub(crate) fn open(
    path: &Path,
    key: &AuditKey,
) -> Result<(SqliteWriter, SqliteReader, Head), AuditError> {
    let conn = open_writer(path)?;
    let (head, last_nanos) = load_head(&conn, key)?;
    let reader = SqliteReader::new(path);
    super::check_anchor(
        &reader,
        key,
        head,
        &anchor::path_for(path).display().to_string(),
    )?;
    // (Re)anchor at the verified head: this also covers a log that had no
    // anchor yet (created by an older version, or the anchor was removed).
    anchor::write(
        path,
        key,
        Anchor {
            sequence: head.0,
            hash: head.1,
        },
    )
    .map_err(|e| AuditError::Unavailable {
        reason: format!(
            "cannot write the audit anchor {}: {e}",
            anchor::path_for(path).display()
        ),
    })?;
    let writer = SqliteWriter {
        conn,
        database: path.to_owned(),
        anchored: (head.0, Instant::now()),
        last_nanos,
    };
    Ok((writer, reader, head))
}

impl WriteBackend for SqliteWriter {
    fn commit(
        &mut self,
        key: &AuditKey,
        cached: Option<Head>,
        batch: Vec<(AuditRecord, i64)>,
        fail: bool,
    ) -> Result<Vec<AuditEvent>, AuditError> {
        // This process is the only writer: chain onto what it committed
        // last, or (after a failure) onto what the file holds.
        let head = match cached {
            Some(head) => head,
            None => {
                let (head, last_nanos) = load_head(&self.conn, key)?;
                self.last_nanos = last_nanos;
                head
            }
        };
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(|e| unavailable(&e))?;
        let events = chain_batch(key, head, self.last_nanos, "", batch);
        insert(&tx, &events).map_err(|e| unavailable(&e))?;
        if fail {
            // Dropping `tx` rolls back, exactly as after a failed COMMIT.
            return Err(AuditError::Unavailable {
                reason: "write failure injected by fail_writes".into(),
            });
        }
        tx.commit().map_err(|e| unavailable(&e))?;
        if let Some((_, nanos)) = events.last() {
            self.last_nanos = *nanos;
        }
        Ok(events.into_iter().map(|(event, _)| event).collect())
    }

    /// Records the committed head in the anchor file, at most once per
    /// [`anchor::ANCHOR_INTERVAL`] and when the log closes. A failure is
    /// logged and retried after the next commit; the events themselves are
    /// durable already.
    fn committed(&mut self, key: &AuditKey, (sequence, hash): Head, closing: bool) {
        if !closing && self.anchored.1.elapsed() < anchor::ANCHOR_INTERVAL {
            return;
        }
        if sequence == self.anchored.0 {
            self.anchored.1 = Instant::now();
            return;
        }
        match anchor::write(&self.database, key, Anchor { sequence, hash }) {
            Ok(()) => self.anchored = (sequence, Instant::now()),
            Err(error) => tracing::error!(%error, sequence,
                "cannot write the audit anchor; a truncated tail would go unnoticed until it is written"),
        }
    }
}

/// Read-only connections kept for queries.
const READ_POOL_SIZE: usize = 4;

/// Pooled read-only connections to the database file.
#[derive(Debug)]
pub(crate) struct SqliteReader {
    path: PathBuf,
    pool: Mutex<Vec<Connection>>,
}

impl SqliteReader {
    /// Readers of the file at `path`; it must exist when first read.
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            pool: Mutex::default(),
        }
    }

    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, AuditError>,
    ) -> Result<T, AuditError> {
        let pooled = self
            .pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => open_reader(&self.path)?,
        };
        let result = f(&conn);
        let mut pool = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if pool.len() < READ_POOL_SIZE {
            pool.push(conn);
        }
        result
    }
}

impl ReadBackend for SqliteReader {
    fn query(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: Option<u32>,
        each: &mut dyn FnMut(AuditEvent) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let (sql, params) = filter.to_sql(after, limit, "INDEXED BY audit_events_time");
        self.with_conn(|conn| {
            let mut stmt = conn.prepare_cached(&sql).map_err(read_err)?;
            let mut rows = stmt
                .query(rusqlite::params_from_iter(params.iter().map(to_sql)))
                .map_err(read_err)?;
            while let Some(row) = rows.next().map_err(read_err)? {
                each(from_row(row).map_err(read_err)?.into_event()?)?;
            }
            Ok(())
        })
    }

    fn scan(&self, each: &mut dyn FnMut(Scanned) -> ControlFlow<()>) -> Result<(), AuditError> {
        self.with_conn(|conn| {
            let sql = format!("SELECT {COLUMNS} FROM audit_events ORDER BY sequence");
            let mut stmt = conn.prepare(&sql).map_err(read_err)?;
            let mut rows = stmt.query([]).map_err(read_err)?;
            while let Some(row) = rows.next().map_err(read_err)? {
                let scanned = match from_row(row) {
                    Ok(stored) => Scanned::Row(Box::new(stored)),
                    Err(e) => Scanned::Undecodable {
                        sequence: row.get(0).map_err(read_err)?,
                        reason: e.to_string(),
                    },
                };
                if each(scanned).is_break() {
                    break;
                }
            }
            Ok(())
        })
    }

    fn anchor(&self, key: &AuditKey) -> Result<Option<Anchor>, AuditError> {
        anchor::read(&self.path, key)
    }

    fn has_anchor(&self) -> bool {
        anchor::path_for(&self.path).exists()
    }

    fn stored_hash(&self, sequence: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let sequence = i64::try_from(sequence).map_err(|_| AuditError::Tampered {
            sequence,
            reason: "sequence out of range".into(),
        })?;
        self.with_conn(|conn| {
            let mut stmt = conn
                .prepare_cached("SELECT hash FROM audit_events WHERE sequence = ?1")
                .map_err(read_err)?;
            let mut rows = stmt.query([sequence]).map_err(read_err)?;
            match rows.next().map_err(read_err)? {
                Some(row) => Ok(Some(row.get(0).map_err(read_err)?)),
                None => Ok(None),
            }
        })
    }
}
