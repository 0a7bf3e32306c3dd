//! The shared backend: one PostgreSQL database for every uploader replica.
//!
//! - Writes run in READ COMMITTED transactions that lock the rows they read
//!   (`SELECT … FOR UPDATE`); claims take due jobs with `FOR UPDATE SKIP
//!   LOCKED`, so replicas claim disjoint jobs without waiting on each other.
//!   A unique-key race or a deadlock is retried (a few times) from the start,
//!   where the rules then see the winner's row.
//! - Every write notifies channel [`CHANNEL`] with `<instance> <job_id>` in
//!   its transaction (so only committed changes are announced); progress of a
//!   running attempt goes the same way as `<instance> <job_id> <bytes>`,
//!   without touching a table. Each replica `LISTEN`s ([`JobBackend::follow`])
//!   and re-reads the jobs other replicas changed, so WatchJob on one replica
//!   sees what another does, as soon as it commits.
//! - Schema: `uploader/migrations/postgres/`, recorded in
//!   `uploader_schema_migrations`.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, LazyLock};

use recvault_pg::{PgError, PgTarget, Pool, Row, Transaction, types::ToSql};

use super::{
    DestinationBackend, DestinationRecord, DestinationRow, EventRow, JOB_COLUMNS, JobBackend,
    JobQuery, JobRow, JobTx, RemoteChange, TxFn, insert_job_sql, new_destination_id,
    update_job_sql,
};
use crate::jobs::JobStoreError;

type Result<T, E = JobStoreError> = std::result::Result<T, E>;

/// The NOTIFY channel of job changes.
pub const CHANNEL: &str = "recvault_jobs";
const MIGRATIONS: &[(i64, &str)] = &[(
    1,
    include_str!("../../migrations/postgres/0001_uploader.sql"),
)];
/// Tries of one write transaction that lost a race.
const WRITE_TRIES: usize = 4;
/// How often the listener wakes without a notification (to notice `stop`).
const LISTEN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

fn pg(e: impl Into<PgError>) -> JobStoreError {
    match e.into() {
        PgError::Unavailable(m) => JobStoreError::Unavailable(format!("job database: {m}")),
        PgError::Conflict(m) => JobStoreError::Conflict(format!("job database: {m}")),
        PgError::Corrupt(m) => JobStoreError::Corrupt(format!("job database: {m}")),
    }
}

/// Jobs, history and destinations in PostgreSQL.
#[derive(Debug)]
pub struct PgStore {
    pool: Arc<Pool>,
    instance: String,
}

impl PgStore {
    /// Connects with the URL in `url_file` and applies the migrations.
    /// `instance` names this replica in notifications. Blocking.
    pub fn open(url_file: &Path, instance: &str) -> Result<Self> {
        let target = PgTarget::from_url_file(url_file, "recvault-uploader").map_err(pg)?;
        let pool = Arc::new(Pool::new(target));
        recvault_pg::migrate(&pool, "uploader_schema_migrations", MIGRATIONS).map_err(pg)?;
        Ok(Self {
            pool,
            instance: instance.to_owned(),
        })
    }

    fn run(&self, write: bool, f: &mut TxFn<'_>) -> Result<()> {
        let mut last = None;
        for _ in 0..WRITE_TRIES {
            let mut conn = self.pool.get().map_err(pg)?;
            let tx = conn
                .build_transaction()
                .read_only(!write)
                .start()
                .map_err(pg)?;
            let mut ptx = PgTx {
                tx,
                lock: write,
                touched: Vec::new(),
            };
            match f(&mut ptx) {
                Ok(()) => {
                    let PgTx {
                        mut tx, touched, ..
                    } = ptx;
                    for job_id in touched {
                        let payload = format!("{} {job_id}", self.instance);
                        tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
                            .map_err(pg)?;
                    }
                    return tx.commit().map_err(pg);
                }
                Err(JobStoreError::Conflict(m)) => last = Some(JobStoreError::Conflict(m)),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| JobStoreError::Unavailable("no write attempted".into())))
    }
}

