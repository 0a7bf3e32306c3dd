//! The shared backend: one chain in PostgreSQL that every replica appends
//! to, serialized through the database.
//!
//! Each batch is one transaction: lock the `audit_anchor` row (`FOR
//! UPDATE`, which also returns the newest head even if another replica just
//! moved it), check its MAC, chain the batch onto that head, insert it with
//! one multi-row `INSERT … SELECT FROM unnest(…)`, move the anchor, notify
//! (`pg_notify('recvault_audit', sequence)`), commit. The row lock is what
//! orders the replicas' batches: sequences stay gapless and global, so
//! `after_sequence` paging and `VerifyChain` work as on SQLite, and the
//! sequence order is the commit order of every replica (times come from
//! each replica's clock: across replicas they follow sequence order up to
//! clock skew). Each event names the replica that wrote it (`instance_id`,
//! hashed).
//!
//! Tail: a follower thread per process `LISTEN`s and reads committed events
//! from the table in sequence order, so `TailEvents` on any replica streams
//! the events of all of them (latency: one notification, typically a few
//! milliseconds; a 1 s poll covers a missed one).

use std::{
    ops::ControlFlow,
    sync::{Arc, atomic::AtomicBool},
    time::Duration,
};

use recvault_pg::{Client, PgError, PgTarget, Pool, Row};
use tokio::sync::broadcast;

use super::{
    COLUMNS, Head, Param, ReadBackend, Scanned, StoredRow, WriteBackend, chain_batch, verified_head,
};
use crate::{
    AuditError, AuditEvent, AuditFilter, AuditKey, AuditRecord, GENESIS_HASH,
    anchor::{self, Anchor},
};

/// The audit log's migrations, recorded in `audit_schema_migrations`.
const MIGRATIONS: &[(i64, &str)] = &[(1, include_str!("../../migrations/postgres/0001_audit.sql"))];

/// The notification channel of committed batches; the payload is the new head's sequence.
const CHANNEL: &str = "recvault_audit";

/// How often the follower looks without a notification.
const FOLLOW_POLL: Duration = Duration::from_secs(1);

/// Where the anchor lives, for messages.
const ANCHOR_NAME: &str = "row audit_anchor";

fn unavailable(error: impl Into<PgError>) -> AuditError {
    AuditError::Unavailable {
        reason: error.into().to_string(),
    }
}

fn read_err(error: impl Into<PgError>) -> AuditError {
    AuditError::Read {
        reason: error.into().to_string(),
    }
}

fn from_row(row: &Row) -> Result<StoredRow, recvault_pg::Error> {
    Ok(StoredRow {
        sequence: row.try_get(0)?,
        time_unix_nanos: row.try_get(1)?,
        identity: row.try_get(2)?,
        cert_fingerprint: row.try_get(3)?,
        operation: row.try_get(4)?,
        tenant_id: row.try_get(5)?,
        credential_id: row.try_get(6)?,
        lease_id: row.try_get(7)?,
        outcome: row.try_get(8)?,
        code: row.try_get(9)?,
        request_id: row.try_get(10)?,
        detail: row.try_get(11)?,
        prev_hash: row.try_get(12)?,
        hash: row.try_get(13)?,
        job_id: row.try_get(14)?,
        recording_id: row.try_get(15)?,
        destination_id: row.try_get(16)?,
        instance_id: row.try_get(17)?,
    })
}

/// `?` placeholders numbered as PostgreSQL wants them (`$1`, `$2`, …).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push_str(&format!("${n}"));
        } else {
            out.push(c);
        }
    }
    out
}

fn bound(params: &[Param]) -> Vec<Box<dyn recvault_pg::types::ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn recvault_pg::types::ToSql + Sync> {
            match p {
                Param::Int(i) => Box::new(*i),
                Param::Text(t) => Box::new(t.clone()),
            }
        })
        .collect()
}

