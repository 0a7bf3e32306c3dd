//! The embedded backend: one SQLite file (WAL, `synchronous=FULL`, so a
//! committed change survives power loss) for one uploader process. Writes run
//! in `BEGIN IMMEDIATE` transactions behind one connection mutex, so they are
//! serialized: claims never overlap, and nothing needs `SKIP LOCKED`.
//!
//! The schema version is SQLite's `user_version`. Versions 1–3 predate the
//! migration files and are upgraded by [`legacy_upgrade`]; from version 4 on,
//! each version is a file under `uploader/migrations/sqlite/`.

use std::path::Path;
use std::sync::{LazyLock, Mutex};

use rusqlite::{
    Connection, OptionalExtension as _, Transaction, TransactionBehavior, named_params, params,
};
use time::OffsetDateTime;

use super::{
    DestinationBackend, DestinationRecord, DestinationRow, EventRow, JOB_COLUMNS, JobBackend,
    JobQuery, JobRow, JobTx, TxFn, insert_job_sql, new_destination_id, update_job_sql,
};
use crate::jobs::JobStoreError;

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// The schema versions this uploader knows, with the file that makes each.
const MIGRATIONS: &[(i64, &str)] = &[
    (4, include_str!("../../migrations/sqlite/0004_jobs.sql")),
    (5, include_str!("../../migrations/sqlite/0005_claims.sql")),
];

fn db(e: rusqlite::Error) -> JobStoreError {
    match e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            JobStoreError::Conflict(format!("job database: {e}"))
        }
        e => JobStoreError::Unavailable(format!("job database: {e}")),
    }
}

/// Opens the file with the pragmas every connection uses and migrates it.
fn connect(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path).map_err(db)?;
    // WAL lets readers (ListJobs) run beside the writer; FULL fsyncs the WAL
    // on every commit (https://sqlite.org/pragma.html#pragma_synchronous).
    conn.pragma_update(None, "journal_mode", "WAL")
        .map_err(db)?;
    conn.pragma_update(None, "synchronous", "FULL")
        .map_err(db)?;
    conn.pragma_update(None, "foreign_keys", true).map_err(db)?;
    conn.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(db)?;
    migrate(&mut conn)?;
    Ok(conn)
}

fn migrate(conn: &mut Connection) -> Result<()> {
    let newest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    if version > newest {
        return Err(JobStoreError::Corrupt(format!(
            "schema version {version} is newer than this uploader's {newest}; run a newer uploader"
        )));
    }
    if version == newest {
        return Ok(());
    }
    // IMMEDIATE: a second process opening the same file waits instead of
    // migrating beside us; a failed step changes nothing.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db)?;
    let version: i64 = tx
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .map_err(db)?;
    if version < 4 {
        legacy_upgrade(&tx)?;
    }
    for (v, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > version) {
        tx.execute_batch(sql).map_err(db)?;
        if *v == 5 {
            fill_object_locations(&tx)?;
        }
    }
    tx.pragma_update(None, "user_version", newest).map_err(db)?;
    tx.commit().map_err(db)
}

/// Versions 1–3 → 4, in code (they predate the migration files). A new
/// database has no `jobs` table yet and skips this.
fn legacy_upgrade(tx: &Transaction<'_>) -> Result<()> {
    if !table_exists(tx, "jobs")? {
        return Ok(());
    }
    let has = |column: &str| -> Result<bool> {
        tx.prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = ?1")
            .and_then(|mut s| s.exists([column]))
            .map_err(db)
    };
    if !has("object_key")? {
        // 1 → 2: the key is filled from the destination's prefix by version
        // 5's step, which also gives it its location.
        tx.execute_batch("ALTER TABLE jobs ADD COLUMN object_key TEXT")
            .map_err(db)?;
        tx.execute_batch("UPDATE jobs SET object_key = NULL")
            .map_err(db)?;
    }
    if !has("stored_sha256")? {
        // 2 → 3: every existing backup was written in clear.
        tx.execute_batch(
            "ALTER TABLE jobs ADD COLUMN stored_sha256 BLOB
                CHECK (stored_sha256 IS NULL OR length(stored_sha256) = 32)",
        )
        .map_err(db)?;
    }
    if !has("retrying_since")? {
        // 3 → 4: a job already RETRYING starts its retry window now.
        tx.execute_batch(
            "ALTER TABLE jobs ADD COLUMN retrying_since INTEGER;
             ALTER TABLE jobs ADD COLUMN doubtful_failures INTEGER NOT NULL DEFAULT 0;",
        )
        .map_err(db)?;
        let now = i64::try_from(OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000)
            .unwrap_or(i64::MAX);
        tx.execute(
            "UPDATE jobs SET retrying_since = :now WHERE state = 'RETRYING'",
            named_params! { ":now": now },
        )
        .map_err(db)?;
    }
    Ok(())
}

