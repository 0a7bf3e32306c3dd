//! Query filters, translated to one parameterised SELECT.

use rusqlite::types::Value;
use time::OffsetDateTime;

use super::{Outcome, store::COLUMNS};

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
}

impl AuditFilter {
    /// `SELECT` for events after `after_sequence` matching this filter, and its
    /// parameters. Column names are constants; values are always bound.
    pub(crate) fn to_sql(&self, after_sequence: u64, limit: Option<u32>) -> (String, Vec<Value>) {
        let mut sql = format!("SELECT {COLUMNS} FROM audit_events WHERE sequence > ?");
        // Sequences live in SQLite's i64; anything larger matches nothing.
        let mut params = vec![Value::Integer(
            i64::try_from(after_sequence).unwrap_or(i64::MAX),
        )];
        let mut push = |clause: &str, value: Value| {
            sql.push_str(" AND ");
            sql.push_str(clause);
            params.push(value);
        };
        if let Some(since) = self.since {
            push("time_unix_nanos >= ?", Value::Integer(clamp_nanos(since)));
        }
        if let Some(until) = self.until {
            push("time_unix_nanos < ?", Value::Integer(clamp_nanos(until)));
        }
        let text_filters = [
            ("identity = ?", &self.identity),
            ("tenant_id = ?", &self.tenant_id),
            ("credential_id = ?", &self.credential_id),
            ("operation = ?", &self.operation),
            ("request_id = ?", &self.request_id),
            ("lease_id = ?", &self.lease_id),
        ];
        for (clause, value) in text_filters {
            if let Some(value) = value {
                push(clause, Value::Text(value.clone()));
            }
        }
        if let Some(outcome) = self.outcome {
            push("outcome = ?", Value::Text(outcome.as_str().to_owned()));
        }
        sql.push_str(" ORDER BY sequence");
        if let Some(limit) = limit {
            sql.push_str(" LIMIT ?");
            params.push(Value::Integer(i64::from(limit)));
        }
        (sql, params)
    }
}

/// Unix nanoseconds, saturated to what the `time_unix_nanos` column can hold.
fn clamp_nanos(time: OffsetDateTime) -> i64 {
    let nanos = time.unix_timestamp_nanos();
    i64::try_from(nanos).unwrap_or(if nanos < 0 { i64::MIN } else { i64::MAX })
}