fn head_of(sequence: i64, hash: &[u8]) -> Result<Head, AuditError> {
    let tampered = || AuditError::Tampered {
        sequence: 0,
        reason: format!("the {ANCHOR_NAME} names an impossible head (edited)"),
    };
    Ok((
        u64::try_from(sequence).map_err(|_| tampered())?,
        <[u8; 32]>::try_from(hash).map_err(|_| tampered())?,
    ))
}

/// Connects, migrates, checks the stored head against the anchor row and
/// (re)anchors it when missing. Returns the writer, the readers and the head.
pub(crate) fn open(
    target: PgTarget,
    instance_id: &str,
    key: &AuditKey,
) -> Result<(PostgresWriter, Arc<PostgresReader>, Head), AuditError> {
    let display = target.display().to_owned();
    let reader = Arc::new(PostgresReader {
        pool: Arc::new(Pool::new(target)),
    });
    recvault_pg::migrate(&reader.pool, "audit_schema_migrations", MIGRATIONS).map_err(|e| {
        AuditError::Open {
            location: display.clone(),
            reason: e.to_string(),
        }
    })?;
    let head = reader.verified_latest(key)?;
    super::check_anchor(&*reader, key, head, ANCHOR_NAME)?;
    if reader.anchor(key)?.is_none() {
        let tag = anchor::tag(
            key,
            Anchor {
                sequence: head.0,
                hash: head.1,
            },
        );
        let sequence = i64::try_from(head.0).unwrap_or(i64::MAX);
        let mut conn = reader.pool.get().map_err(unavailable)?;
        conn.execute(
            "INSERT INTO audit_anchor (id, sequence, hash, mac) VALUES (1, $1, $2, $3) \
             ON CONFLICT (id) DO NOTHING",
            &[&sequence, &&head.1[..], &tag],
        )
        .map_err(unavailable)?;
    }
    let writer = PostgresWriter {
        reader: Arc::clone(&reader),
        client: None,
        instance_id: instance_id.to_owned(),
    };
    Ok((writer, reader, head))
}

/// The writer thread's own connection (reopened after it breaks).
pub(crate) struct PostgresWriter {
    reader: Arc<PostgresReader>,
    client: Option<Client>,
    instance_id: String,
}