/// Version 5's step: every job gets the real location of its destination
/// (computed from the destination row, in the same file) and, when it has
/// none yet, the key from the destination's prefix. When two jobs would hold
/// the same key at one location (two destinations at one bucket, or jobs
/// ingested before names were checked), the older keeps it and the newer's
/// next attempt or resend registers a key again, refused while it is taken.
fn fill_object_locations(tx: &Transaction<'_>) -> Result<()> {
    let rows: Vec<(String, Option<String>, String, Option<DestinationRecord>)> = {
        let mut stmt = tx
            .prepare(
                "SELECT j.job_id, j.object_key, j.file_name, d.destination_id, d.tenant_id,
                        d.name, d.provider, d.endpoint, d.region, d.bucket, d.prefix,
                        d.path_style, d.credential_id
                 FROM jobs j LEFT JOIN destinations d ON d.destination_id = j.destination_id
                 ORDER BY j.created_at, j.rowid",
            )
            .map_err(db)?;
        let mapped = stmt
            .query_map([], |r| {
                let destination = match r.get::<_, Option<String>>(3)? {
                    None => None,
                    Some(destination_id) => Some(DestinationRow {
                        destination_id,
                        tenant_id: r.get(4)?,
                        name: r.get(5)?,
                        provider: r.get(6)?,
                        endpoint: r.get(7)?,
                        region: r.get(8)?,
                        bucket: r.get(9)?,
                        prefix: r.get(10)?,
                        path_style: r.get::<_, i64>(11)? != 0,
                        credential_id: r.get(12)?,
                    }),
                };
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, destination))
            })
            .map_err(db)?;
        let mut out = Vec::new();
        for row in mapped {
            let (id, key, name, destination) = row.map_err(db)?;
            let destination = destination.and_then(|d| d.into_record().ok());
            out.push((id, key, name, destination));
        }
        out
    };
    let mut holders = std::collections::HashMap::new();
    for (job_id, key, file_name, destination) in rows {
        let Some(destination) = destination else {
            continue; // nothing can be sent there any more; no key is held
        };
        let key = match key {
            Some(key) => key,
            None => match crate::destination::object_key(&destination.config.prefix, &file_name) {
                Ok(key) => key,
                Err(_) => continue,
            },
        };
        let location = destination.config.real_location();
        match holders.entry((location, key)) {
            std::collections::hash_map::Entry::Occupied(held) => {
                let (location, key) = held.key();
                tracing::warn!(%job_id, holder = %held.get(), %location, %key,
                    "two jobs hold the same object key at one location; the older keeps it, and this job is delivered there only after a resend to a free name");
                tx.execute(
                    "UPDATE jobs SET object_key = NULL WHERE job_id = ?1",
                    [&job_id],
                )
                .map_err(db)?;
            }
            std::collections::hash_map::Entry::Vacant(free) => {
                tx.execute(
                    "UPDATE jobs SET object_key = ?1, object_location = ?2 WHERE job_id = ?3",
                    params![free.key().1, free.key().0, job_id],
                )
                .map_err(db)?;
                free.insert(job_id);
            }
        }
    }
    Ok(())
}

fn table_exists(conn: &Connection, name: &str) -> Result<bool> {
    conn.prepare("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1")
        .and_then(|mut s| s.exists([name]))
        .map_err(db)
}