fn job_row(r: &Row) -> Result<JobRow> {
    Ok(JobRow {
        job_id: r.try_get(0).map_err(pg)?,
        tenant_id: r.try_get(1).map_err(pg)?,
        recording_id: r.try_get(2).map_err(pg)?,
        destination_id: r.try_get(3).map_err(pg)?,
        file_name: r.try_get(4).map_err(pg)?,
        content_type: r.try_get(5).map_err(pg)?,
        backup_path: r.try_get(6).map_err(pg)?,
        sha256: r.try_get(7).map_err(pg)?,
        size: r.try_get(8).map_err(pg)?,
        state: r.try_get(9).map_err(pg)?,
        attempts: r.try_get(10).map_err(pg)?,
        last_error: r.try_get(11).map_err(pg)?,
        location: r.try_get(12).map_err(pg)?,
        verified_by: r.try_get(13).map_err(pg)?,
        next_attempt_at: r.try_get(14).map_err(pg)?,
        created_at: r.try_get(15).map_err(pg)?,
        updated_at: r.try_get(16).map_err(pg)?,
        backup_corrupt: r.try_get(17).map_err(pg)?,
        backup_deleted: r.try_get(18).map_err(pg)?,
        multipart_upload_id: r.try_get(19).map_err(pg)?,
        multipart_upload_key: r.try_get(20).map_err(pg)?,
        multipart_upload_location: r.try_get(21).map_err(pg)?,
        request_id: r.try_get(22).map_err(pg)?,
        object_key: r.try_get(23).map_err(pg)?,
        object_location: r.try_get(24).map_err(pg)?,
        stored_sha256: r.try_get(25).map_err(pg)?,
        retrying_since: r.try_get(26).map_err(pg)?,
        doubtful_failures: r.try_get(27).map_err(pg)?,
        claim_owner: r.try_get(28).map_err(pg)?,
        claim_expires_at: r.try_get(29).map_err(pg)?,
    })
}

/// Every column of `row`, in [`JOB_COLUMNS`] order, for `$1`…`$30`.
fn values(row: &JobRow) -> [&(dyn ToSql + Sync); 30] {
    [
        &row.job_id,
        &row.tenant_id,
        &row.recording_id,
        &row.destination_id,
        &row.file_name,
        &row.content_type,
        &row.backup_path,
        &row.sha256,
        &row.size,
        &row.state,
        &row.attempts,
        &row.last_error,
        &row.location,
        &row.verified_by,
        &row.next_attempt_at,
        &row.created_at,
        &row.updated_at,
        &row.backup_corrupt,
        &row.backup_deleted,
        &row.multipart_upload_id,
        &row.multipart_upload_key,
        &row.multipart_upload_location,
        &row.request_id,
        &row.object_key,
        &row.object_location,
        &row.stored_sha256,
        &row.retrying_since,
        &row.doubtful_failures,
        &row.claim_owner,
        &row.claim_expires_at,
    ]
}

struct PgTx<'a> {
    tx: Transaction<'a>,
    /// Lock rows read (`FOR UPDATE`): false in read-only transactions.
    lock: bool,
    /// Jobs changed, announced at commit.
    touched: Vec<String>,
}