impl PostgresWriter {
    fn client(&mut self) -> Result<&mut Client, AuditError> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = Some(self.reader.pool.target().connect().map_err(unavailable)?);
        }
        self.client.as_mut().ok_or(AuditError::Closed)
    }

    fn write(
        &mut self,
        key: &AuditKey,
        batch: Vec<(AuditRecord, i64)>,
        fail: bool,
    ) -> Result<Vec<AuditEvent>, AuditError> {
        let instance_id = self.instance_id.clone();
        let client = self.client()?;
        let mut tx = client.transaction().map_err(unavailable)?;
        let row = tx
            .query_opt(
                "SELECT sequence, hash, mac FROM audit_anchor WHERE id = 1 FOR UPDATE",
                &[],
            )
            .map_err(unavailable)?
            .ok_or_else(|| AuditError::Tampered {
                sequence: 0,
                reason: format!(
                    "the {ANCHOR_NAME} is missing (deleted outside the service); restart a replica to re-anchor at the verified head"
                ),
            })?;
        let head = head_of(
            row.try_get(0).map_err(unavailable)?,
            row.try_get(1).map_err(unavailable)?,
        )?;
        let tag: Vec<u8> = row.try_get(2).map_err(unavailable)?;
        if !anchor::authentic(
            key,
            Anchor {
                sequence: head.0,
                hash: head.1,
            },
            &tag,
        ) {
            return Err(AuditError::Tampered {
                sequence: 0,
                reason: format!(
                    "the {ANCHOR_NAME} does not authenticate (edited, or written with another audit key)"
                ),
            });
        }
        // A statement of its own (not a join in the locking one), so it
        // reads the head as committed by the replica that moved it last.
        let floor: i64 = tx
            .query_opt(
                "SELECT time_unix_nanos FROM audit_events WHERE sequence = $1",
                &[&i64::try_from(head.0).unwrap_or(i64::MAX)],
            )
            .map_err(unavailable)?
            .map(|row| row.try_get(0))
            .transpose()
            .map_err(unavailable)?
            .unwrap_or(0);
        let events = chain_batch(key, head, floor, &instance_id, batch);
        let Some((last, _)) = events.last() else {
            return Ok(Vec::new());
        };
        let new_head = Anchor {
            sequence: last.sequence,
            hash: last.hash,
        };
        let columns = Columns::of(&events)?;
        let head_sequence = i64::try_from(new_head.sequence).unwrap_or(i64::MAX);
        let head_tag = anchor::tag(key, new_head);
        tx.execute(
            &format!(
                "WITH inserted AS ( \
                     INSERT INTO audit_events ({COLUMNS}) \
                     SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
                         $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
                         $11::text[], $12::text[], $13::bytea[], $14::bytea[], $15::text[], \
                         $16::text[], $17::text[], $18::text[])), \
                 anchored AS ( \
                     UPDATE audit_anchor SET sequence = $19::bigint, hash = $20, mac = $21 WHERE id = 1) \
                 SELECT pg_notify('{CHANNEL}', ($19::bigint)::text)"
            ),
            &[
                &columns.sequence,
                &columns.time,
                &columns.text[0],
                &columns.text[1],
                &columns.text[2],
                &columns.text[3],
                &columns.text[4],
                &columns.text[5],
                &columns.text[6],
                &columns.text[7],
                &columns.text[8],
                &columns.text[9],
                &columns.prev_hash,
                &columns.hash,
                &columns.text[10],
                &columns.text[11],
                &columns.text[12],
                &columns.text[13],
                &head_sequence,
                &&new_head.hash[..],
                &head_tag,
            ],
        )
        .map_err(unavailable)?;
        if fail {
            // Dropping `tx` rolls back, exactly as after a failed COMMIT.
            return Err(AuditError::Unavailable {
                reason: "write failure injected by fail_writes".into(),
            });
        }
        tx.commit().map_err(unavailable)?;
        Ok(events.into_iter().map(|(event, _)| event).collect())
    }
}

/// A batch as column arrays, for the one `unnest` insert.
struct Columns<'a> {
    sequence: Vec<i64>,
    time: Vec<i64>,
    /// identity … detail (10), then job_id, recording_id, destination_id, instance_id.
    text: [Vec<&'a str>; 14],
    prev_hash: Vec<&'a [u8]>,
    hash: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    fn of(events: &'a [(AuditEvent, i64)]) -> Result<Self, AuditError> {
        let n = events.len();
        let mut columns = Columns {
            sequence: Vec::with_capacity(n),
            time: Vec::with_capacity(n),
            text: std::array::from_fn(|_| Vec::with_capacity(n)),
            prev_hash: Vec::with_capacity(n),
            hash: Vec::with_capacity(n),
        };
        for (event, nanos) in events {
            let r = &event.record;
            columns
                .sequence
                .push(
                    i64::try_from(event.sequence).map_err(|_| AuditError::Unavailable {
                        reason: "the audit sequence outgrew 63 bits".into(),
                    })?,
                );
            columns.time.push(*nanos);
            let fields: [&'a str; 14] = [
                &r.identity,
                &r.cert_fingerprint,
                &r.operation,
                &r.tenant_id,
                &r.credential_id,
                &r.lease_id,
                r.outcome.as_str(),
                &r.code,
                &r.request_id,
                &r.detail,
                &r.job_id,
                &r.recording_id,
                &r.destination_id,
                &event.instance_id,
            ];
            for (column, field) in columns.text.iter_mut().zip(fields) {
                column.push(field);
            }
            columns.prev_hash.push(&event.prev_hash);
            columns.hash.push(&event.hash);
        }
        Ok(columns)
    }
}