fn job_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRow> {
    Ok(JobRow {
        job_id: r.get(0)?,
        tenant_id: r.get(1)?,
        recording_id: r.get(2)?,
        destination_id: r.get(3)?,
        file_name: r.get(4)?,
        content_type: r.get(5)?,
        backup_path: r.get(6)?,
        sha256: r.get(7)?,
        size: r.get(8)?,
        state: r.get(9)?,
        attempts: r.get(10)?,
        last_error: r.get(11)?,
        location: r.get(12)?,
        verified_by: r.get(13)?,
        next_attempt_at: r.get(14)?,
        created_at: r.get(15)?,
        updated_at: r.get(16)?,
        backup_corrupt: r.get(17)?,
        backup_deleted: r.get(18)?,
        multipart_upload_id: r.get(19)?,
        multipart_upload_key: r.get(20)?,
        multipart_upload_location: r.get(21)?,
        request_id: r.get(22)?,
        object_key: r.get(23)?,
        object_location: r.get(24)?,
        stored_sha256: r.get(25)?,
        retrying_since: r.get(26)?,
        doubtful_failures: r.get(27)?,
        claim_owner: r.get(28)?,
        claim_expires_at: r.get(29)?,
    })
}

/// Every column of `row` (in [`JOB_COLUMNS`] order) bound as `?1`…`?30`.
fn bind(stmt: &mut rusqlite::CachedStatement<'_>, row: &JobRow) -> rusqlite::Result<usize> {
    stmt.execute(params![
        row.job_id,
        row.tenant_id,
        row.recording_id,
        row.destination_id,
        row.file_name,
        row.content_type,
        row.backup_path,
        row.sha256,
        row.size,
        row.state,
        row.attempts,
        row.last_error,
        row.location,
        row.verified_by,
        row.next_attempt_at,
        row.created_at,
        row.updated_at,
        row.backup_corrupt,
        row.backup_deleted,
        row.multipart_upload_id,
        row.multipart_upload_key,
        row.multipart_upload_location,
        row.request_id,
        row.object_key,
        row.object_location,
        row.stored_sha256,
        row.retrying_since,
        row.doubtful_failures,
        row.claim_owner,
        row.claim_expires_at,
    ])
}

struct SqliteTx<'a> {
    conn: &'a Connection,
}

impl SqliteTx<'_> {
    fn one(
        &self,
        condition: &str,
        params: &[(&str, &dyn rusqlite::ToSql)],
    ) -> Result<Option<JobRow>> {
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {condition}");
        let mut stmt = self.conn.prepare_cached(&sql).map_err(db)?;
        stmt.query_row(params, job_row).optional().map_err(db)
    }

    fn ids(&self, sql: &str, params: &[(&str, &dyn rusqlite::ToSql)]) -> Result<Vec<String>> {
        let mut stmt = self.conn.prepare_cached(sql).map_err(db)?;
        let rows = stmt.query_map(params, |r| r.get(0)).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }
}

/// Probes the unique index `jobs_by_location_key`.
pub(crate) const KEY_CONDITION: &str =
    "object_location = :l AND object_key = :k AND (:except IS NULL OR job_id <> :except)";

impl JobTx for SqliteTx<'_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>> {
        self.one("job_id = :id", named_params! { ":id": job_id })
    }

    fn job_by_recording(&mut self, tenant_id: &str, recording_id: &str) -> Result<Option<JobRow>> {
        self.one(
            "tenant_id = :t AND recording_id = :r",
            named_params! { ":t": tenant_id, ":r": recording_id },
        )
    }

    fn key_holder(
        &mut self,
        object_location: &str,
        key: &str,
        except: Option<&str>,
    ) -> Result<Option<JobRow>> {
        self.one(
            KEY_CONDITION,
            named_params! { ":l": object_location, ":k": key, ":except": except },
        )
    }

    fn insert(&mut self, row: &JobRow) -> Result<()> {
        static SQL: LazyLock<String> = LazyLock::new(|| insert_job_sql('?'));
        let mut stmt = self.conn.prepare_cached(&SQL).map_err(db)?;
        bind(&mut stmt, row).map_err(db)?;
        Ok(())
    }

    fn update(&mut self, row: &JobRow) -> Result<()> {
        static SQL: LazyLock<String> = LazyLock::new(|| update_job_sql('?'));
        let mut stmt = self.conn.prepare_cached(&SQL).map_err(db)?;
        match bind(&mut stmt, row).map_err(db)? {
            1 => Ok(()),
            _ => Err(JobStoreError::Unavailable(format!(
                "job {} vanished during the change",
                row.job_id
            ))),
        }
    }

    fn add_event(&mut self, e: &EventRow) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO job_events (job_id, time, state, message, replica)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
            )
            .and_then(|mut s| s.execute(params![e.job_id, e.time, e.state, e.message, e.replica]))
            .map_err(db)?;
        Ok(())
    }

    fn due(&mut self, now: i64, limit: u32) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('STORED', 'RETRYING') AND backup_corrupt = 0
               AND next_attempt_at IS NOT NULL AND next_attempt_at <= :now
             ORDER BY next_attempt_at, created_at, rowid LIMIT :limit",
            named_params! { ":now": now, ":limit": limit },
        )
    }

    fn expired_claims(&mut self, now: i64, limit: u32) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('UPLOADING', 'VERIFYING') AND claim_expires_at < :now
             ORDER BY claim_expires_at LIMIT :limit",
            named_params! { ":now": now, ":limit": limit },
        )
    }

    fn claimed_by(&mut self, owner: &str) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('UPLOADING', 'VERIFYING') AND (claim_owner = :o OR claim_owner IS NULL)
             ORDER BY created_at",
            named_params! { ":o": owner },
        )
    }
}