impl PgTx<'_> {
    fn one(&mut self, condition: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<JobRow>> {
        let lock = if self.lock { " FOR UPDATE" } else { "" };
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE {condition}{lock}");
        self.tx
            .query_opt(&sql, params)
            .map_err(pg)?
            .as_ref()
            .map(job_row)
            .transpose()
    }

    fn ids(&mut self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<String>> {
        let rows = self.tx.query(sql, params).map_err(pg)?;
        rows.iter().map(|r| r.try_get(0).map_err(pg)).collect()
    }

    fn touch(&mut self, job_id: &str) {
        if !self.touched.iter().any(|t| t == job_id) {
            self.touched.push(job_id.to_owned());
        }
    }
}

impl JobTx for PgTx<'_> {
    fn job(&mut self, job_id: &str) -> Result<Option<JobRow>> {
        self.one("job_id = $1", &[&job_id])
    }

    fn job_by_recording(&mut self, tenant_id: &str, recording_id: &str) -> Result<Option<JobRow>> {
        self.one(
            "tenant_id = $1 AND recording_id = $2",
            &[&tenant_id, &recording_id],
        )
    }

    fn key_holder(
        &mut self,
        object_location: &str,
        key: &str,
        except: Option<&str>,
    ) -> Result<Option<JobRow>> {
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs WHERE object_location = $1 AND object_key = $2
               AND ($3::TEXT IS NULL OR job_id <> $3) LIMIT 1"
        );
        self.tx
            .query_opt(&sql, &[&object_location, &key, &except])
            .map_err(pg)?
            .as_ref()
            .map(job_row)
            .transpose()
    }

    fn insert(&mut self, row: &JobRow) -> Result<()> {
        static SQL: LazyLock<String> = LazyLock::new(|| insert_job_sql('$'));
        self.tx.execute(SQL.as_str(), &values(row)).map_err(pg)?;
        self.touch(&row.job_id);
        Ok(())
    }

    fn update(&mut self, row: &JobRow) -> Result<()> {
        static SQL: LazyLock<String> = LazyLock::new(|| update_job_sql('$'));
        match self.tx.execute(SQL.as_str(), &values(row)).map_err(pg)? {
            1 => {
                self.touch(&row.job_id);
                Ok(())
            }
            _ => Err(JobStoreError::Unavailable(format!(
                "job {} vanished during the change",
                row.job_id
            ))),
        }
    }

    fn add_event(&mut self, e: &EventRow) -> Result<()> {
        self.tx
            .execute(
                "INSERT INTO job_events (job_id, time, state, message, replica)
                 VALUES ($1, $2, $3, $4, $5)",
                &[&e.job_id, &e.time, &e.state, &e.message, &e.replica],
            )
            .map_err(pg)?;
        self.touch(&e.job_id);
        Ok(())
    }

    fn due(&mut self, now: i64, limit: u32) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('STORED', 'RETRYING') AND NOT backup_corrupt
               AND next_attempt_at IS NOT NULL AND next_attempt_at <= $1
             ORDER BY next_attempt_at, created_at LIMIT $2
             FOR UPDATE SKIP LOCKED",
            &[&now, &i64::from(limit)],
        )
    }

    fn expired_claims(&mut self, now: i64, limit: u32) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('UPLOADING', 'VERIFYING') AND claim_expires_at < $1
             ORDER BY claim_expires_at LIMIT $2
             FOR UPDATE SKIP LOCKED",
            &[&now, &i64::from(limit)],
        )
    }

    fn claimed_by(&mut self, owner: &str) -> Result<Vec<String>> {
        self.ids(
            "SELECT job_id FROM jobs
             WHERE state IN ('UPLOADING', 'VERIFYING') AND (claim_owner = $1 OR claim_owner IS NULL)
             ORDER BY created_at
             FOR UPDATE SKIP LOCKED",
            &[&owner],
        )
    }
}

impl JobBackend for PgStore {
    fn shared(&self) -> bool {
        true
    }

    fn write(&self, f: &mut TxFn<'_>) -> Result<()> {
        self.run(true, f)
    }

    fn read(&self, f: &mut TxFn<'_>) -> Result<()> {
        self.run(false, f)
    }

    fn select(&self, query: &JobQuery) -> Result<Vec<JobRow>> {
        let mut conn = self.pool.get().map_err(pg)?;
        let rows = match query {
            JobQuery::List {
                tenant_id,
                state,
                limit,
            } => conn.query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE ($1::TEXT IS NULL OR tenant_id = $1) AND ($2::TEXT IS NULL OR state = $2)
                     ORDER BY created_at DESC, job_id DESC LIMIT $3"
                ),
                &[tenant_id, state, &i64::from(*limit)],
            ),
            JobQuery::PendingBackupDeletes => conn.query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE state = 'DELIVERED' AND NOT backup_deleted ORDER BY updated_at"
                ),
                &[],
            ),
            JobQuery::ScrubCandidates => conn.query(
                &format!(
                    "SELECT {JOB_COLUMNS} FROM jobs
                     WHERE state <> 'DELIVERED' AND NOT backup_deleted AND NOT backup_corrupt
                     ORDER BY created_at"
                ),
                &[],
            ),
        }
        .map_err(pg)?;
        rows.iter().map(job_row).collect()
    }

    fn count_by_state(&self) -> Result<Vec<(String, i64)>> {
        let mut conn = self.pool.get().map_err(pg)?;
        let rows = conn
            .query("SELECT state, COUNT(*) FROM jobs GROUP BY state", &[])
            .map_err(pg)?;
        rows.iter()
            .map(|r| Ok((r.try_get(0).map_err(pg)?, r.try_get(1).map_err(pg)?)))
            .collect()
    }

    fn history(&self, job_id: &str) -> Result<Vec<EventRow>> {
        let mut conn = self.pool.get().map_err(pg)?;
        let rows = conn
            .query(
                "SELECT job_id, time, state, message, replica FROM job_events
                 WHERE job_id = $1 ORDER BY id",
                &[&job_id],
            )
            .map_err(pg)?;
        rows.iter()
            .map(|r| {
                Ok(EventRow {
                    job_id: r.try_get(0).map_err(pg)?,
                    time: r.try_get(1).map_err(pg)?,
                    state: r.try_get(2).map_err(pg)?,
                    message: r.try_get(3).map_err(pg)?,
                    replica: r.try_get(4).map_err(pg)?,
                })
            })
            .collect()
    }

    fn publish_progress(&self, job_id: &str, bytes_sent: u64) -> Result<()> {
        let mut conn = self.pool.get().map_err(pg)?;
        let payload = format!("{} {job_id} {bytes_sent}", self.instance);
        conn.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload])
            .map_err(pg)?;
        Ok(())
    }

    fn follow(
        &self,
        on_change: Box<dyn Fn(Vec<RemoteChange>) + Send>,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<()> {
        let instance = self.instance.clone();
        recvault_pg::listen(
            "jobs-follow",
            Arc::clone(&self.pool),
            CHANNEL,
            LISTEN_POLL,
            stop,
            move |payloads: Vec<String>| {
                let changes: Vec<RemoteChange> = payloads
                    .iter()
                    .filter_map(|p| {
                        let mut parts = p.split(' ');
                        let (origin, job_id) = (parts.next()?, parts.next()?);
                        if origin == instance {
                            return None;
                        }
                        let bytes_sent = parts.next().and_then(|b| b.parse().ok());
                        Some(RemoteChange {
                            job_id: job_id.to_owned(),
                            bytes_sent,
                        })
                    })
                    .collect();
                if !changes.is_empty() {
                    on_change(changes);
                }
            },
        )
    }
}