impl WriteBackend for PostgresWriter {
    fn commit(
        &mut self,
        key: &AuditKey,
        _cached: Option<Head>,
        batch: Vec<(AuditRecord, i64)>,
        fail: bool,
    ) -> Result<Vec<AuditEvent>, AuditError> {
        // Other replicas append too: the head is always the anchor's,
        // read under its row lock.
        let result = self.write(key, batch, fail);
        if result.is_err() && self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        result
    }

    fn feeds_tail(&self) -> bool {
        false
    }
}

/// Pooled connections for queries, verification and the follower.
#[derive(Debug)]
pub(crate) struct PostgresReader {
    pool: Arc<Pool>,
}

impl PostgresReader {
    /// Readers of an existing log (offline verify and export): no migration.
    pub(crate) fn new(target: PgTarget) -> Self {
        Self {
            pool: Arc::new(Pool::new(target)),
        }
    }

    /// The last stored event, its hash checked.
    fn verified_latest(&self, key: &AuditKey) -> Result<Head, AuditError> {
        let mut conn = self.pool.get().map_err(read_err)?;
        let row = conn
            .query_opt(
                &format!("SELECT {COLUMNS} FROM audit_events ORDER BY sequence DESC LIMIT 1"),
                &[],
            )
            .map_err(read_err)?;
        match row {
            None => Ok((0, GENESIS_HASH)),
            Some(row) => verified_head(key, &from_row(&row).map_err(read_err)?),
        }
    }

    /// Events with `after < sequence <= through`, in order.
    fn events_between(&self, after: u64, through: u64) -> Result<Vec<AuditEvent>, AuditError> {
        let mut conn = self.pool.get().map_err(read_err)?;
        let (after, through) = (
            i64::try_from(after).unwrap_or(i64::MAX),
            i64::try_from(through).unwrap_or(i64::MAX),
        );
        let rows = conn
            .query(
                &format!(
                    "SELECT {COLUMNS} FROM audit_events WHERE sequence > $1 AND sequence <= $2 \
                     ORDER BY sequence LIMIT 4096"
                ),
                &[&after, &through],
            )
            .map_err(read_err)?;
        rows.iter()
            .map(|row| from_row(row).map_err(read_err)?.into_event())
            .collect()
    }
}

impl ReadBackend for PostgresReader {
    fn query(
        &self,
        filter: &AuditFilter,
        after: u64,
        limit: Option<u32>,
        each: &mut dyn FnMut(AuditEvent) -> Result<(), AuditError>,
    ) -> Result<(), AuditError> {
        let (sql, params) = filter.to_sql(after, limit, "");
        let params = bound(&params);
        let mut conn = self.pool.get().map_err(read_err)?;
        let mut rows = conn
            .query_raw(
                &numbered(&sql),
                params
                    .iter()
                    .map(|p| &**p as &(dyn recvault_pg::types::ToSql + Sync)),
            )
            .map_err(read_err)?;
        while let Some(row) = fallible_next(&mut rows)? {
            each(from_row(&row).map_err(read_err)?.into_event()?)?;
        }
        Ok(())
    }

    fn scan(&self, each: &mut dyn FnMut(Scanned) -> ControlFlow<()>) -> Result<(), AuditError> {
        let mut conn = self.pool.get().map_err(read_err)?;
        // One snapshot for the whole walk (replicas keep appending), and no
        // statement timeout: a long log takes as long as it takes.
        let mut tx = conn
            .build_transaction()
            .read_only(true)
            .isolation_level(recvault_pg::IsolationLevel::RepeatableRead)
            .start()
            .map_err(read_err)?;
        tx.batch_execute("SET LOCAL statement_timeout = 0")
            .map_err(read_err)?;
        let empty: [&(dyn recvault_pg::types::ToSql + Sync); 0] = [];
        let mut rows = tx
            .query_raw(
                &format!("SELECT {COLUMNS} FROM audit_events ORDER BY sequence"),
                empty,
            )
            .map_err(read_err)?;
        while let Some(row) = fallible_next(&mut rows)? {
            let scanned = match from_row(&row) {
                Ok(stored) => Scanned::Row(Box::new(stored)),
                Err(e) => Scanned::Undecodable {
                    sequence: row.try_get(0).map_err(read_err)?,
                    reason: e.to_string(),
                },
            };
            if each(scanned).is_break() {
                break;
            }
        }
        drop(rows);
        tx.commit().map_err(read_err)
    }