/// Jobs and history in SQLite.
#[derive(Debug)]
pub struct SqliteJobs {
    conn: Mutex<Connection>,
}

impl SqliteJobs {
    /// Opens (creating and migrating as needed) the file at `path`. Blocking.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            conn: Mutex::new(connect(path)?),
        })
    }

    fn conn(&self) -> Result<std::sync::MutexGuard<'_, Connection>> {
        self.conn.lock().map_err(|_| {
            JobStoreError::Unavailable("a previous job store call panicked".to_owned())
        })
    }

    fn run(&self, behavior: TransactionBehavior, f: &mut TxFn<'_>) -> Result<()> {
        let mut conn = self.conn()?;
        let tx = conn.transaction_with_behavior(behavior).map_err(db)?;
        f(&mut SqliteTx { conn: &tx })?;
        tx.commit().map_err(db)
    }

    /// The query plan of the key probe (a test checks it uses the index).
    #[doc(hidden)]
    pub fn explain_key_probe(&self) -> Result<Vec<String>> {
        let conn = self.conn()?;
        let sql =
            format!("EXPLAIN QUERY PLAN SELECT {JOB_COLUMNS} FROM jobs WHERE {KEY_CONDITION}");
        let mut stmt = conn.prepare(&sql).map_err(db)?;
        let rows = stmt
            .query_map(
                named_params! { ":l": "l", ":k": "k", ":except": None::<String> },
                |r| r.get(3),
            )
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }
}

impl JobBackend for SqliteJobs {
    fn write(&self, f: &mut TxFn<'_>) -> Result<()> {
        self.run(TransactionBehavior::Immediate, f)
    }

    fn read(&self, f: &mut TxFn<'_>) -> Result<()> {
        self.run(TransactionBehavior::Deferred, f)
    }

    fn select(&self, query: &JobQuery) -> Result<Vec<JobRow>> {
        let conn = self.conn()?;
        let (condition, tenant, state, limit) = match query {
            JobQuery::List {
                tenant_id,
                state,
                limit,
            } => (
                "(:t IS NULL OR tenant_id = :t) AND (:s IS NULL OR state = :s)
                 ORDER BY created_at DESC, rowid DESC LIMIT :limit",
                tenant_id.clone(),
                state.clone(),
                i64::from(*limit),
            ),
            JobQuery::PendingBackupDeletes => (
                "state = 'DELIVERED' AND backup_deleted = 0 ORDER BY updated_at LIMIT :limit",
                None,
                None,
                -1,
            ),
            JobQuery::ScrubCandidates => (
                "state <> 'DELIVERED' AND backup_deleted = 0 AND backup_corrupt = 0
                 ORDER BY created_at LIMIT :limit",
                None,
                None,
                -1,
            ),
        };
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {condition}");
        let mut stmt = conn.prepare_cached(&sql).map_err(db)?;
        let mut bound: Vec<(&str, &dyn rusqlite::ToSql)> = vec![(":limit", &limit)];
        if stmt.parameter_index(":t").map_err(db)?.is_some() {
            bound.push((":t", &tenant));
            bound.push((":s", &state));
        }
        let rows = stmt.query_map(bound.as_slice(), job_row).map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached("SELECT state, COUNT(*) FROM jobs GROUP BY state")
            .map_err(db)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }

