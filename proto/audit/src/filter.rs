//! Query filters, translated to one parameterised SELECT, and the same test
//! for events arriving live (TailEvents).

use time::OffsetDateTime;

use super::{
    AuditEvent, Outcome,
    store::{COLUMNS, Param},
};

/// Which events a query or export returns: every set field must match exactly
/// (AND). Times are `since <= time < until`. Results are in sequence order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Earliest event time, inclusive.
    pub since: Option<OffsetDateTime>,
    /// Latest event time, exclusive.
    pub until: Option<OffsetDateTime>,
    /// Peer identity.
    pub identity: Option<String>,
    /// Tenant.
    pub tenant_id: Option<String>,
    /// Credential id.
    pub credential_id: Option<String>,
    /// Full gRPC method name.
    pub operation: Option<String>,
    /// Outcome.
    pub outcome: Option<Outcome>,
    /// `x-request-id`.
    pub request_id: Option<String>,
    /// Lease id.
    pub lease_id: Option<String>,
    /// Uploader job id.
    pub job_id: Option<String>,
    /// Recording id.
    pub recording_id: Option<String>,
    /// Destination id.
    pub destination_id: Option<String>,
}

impl AuditFilter {
    /// Whether `event` matches: the same test as the database query, for
    /// events that arrive live instead of from a SELECT.
    pub fn matches(&self, event: &AuditEvent) -> bool {
        let r = &event.record;
        let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
        self.since.is_none_or(|t| r.time >= t)
            && self.until.is_none_or(|t| r.time < t)
            && eq(&self.identity, &r.identity)
            && eq(&self.tenant_id, &r.tenant_id)
            && eq(&self.credential_id, &r.credential_id)
            && eq(&self.operation, &r.operation)
            && self.outcome.is_none_or(|o| o == r.outcome)
            && eq(&self.request_id, &r.request_id)
            && eq(&self.lease_id, &r.lease_id)
            && eq(&self.job_id, &r.job_id)
            && eq(&self.recording_id, &r.recording_id)
            && eq(&self.destination_id, &r.destination_id)
    }

    /// `SELECT` for events after `after_sequence` matching this filter, and its
    /// parameters, with `?` placeholders (the PostgreSQL backend numbers
    /// them). Column names are constants; values are always bound.
    ///
    /// `time_index` is what the backend puts after the inner `FROM
    /// audit_events` when the filter has a time window: SQLite, without
    /// statistics, would rather walk the primary key to the end of the table
    /// (to avoid a sort) than read the window from the time index, so its
    /// backend names the index (`INDEXED BY audit_events_time`).
    pub(crate) fn to_sql(
        &self,
        after_sequence: u64,
        limit: Option<u32>,
        time_index: &str,
    ) -> (String, Vec<Param>) {
        // The matching sequences are chosen first (from an index alone where
        // one covers the filter: a time window reads only the time index,
        // which holds the sequence), and only the page's rows are read whole.
        // Sorting whole rows of a busy hour for every page cost 10× more.
        let hint = if self.since.is_some() || self.until.is_some() {
            time_index
        } else {
            ""
        };
        let mut sql = format!("SELECT sequence FROM audit_events {hint} WHERE sequence > ?");
        // Sequences are stored as i64; anything larger matches nothing.
        let mut params = vec![Param::Int(
            i64::try_from(after_sequence).unwrap_or(i64::MAX),
        )];
        let mut push = |clause: &str, value: Param| {
            sql.push_str(" AND ");
            sql.push_str(clause);
            params.push(value);
        };
        if let Some(since) = self.since {
            push("time_unix_nanos >= ?", Param::Int(clamp_nanos(since)));
        }
        if let Some(until) = self.until {
            push("time_unix_nanos < ?", Param::Int(clamp_nanos(until)));
        }
        let text_filters = [
            ("identity = ?", &self.identity),
            ("tenant_id = ?", &self.tenant_id),
            ("credential_id = ?", &self.credential_id),
            ("operation = ?", &self.operation),
            ("request_id = ?", &self.request_id),
            ("lease_id = ?", &self.lease_id),
            ("job_id = ?", &self.job_id),
            ("recording_id = ?", &self.recording_id),
            ("destination_id = ?", &self.destination_id),
        ];
        for (clause, value) in text_filters {
            if let Some(value) = value {
                push(clause, Param::Text(value.clone()));
            }
        }
        if let Some(outcome) = self.outcome {
            push("outcome = ?", Param::Text(outcome.as_str().to_owned()));
        }
        sql.push_str(" ORDER BY sequence");
        if let Some(limit) = limit {
            sql.push_str(" LIMIT ?");
            params.push(Param::Int(i64::from(limit)));
        }
        let sql = format!(
            "SELECT {COLUMNS} FROM audit_events WHERE sequence IN ({sql}) ORDER BY sequence"
        );
        (sql, params)
    }
}

/// Unix nanoseconds, saturated to what the `time_unix_nanos` column can hold.
fn clamp_nanos(time: OffsetDateTime) -> i64 {
    let nanos = time.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}