    fn anchor(&self, key: &AuditKey) -> Result<Option<Anchor>, AuditError> {
        let mut conn = self.pool.get().map_err(read_err)?;
        let Some(row) = conn
            .query_opt(
                "SELECT sequence, hash, mac FROM audit_anchor WHERE id = 1",
                &[],
            )
            .map_err(read_err)?
        else {
            return Ok(None);
        };
        let head = head_of(
            row.try_get(0).map_err(read_err)?,
            row.try_get(1).map_err(read_err)?,
        )?;
        let tag: Vec<u8> = row.try_get(2).map_err(read_err)?;
        let anchored = Anchor {
            sequence: head.0,
            hash: head.1,
        };
        if !anchor::authentic(key, anchored, &tag) {
            return Err(AuditError::Tampered {
                sequence: 0,
                reason: format!(
                    "the {ANCHOR_NAME} does not authenticate (edited, or written with another audit key)"
                ),
            });
        }
        Ok(Some(anchored))
    }

    fn has_anchor(&self) -> bool {
        self.pool.get().is_ok_and(|mut conn| {
            conn.query_opt("SELECT 1 FROM audit_anchor WHERE id = 1", &[])
                .is_ok_and(|row| row.is_some())
        })
    }

    fn stored_hash(&self, sequence: u64) -> Result<Option<Vec<u8>>, AuditError> {
        let sequence = i64::try_from(sequence).map_err(|_| AuditError::Tampered {
            sequence,
            reason: "sequence out of range".into(),
        })?;
        let mut conn = self.pool.get().map_err(read_err)?;
        conn.query_opt(
            "SELECT hash FROM audit_events WHERE sequence = $1",
            &[&sequence],
        )
        .map_err(read_err)?
        .map(|row| row.try_get(0).map_err(read_err))
        .transpose()
    }
}

fn fallible_next(rows: &mut recvault_pg::RowIter<'_>) -> Result<Option<Row>, AuditError> {
    use recvault_pg::FallibleIterator as _;
    rows.next().map_err(read_err)
}

/// Follows the table for `TailEvents`: every committed event of every
/// replica, in sequence order, onto `events_tx`; `on_seen` gets the newest
/// sequence known committed. Stops within a second of `stop`.
pub(crate) fn follow(
    reader: Arc<PostgresReader>,
    start: u64,
    events_tx: broadcast::Sender<AuditEvent>,
    on_seen: impl Fn(u64) + Send + 'static,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    let mut seen = start;
    let pool = Arc::clone(&reader.pool);
    recvault_pg::listen(
        "audit-follow",
        pool,
        CHANNEL,
        FOLLOW_POLL,
        stop,
        move |payloads| {
            let newest = payloads.iter().filter_map(|p| p.parse::<u64>().ok()).max();
            if events_tx.receiver_count() == 0 {
                // Nobody tails: only keep the newest sequence current.
                if let Some(n) = newest.filter(|n| *n > seen) {
                    seen = n;
                    on_seen(n);
                }
                return;
            }
            if newest.is_some_and(|n| n <= seen) {
                return;
            }
            // Read what was committed after `seen` (on a timeout too: a
            // notification can be lost while reconnecting).
            while let Ok(page) = reader.events_between(seen, u64::MAX) {
                let Some(last) = page.last() else {
                    break;
                };
                let full = page.len() >= 4096;
                seen = last.sequence;
                on_seen(seen);
                for event in page {
                    let _ = events_tx.send(event);
                }
                if !full {
                    break;
                }
            }
        },
    )
}