    fn history(&self, job_id: &str) -> Result<Vec<EventRow>> {
        let conn = self.conn()?;
        let mut stmt = conn
            .prepare_cached(
                "SELECT job_id, time, state, message, replica FROM job_events
                 WHERE job_id = ?1 ORDER BY id",
            )
            .map_err(db)?;
        let rows = stmt
            .query_map([job_id], |r| {
                Ok(EventRow {
                    job_id: r.get(0)?,
                    time: r.get(1)?,
                    state: r.get(2)?,
                    message: r.get(3)?,
                    replica: r.get(4)?,
                })
            })
            .map_err(db)?;
        rows.collect::<rusqlite::Result<_>>().map_err(db)
    }
}

/// Destinations in SQLite (the same file as the jobs; a connection of its own).
#[derive(Debug)]
pub struct SqliteDestinations {
    conn: Mutex<Connection>,
}

fn destination_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<DestinationRow> {
    Ok(DestinationRow {
        destination_id: r.get("destination_id")?,
        tenant_id: r.get("tenant_id")?,
        name: r.get("name")?,
        provider: r.get("provider")?,
        endpoint: r.get("endpoint")?,
        region: r.get("region")?,
        bucket: r.get("bucket")?,
        prefix: r.get("prefix")?,
        path_style: r.get::<_, i64>("path_style")? != 0,
        credential_id: r.get("credential_id")?,
    })
}

impl SqliteDestinations {
    /// Opens (creating and migrating as needed) the file at `path`. Blocking.
    pub fn open(path: &Path) -> Result<Self> {
        Ok(Self {
            conn: Mutex::new(connect(path)?),
        })
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl DestinationBackend for SqliteDestinations {
    fn put(
        &self,
        tenant: &str,
        name: &str,
        config: &crate::destination::DestinationConfig,
        credential_id: &str,
    ) -> Result<String> {
        let mut conn = self.conn();
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(db)?;
        let existing: Option<String> = tx
            .query_row(
                "SELECT destination_id FROM destinations WHERE tenant_id = ?1 AND name = ?2",
                params![tenant, name],
                |r| r.get(0),
            )
            .optional()
            .map_err(db)?;
        let row = DestinationRow::new(
            existing.unwrap_or_else(new_destination_id),
            tenant,
            name,
            config,
            credential_id,
        );
        tx.execute(
            "INSERT INTO destinations (destination_id, tenant_id, name, provider, endpoint,
                 region, bucket, prefix, path_style, credential_id)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)
             ON CONFLICT(destination_id) DO UPDATE SET provider = ?4, endpoint = ?5, region = ?6,
                 bucket = ?7, prefix = ?8, path_style = ?9, credential_id = ?10",
            params![
                row.destination_id,
                row.tenant_id,
                row.name,
                row.provider,
                row.endpoint,
                row.region,
                row.bucket,
                row.prefix,
                row.path_style,
                row.credential_id
            ],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(row.destination_id)
    }

    fn get(&self, id: &str) -> Result<Option<DestinationRecord>> {
        self.conn()
            .query_row(
                "SELECT * FROM destinations WHERE destination_id = ?1",
                params![id],
                destination_row,
            )
            .optional()
            .map_err(db)?
            .map(DestinationRow::into_record)
            .transpose()
    }

    fn list(&self, tenant: &str) -> Result<Vec<DestinationRecord>> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT * FROM destinations WHERE tenant_id = ?1 ORDER BY name")
            .map_err(db)?;
        let rows = stmt
            .query_map(params![tenant], destination_row)
            .map_err(db)?;
        rows.map(|r| r.map_err(db).and_then(DestinationRow::into_record))
            .collect()
    }

    fn delete(&self, id: &str) -> Result<bool> {
        Ok(self
            .conn()
            .execute(
                "DELETE FROM destinations WHERE destination_id = ?1",
                params![id],
            )
            .map_err(db)?
            == 1)
    }
}