fn destination_row(r: &Row) -> Result<DestinationRow> {
    Ok(DestinationRow {
        destination_id: r.try_get("destination_id").map_err(pg)?,
        tenant_id: r.try_get("tenant_id").map_err(pg)?,
        name: r.try_get("name").map_err(pg)?,
        provider: r.try_get("provider").map_err(pg)?,
        endpoint: r.try_get("endpoint").map_err(pg)?,
        region: r.try_get("region").map_err(pg)?,
        bucket: r.try_get("bucket").map_err(pg)?,
        prefix: r.try_get("prefix").map_err(pg)?,
        path_style: r.try_get("path_style").map_err(pg)?,
        credential_id: r.try_get("credential_id").map_err(pg)?,
    })
}

impl DestinationBackend for PgStore {
    fn put(
        &self,
        tenant: &str,
        name: &str,
        config: &crate::destination::DestinationConfig,
        credential_id: &str,
    ) -> Result<String> {
        let mut conn = self.pool.get().map_err(pg)?;
        let row = DestinationRow::new(new_destination_id(), tenant, name, config, credential_id);
        // One statement: a concurrent put of the same (tenant, name) updates
        // the row the first one made instead of failing.
        let id: String = conn
            .query_one(
                "INSERT INTO destinations (destination_id, tenant_id, name, provider, endpoint,
                     region, bucket, prefix, path_style, credential_id)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (tenant_id, name) DO UPDATE SET provider = $4, endpoint = $5,
                     region = $6, bucket = $7, prefix = $8, path_style = $9, credential_id = $10
                 RETURNING destination_id",
                &[
                    &row.destination_id,
                    &row.tenant_id,
                    &row.name,
                    &row.provider,
                    &row.endpoint,
                    &row.region,
                    &row.bucket,
                    &row.prefix,
                    &row.path_style,
                    &row.credential_id,
                ],
            )
            .map_err(pg)?
            .try_get(0)
            .map_err(pg)?;
        Ok(id)
    }

    fn get(&self, id: &str) -> Result<Option<DestinationRecord>> {
        let mut conn = self.pool.get().map_err(pg)?;
        conn.query_opt(
            "SELECT * FROM destinations WHERE destination_id = $1",
            &[&id],
        )
        .map_err(pg)?
        .as_ref()
        .map(|r| destination_row(r).and_then(DestinationRow::into_record))
        .transpose()
    }

    fn list(&self, tenant: &str) -> Result<Vec<DestinationRecord>> {
        let mut conn = self.pool.get().map_err(pg)?;
        let rows = conn
            .query(
                "SELECT * FROM destinations WHERE tenant_id = $1 ORDER BY name",
                &[&tenant],
            )
            .map_err(pg)?;
        rows.iter()
            .map(|r| destination_row(r).and_then(DestinationRow::into_record))
            .collect()
    }

    fn delete(&self, id: &str) -> Result<bool> {
        let mut conn = self.pool.get().map_err(pg)?;
        Ok(conn
            .execute("DELETE FROM destinations WHERE destination_id = $1", &[&id])
            .map_err(pg)?
            == 1)
    }
}
