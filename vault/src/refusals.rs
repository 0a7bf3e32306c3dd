//! Audits vault RPCs that end before any handler runs.
//!
//! Every handler writes its own audit event (see [`crate::core::VaultCore::finish`]).
//! Some calls never reach a handler: tonic refuses a message over the size cap
//! (`RESOURCE_EXHAUSTED`, see `recvault_runtime::oversized`) or one that does not decode (`INTERNAL`), and a method that
//! does not exist gets `UNIMPLEMENTED` from the router. They are still accesses
//! to the vault, so this layer, around every service, writes the event for
//! them: operation from the request path, the peer's identity and certificate
//! fingerprint, the request id, and the gRPC code, with outcome `error`.
//!
//! How it knows: it puts a [`HandlerReached`] flag into the request's
//! extensions; [`crate::core::VaultCore::call`], which every handler runs first,
//! sets it. A response that carries a non-OK `grpc-status` in its headers
//! (tonic's "trailers-only" error answer) for a request whose flag is still
//! clear was refused before a handler: that is the one this layer audits.
//! Health and reflection (outside `recvault.vault.v1`) are not audited.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll},
};

use recvault_audit::{AuditRecord, Outcome};
use recvault_runtime::{identity, logging::REQUEST_ID_HEADER};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

use crate::{core::VaultCore, error::code_name};

/// Path prefix of the vault's own services.
const VAULT_PATH_PREFIX: &str = "/recvault.vault.v1.";

/// Set by [`VaultCore::call`] when a handler starts on the request.
#[derive(Debug, Clone, Default)]
pub struct HandlerReached(Arc<AtomicBool>);

impl HandlerReached {
    pub fn mark(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    fn reached(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The layer; add it with `Server::builder().layer(...)`.
#[derive(Debug, Clone)]
pub struct AuditRefusalsLayer {
    core: Arc<VaultCore>,
}

impl AuditRefusalsLayer {
    pub fn new(core: Arc<VaultCore>) -> Self {
        Self { core }
    }
}

impl<S> tower::Layer<S> for AuditRefusalsLayer {
    type Service = AuditRefusals<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuditRefusals {
            inner,
            core: self.core.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct AuditRefusals<S> {
    inner: S,
    core: Arc<VaultCore>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> tower::Service<http::Request<B>> for AuditRefusals<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    R: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(operation) = request.uri().path().strip_prefix('/') else {
            return Box::pin(inner.call(request));
        };
        if !request.uri().path().starts_with(VAULT_PATH_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let operation = operation.to_owned();
        let reached = HandlerReached::default();
        request.extensions_mut().insert(reached.clone());
        let peer = request
            .extensions()
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .cloned();
        let request_id = request
            .headers()
            .get(REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let core = self.core.clone();
        Box::pin(async move {
            let response = inner.call(request).await?;
            if !reached.reached()
                && let Some(code) = refused_with(&response)
            {
                let record = AuditRecord {
                    identity: peer
                        .as_ref()
                        .and_then(identity::connection_identity)
                        .map_or_else(|| "unauthenticated".into(), |p| p.id),
                    cert_fingerprint: peer
                        .as_ref()
                        .and_then(identity::connection_fingerprint)
                        .unwrap_or_default(),
                    request_id: request_id
                        .filter(|v| recvault_runtime::logging::valid_request_id(v))
                        .unwrap_or_else(recvault_runtime::logging::new_request_id),
                    detail: "refused before the handler ran".into(),
                    ..AuditRecord::now(operation.as_str(), Outcome::Error, code_name(code))
                };
                core.audit_refusal(record).await;
            }
            Ok(response)
        })
    }
}

/// The gRPC code of a trailers-only error answer (`grpc-status` in the
/// headers), if that is what `response` is.
fn refused_with<R>(response: &http::Response<R>) -> Option<tonic::Code> {
    let status = response.headers().get("grpc-status")?.to_str().ok()?;
    let code = tonic::Code::from(status.parse::<i32>().ok()?);
    (code != tonic::Code::Ok).then_some(code)
}

/// Operation name of the audit events for refused TLS handshakes.
pub const HANDSHAKE_OPERATION: &str = "tls/Handshake";

/// Most distinct (peer address, reason) pairs held per window; refusals from
/// further peers are summed into one "other peers" event per reason, so a
/// flood from many addresses cannot grow memory or the log without bound.
pub const MAX_HANDSHAKE_PEERS: usize = 1024;

/// Refused TLS handshakes, audited in aggregate: the listener hands every
/// refusal to [`HandshakeAudit::record`], and each window one event per peer
/// address and reason is written (outcome `denied`, code `UNAUTHENTICATED`,
/// detail `peer=<ip> reason=<reason> refused=<n> window=<s>s`). A peer that
/// retries a bad certificate a thousand times a second costs one event per
/// window, not a thousand.
#[derive(Debug, Default)]
pub struct HandshakeAudit {
    pending:
        std::sync::Mutex<std::collections::BTreeMap<(Option<std::net::IpAddr>, &'static str), u64>>,
}

impl HandshakeAudit {
    /// Counts one refusal (never blocks on I/O).
    pub fn record(&self, peer: std::net::SocketAddr, reason: &'static str) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut key = (Some(peer.ip()), reason);
        if !pending.contains_key(&key) && pending.len() >= MAX_HANDSHAKE_PEERS {
            key = (None, reason);
        }
        *pending.entry(key).or_default() += 1;
    }

    /// Writes one event per (peer, reason) counted since the last flush.
    pub async fn flush(&self, core: &VaultCore, window: std::time::Duration) {
        let drained = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()));
        for ((ip, reason), count) in drained {
            let peer = ip.map_or_else(
                || format!("other (more than {MAX_HANDSHAKE_PEERS} peers in the window)"),
                |ip| ip.to_string(),
            );
            let record = AuditRecord {
                identity: "unauthenticated".into(),
                request_id: recvault_runtime::logging::new_request_id(),
                detail: format!(
                    "peer={peer} reason={reason} refused={count} window={}s",
                    window.as_secs()
                ),
                ..AuditRecord::now(HANDSHAKE_OPERATION, Outcome::Denied, "UNAUTHENTICATED")
            };
            core.audit_refusal(record).await;
        }
    }

    /// Flushes every `window` until the returned task is aborted.
    pub fn spawn_flusher(
        self: &Arc<Self>,
        core: Arc<VaultCore>,
        window: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(window);
            tick.tick().await;
            loop {
                tick.tick().await;
                this.flush(&core, window).await;
            }
        })
    }
}
