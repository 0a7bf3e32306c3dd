//! What every `Audit` gRPC service shares (the vault's `recvault.vault.v1.Audit`
//! and the uploader's `recvault.uploader.v1.Audit` answer with the same
//! messages): who is calling, proto ↔ store conversions, the QueryEvents
//! paging stream, the TailEvents follower and the VerifyChain answer.
//!
//! Authorization and the event a service writes about the call itself stay
//! in that service: a handler authorizes, audits its own call (fail closed),
//! then hands the parsed request to the functions here.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use recvault_proto::vault::v1 as pb;
use recvault_runtime::{identity, logging};
use tokio::sync::broadcast::error::RecvError;
use tonic::{Code, Request, Status};

use crate::{AuditError, AuditEvent, AuditFilter, AuditLog, AuditRecord, Outcome};

/// Events fetched per database read while streaming.
const PAGE: u32 = 500;

/// Events buffered between a stream's producer task and the client.
const STREAM_BUFFER: usize = 64;

/// A server stream of audit events, as both services' `Audit` traits expect.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

/// Who is calling and which RPC: taken once at the start of every handler,
/// before anything can fail, so that even an anonymous peer is audited.
#[derive(Debug, Clone)]
pub struct Call {
    /// Full gRPC method, e.g. `recvault.uploader.v1.Audit/QueryEvents`.
    pub operation: &'static str,
    /// The client certificate's identity (URI SAN, else DNS SAN), if any.
    pub identity: Option<String>,
    /// Hex SHA-256 of the client's leaf certificate, or empty.
    pub cert_fingerprint: String,
    /// The call's `x-request-id` (generated if the client sent none).
    pub request_id: String,
}

impl Call {
    /// Reads the peer and request id of `request`. Never fails.
    pub fn of<T>(request: &Request<T>, operation: &'static str) -> Self {
        let peer = identity::peer_identity(request);
        Self {
            operation,
            cert_fingerprint: peer
                .as_ref()
                .map(|p| p.cert_sha256.clone())
                .or_else(|| identity::peer_fingerprint(request))
                .unwrap_or_default(),
            identity: peer.map(|p| p.id),
            request_id: logging::request_id(request),
        }
    }

    /// The event for this call answered with `code`, every subject field
    /// (tenant, ids, detail) empty: fill them with struct update syntax.
    pub fn record(&self, code: Code) -> AuditRecord {
        AuditRecord {
            identity: self
                .identity
                .clone()
                .unwrap_or_else(|| "unauthenticated".into()),
            cert_fingerprint: self.cert_fingerprint.clone(),
            request_id: self.request_id.clone(),
            ..AuditRecord::now(self.operation, outcome_of(code), code_name(code))
        }
    }
}

/// The outcome an answer with `code` is recorded as: OK is allowed, an
/// authorization refusal is denied, anything else failed after authorization.
pub fn outcome_of(code: Code) -> Outcome {
    match code {
        Code::Ok => Outcome::Allowed,
        Code::PermissionDenied | Code::Unauthenticated => Outcome::Denied,
        _ => Outcome::Error,
    }
}

/// The canonical upper-case name of a code, as written into audit events
/// and metrics labels.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Store event → proto event.
pub fn to_proto(event: AuditEvent) -> pb::AuditEvent {
    let r = event.record;
    pb::AuditEvent {
        sequence: event.sequence,
        time: Some(prost_types::Timestamp {
            seconds: r.time.unix_timestamp(),
            nanos: i32::try_from(r.time.nanosecond()).unwrap_or(0),
        }),
        identity: r.identity,
        operation: r.operation,
        tenant_id: r.tenant_id,
        credential_id: r.credential_id,
        lease_id: r.lease_id,
        outcome: r.outcome.as_str().to_owned(),
        code: r.code,
        request_id: r.request_id,
        prev_hash: event.prev_hash.to_vec(),
        hash: event.hash.to_vec(),
        cert_fingerprint: r.cert_fingerprint,
        detail: r.detail,
        job_id: r.job_id,
        recording_id: r.recording_id,
        destination_id: r.destination_id,
        instance_id: event.instance_id,
    }
}

/// A request's filter cannot be used; the message names the field. Services
/// answer it with `INVALID_ARGUMENT` through their own error mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidFilter(String);

