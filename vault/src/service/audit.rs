//! `Audit` (auditor): query, follow and verify the hash-chained audit log.
//! Reading the log is itself audited.

use std::{pin::Pin, sync::Arc};

use futures_util::Stream;
use recvault_proto::vault::v1 as pb;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};

use crate::{
    audit::{AuditEvent, AuditFilter},
    core::{Subject, VaultCore},
    error::VaultError,
    policy::Role,
};

/// Events fetched per database read while streaming.
const PAGE: u32 = 500;

#[derive(Debug, Clone)]
pub struct AuditService {
    core: Arc<VaultCore>,
}

impl AuditService {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }
}

pub(crate) fn to_proto(event: AuditEvent) -> pb::AuditEvent {
    let r = event.record;
    pb::AuditEvent {
        sequence: event.sequence,
        time: Some(super::timestamp_of(r.time)),
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
    }
}

fn time_of(t: &prost_types::Timestamp, field: &str) -> Result<time::OffsetDateTime, VaultError> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .map_err(|_| VaultError::InvalidArgument(format!("filter.{field} is out of range")))
}

fn non_empty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

/// Proto filter → store filter. Unknown outcomes are refused, not ignored.
pub(crate) fn filter_of(f: Option<pb::AuditFilter>) -> Result<AuditFilter, VaultError> {
    let f = f.unwrap_or_default();
    let outcome = match f.outcome.as_str() {
        "" => None,
        o => Some(o.parse().map_err(|_| {
            VaultError::InvalidArgument(format!(
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
    })
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::AuditEvent, Status>> + Send>>;

#[tonic::async_trait]
impl pb::audit_server::Audit for AuditService {
    type QueryEventsStream = EventStream;
    type TailEventsStream = EventStream;

    async fn query_events(
        &self,
        request: Request<pb::QueryEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/QueryEvents");
        let req = request.into_inner();
        let prepared = self
            .core
            .authorize(&call, Role::Auditor, None)
            .and_then(|()| filter_of(req.filter));
        let filter = self
            .core
            .finish(&call, Subject::default(), prepared)
            .await?;
        let core = self.core.clone();
        let limit = u64::from(req.limit);
        let stream = async_stream(move |tx| async move {
            let mut after = req.after_sequence;
            let mut sent = 0u64;
            loop {
                let page = match core.audit.query(&filter, after, PAGE).await {
                    Ok(page) => page,
                    Err(e) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "reading the audit log failed: {e}"
                            ))))
                            .await;
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
        });
        Ok(Response::new(stream))
    }

    async fn tail_events(
        &self,
        request: Request<pb::TailEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/TailEvents");
        let req = request.into_inner();
        let prepared = self
            .core
            .authorize(&call, Role::Auditor, None)
            .and_then(|()| filter_of(req.filter));
        let filter = self
            .core
            .finish(&call, Subject::default(), prepared)
            .await?;
        let core = self.core.clone();
        // Subscribe before replaying so nothing committed in between is missed.
        let mut live = core.audit.subscribe();
        let start = if req.after_sequence == 0 {
            core.audit.head().0
        } else {
            req.after_sequence
        };
        let stream = async_stream(move |tx| async move {
            let mut after = start;
            // Replay (and refill after falling behind) from the database.
            let catch_up = |after: u64| {
                let core = core.clone();
                let filter = filter.clone();
                async move { core.audit.query(&filter, after, u32::MAX).await }
            };
            let mut need_catch_up = true;
            loop {
                if need_catch_up {
                    match catch_up(after).await {
                        Ok(events) => {
                            for event in events {
                                after = event.sequence;
                                if tx.send(Ok(to_proto(event))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        Err(e) => {
                            let _ = tx
                                .send(Err(Status::unavailable(format!(
                                    "reading the audit log failed: {e}"
                                ))))
                                .await;
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
                            if matches(&filter, &event) && tx.send(Ok(to_proto(event))).await.is_err() {
                                return;
                            }
                        }
                        Err(RecvError::Lagged(_)) => need_catch_up = true,
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn verify_chain(
        &self,
        request: Request<pb::VerifyChainRequest>,
    ) -> Result<Response<pb::VerifyChainResponse>, Status> {
        let call = self
            .core
            .call(&request, "recvault.vault.v1.Audit/VerifyChain");
        let result = match self.core.authorize(&call, Role::Auditor, None) {
            Ok(()) => {
                let report = self.core.audit.verify().await;
                Ok(pb::VerifyChainResponse {
                    ok: report.ok,
                    events_checked: report.events_checked,
                    first_broken_sequence: report.first_broken_sequence,
                    reason: report.reason,
                })
            }
            Err(e) => Err(e),
        };
        let subject = Subject {
            detail: result
                .as_ref()
                .map(|r| {
                    format!(
                        "ok={} checked={} first_broken={}",
                        r.ok, r.events_checked, r.first_broken_sequence
                    )
                })
                .unwrap_or_default(),
            ..Subject::default()
        };
        self.core
            .finish(&call, subject, result)
            .await
            .map(Response::new)
    }
}

/// The same test as the database query, for events arriving live.
fn matches(f: &AuditFilter, e: &AuditEvent) -> bool {
    let r = &e.record;
    let eq = |want: &Option<String>, have: &str| want.as_deref().is_none_or(|w| w == have);
    f.since.is_none_or(|t| r.time >= t)
        && f.until.is_none_or(|t| r.time < t)
        && eq(&f.identity, &r.identity)
        && eq(&f.tenant_id, &r.tenant_id)
        && eq(&f.credential_id, &r.credential_id)
        && eq(&f.operation, &r.operation)
        && f.outcome.is_none_or(|o| o == r.outcome)
        && eq(&f.request_id, &r.request_id)
        && eq(&f.lease_id, &r.lease_id)
}

/// A server stream fed by a task through a small channel (back-pressure: the
/// task waits while the client is slow).
fn async_stream<F, Fut>(produce: F) -> EventStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::AuditEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