fn time_of(t: &prost_types::Timestamp, field: &str) -> Result<time::OffsetDateTime, InvalidFilter> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|_| InvalidFilter(format!("filter.{field} is out of range")))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Proto filter → store filter. Unknown outcomes are refused, not ignored
/// (a typo must not silently widen a query to every event).
pub fn filter_of(f: Option<pb::AuditFilter>) -> Result<AuditFilter, InvalidFilter> {
    let f = f.unwrap_or_default();
    let outcome = match f.outcome.as_str() {
        "" => None,
        o => Some(o.parse().map_err(|_| {
            InvalidFilter(format!(
                "filter.outcome {o:?} is not one of allowed, denied, error"
            ))
        })?),
    };
    Ok(AuditFilter {
        since: f.since.as_ref().map(|t| time_of(t, "since")).transpose()?,
        until: f.until.as_ref().map(|t| time_of(t, "until")).transpose()?,
        identity: non_empty(f.identity),
        tenant_id: non_empty(f.tenant_id),
        credential_id: non_empty(f.credential_id),
        operation: non_empty(f.operation),
        outcome,
        request_id: non_empty(f.request_id),
        lease_id: non_empty(f.lease_id),
        job_id: non_empty(f.job_id),
        recording_id: non_empty(f.recording_id),
        destination_id: non_empty(f.destination_id),
    })
}

/// The status a stream ends with when the log cannot be read mid-stream.
fn read_failed(error: &AuditError) -> Status {
    Status::unavailable(format!("reading the audit log failed: {error}"))
}

/// `QueryEvents`: the events after `after_sequence` matching `filter`, in
/// sequence order, at most `limit` (0: all), read page by page so that a
/// long history never sits in memory at once.
pub fn query_events(
    log: Arc<AuditLog>,
    filter: AuditFilter,
    after_sequence: u64,
    limit: u32,
) -> EventStream {
    let limit = u64::from(limit);
    event_stream(move |tx| async move {
        let mut after = after_sequence;
        let mut sent = 0u64;
        loop {
            let page = match log.query(&filter, after, PAGE).await {
                Ok(page) => page,
                Err(e) => {
                    let _ = tx.send(Err(read_failed(&e))).await;
                    return;
                }
            };
            let done = page.len() < PAGE as usize;
            for event in page {
                after = event.sequence;
                if tx.send(Ok(to_proto(event))).await.is_err() {
                    return;
                }
                sent += 1;
                if limit != 0 && sent >= limit {
                    return;
                }
            }
            if done {
                return;
            }
        }
    })
}

/// `TailEvents`: replays the matching events after `after_sequence` (0:
/// from the newest on), then follows new ones as they become durable, until
/// the client goes away. A follower that falls behind the live feed refills
/// from the database, so it never skips an event.
pub fn tail_events(log: Arc<AuditLog>, filter: AuditFilter, after_sequence: u64) -> EventStream {
    // Subscribe before replaying so nothing committed in between is missed.
    let mut live = log.subscribe();
    let start = if after_sequence == 0 {
        log.newest_sequence()
    } else {
        after_sequence
    };
    event_stream(move |tx| async move {
        let mut after = start;
        let mut need_catch_up = true;
        loop {
            if need_catch_up {
                match log.query(&filter, after, u32::MAX).await {
                    Ok(events) => {
                        for event in events {
                            after = event.sequence;
                            if tx.send(Ok(to_proto(event))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(read_failed(&e))).await;
                        return;
                    }
                }
                need_catch_up = false;
            }
            tokio::select! {
                () = tx.closed() => return,
                received = live.recv() => match received {
                    Ok(event) if event.sequence <= after => {}
                    Ok(event) => {
                        if event.sequence != after + 1 {
                            need_catch_up = true;
                            continue;
                        }
                        after = event.sequence;
                        if filter.matches(&event) && tx.send(Ok(to_proto(event))).await.is_err() {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => need_catch_up = true,
                    Err(RecvError::Closed) => return,
                },
            }
        }
    })
}

/// `VerifyChain`: checks the whole chain (and the head this process committed).
pub async fn verify_chain(log: &AuditLog) -> pb::VerifyChainResponse {
    let report = log.verify().await;
    pb::VerifyChainResponse {
        ok: report.ok,
        events_checked: report.events_checked,
        first_broken_sequence: report.first_broken_sequence,
        reason: report.reason,
    }
}

/// The `detail` of the event a service writes about its own VerifyChain call.
pub fn verify_detail(response: &pb::VerifyChainResponse) -> String {
    format!(
        "ok={} checked={} first_broken={}",
        response.ok, response.events_checked, response.first_broken_sequence
    )
}

/// A server stream fed by a task through a small channel (back-pressure: the
/// task waits while the client is slow).
fn event_stream<F, Fut>(produce: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::AuditEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
