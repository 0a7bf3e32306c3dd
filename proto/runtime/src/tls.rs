//! mTLS for every API port: TLS 1.3 only, a client certificate is required and
//! verified against the configured client CA. Certificate, key and CA files are
//! re-read when they change; new handshakes use the new files, established
//! connections keep theirs. Never `{:?}` a key: this module holds paths, and
//! key bytes live only inside rustls.

use std::{
    fs, io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::{Duration, SystemTime},
};

use rustls::{
    RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;

/// Which files make up one side's TLS identity and trust.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct TlsFiles {
    /// PEM certificate chain presented to peers (leaf first).
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, SEC1 or PKCS#1). Must not be group/world readable.
    pub key: PathBuf,
    /// PEM CA bundle that peers' certificates must chain to.
    pub ca: PathBuf,
}

/// TLS set-up errors. Messages name the file and what to do; never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A file could not be read.
    #[error("cannot read {what} file {path}: {source}; check the path in the config")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// A file held no usable PEM item.
    #[error("{what} file {path} contains no {expected}; expected a PEM file")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    /// A certificate in the CA file is not a usable trust anchor.
    #[error("CA file {path} holds a certificate rustls cannot use as a trust anchor: {reason}")]
    BadCa { path: PathBuf, reason: String },
    /// rustls refused the material (mismatched key, unsupported algorithm, bad CA).
    #[error("TLS configuration from {cert} / {key} / {ca} is not usable: {reason}")]
    Config {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        reason: String,
    },
}

/// Installs aws-lc-rs as the process-wide rustls provider. Idempotent; call at start-up.
pub fn install_crypto_provider() {
    // An Err only means a provider is already installed, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

fn read_file(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn load_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(what, path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_owned(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = zeroize::Zeroizing::new(read_file("private key", path)?);
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Read {
            what: "private key",
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            what: "private key",
            path: path.to_owned(),
            expected: "PRIVATE KEY",
        })
}

fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in load_certs("CA", path)? {
        roots.add(cert).map_err(|e| TlsError::BadCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn config_error(files: &TlsFiles, reason: impl ToString) -> TlsError {
    TlsError::Config {
        cert: files.cert.clone(),
        key: files.key.clone(),
        ca: files.ca.clone(),
        reason: reason.to_string(),
    }
}

const H2: &[u8] = b"h2";

/// Builds a server config: TLS 1.3 only, client certificate required.
pub fn server_config(files: &TlsFiles) -> Result<ServerConfig, TlsError> {
    let roots = load_roots(&files.ca)?;
    let verifier = WebPkiClientVerifier::builder(roots)
        .build()
        .map_err(|e| config_error(files, e))?;
    let mut config = ServerConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            load_certs("certificate", &files.cert)?,
            load_key(&files.key)?,
        )
        .map_err(|e| config_error(files, e))?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// Builds a client config: TLS 1.3 only, presents our certificate, trusts only `files.ca`.
pub fn client_config(files: &TlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let roots = load_roots(&files.ca)?;
    let mut config =
        rustls::ClientConfig::builder_with_protocol_versions(&[&rustls::version::TLS13])
            .with_root_certificates(roots)
            .with_client_auth_cert(
                load_certs("certificate", &files.cert)?,
                load_key(&files.key)?,
            )
            .map_err(|e| config_error(files, e))?;
    config.alpn_protocols = vec![H2.to_vec()];
    Ok(config)
}

/// A server TLS config that follows its files: `current()` is what the next
/// handshake uses. A failed reload keeps the previous, working config and logs why.
#[derive(Debug)]
pub struct ReloadingServerTls {
    files: TlsFiles,
    state: RwLock<(Arc<ServerConfig>, Stamp)>,
}

/// Modification times and lengths of the three files, to notice a change.
type Stamp = Vec<Option<(SystemTime, u64)>>;

fn stamp(files: &TlsFiles) -> Stamp {
    [&files.cert, &files.key, &files.ca]
        .iter()
        .map(|p| {
            fs::metadata(p)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.len())))
        })
        .collect()
}

impl ReloadingServerTls {
    /// Loads the files once; fails if they are not usable now.
    pub fn load(files: TlsFiles) -> Result<Arc<Self>, TlsError> {
        let seen = stamp(&files);
        let config = Arc::new(server_config(&files)?);
        Ok(Arc::new(Self {
            files,
            state: RwLock::new((config, seen)),
        }))
    }

    /// The config for the next handshake.
    pub fn current(&self) -> Arc<ServerConfig> {
        self.state
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .0
            .clone()
    }

    /// Re-reads the files if any changed. Returns true when a new config took effect.
    pub fn reload_if_changed(&self) -> bool {
        let now = stamp(&self.files);
        if self.state.read().unwrap_or_else(|p| p.into_inner()).1 == now {
            return false;
        }
        match server_config(&self.files) {
            Ok(config) => {
                *self.state.write().unwrap_or_else(|p| p.into_inner()) = (Arc::new(config), now);
                tracing::info!(cert = %self.files.cert.display(), "TLS certificate, key or CA reloaded");
                true
            }
            Err(error) => {
                // Files may be mid-rotation (cert written, key not yet): try again next tick.
                tracing::warn!(%error, "TLS files changed but are not usable yet; keeping the previous configuration");
                false
            }
        }
    }

    /// Polls the files every `interval` until the task is dropped. Polling (rather
    /// than inotify) also sees Kubernetes' atomic symlink swaps of mounted Secrets.
    pub fn spawn_reloader(self: &Arc<Self>, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                this.reload_if_changed();
            }
        })
    }
}

/// How long a peer may take to finish the TLS handshake before it is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Accepts TCP connections and completes TLS handshakes off the accept loop, so
/// one slow or hostile peer cannot stall others. Failed handshakes (no client
/// certificate, wrong CA, TLS 1.2) are logged at debug and dropped. The stream
/// feeds `tonic::transport::Server::serve_with_incoming*`.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingServerTls>,
    refusals: HandshakeRefusals,
) -> ReceiverStream<io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            if tx.is_closed() {
                return;
            }
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            let refusals = refusals.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = tx.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => refusals.refused(peer, refusal_reason(&error), &error),
                    Err(_) => refusals.refused(peer, "timeout", &"no handshake within 10 s"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Counts and logs TLS handshakes a service refused, per reason
/// (`no_certificate`, `unknown_ca`, `expired`, `bad_certificate`,
/// `protocol_version`, `timeout`, `other`), as the counter `name{reason}`,
/// and hands each refusal to an optional sink (the vault audits them).
#[derive(Clone)]
pub struct HandshakeRefusals {
    registry: Arc<crate::metrics::Registry>,
    name: &'static str,
    sink: Option<RefusalSink>,
}

/// Called with the peer and the reason of every refused handshake; must not block.
pub type RefusalSink = Arc<dyn Fn(SocketAddr, &'static str) + Send + Sync>;

impl std::fmt::Debug for HandshakeRefusals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandshakeRefusals")
            .field("name", &self.name)
            .field("sink", &self.sink.is_some())
            .finish_non_exhaustive()
    }
}

impl HandshakeRefusals {
    /// Refusals counted in `registry` as `name` (e.g. `recvault_vault_tls_handshakes_refused_total`).
    pub fn new(registry: Arc<crate::metrics::Registry>, name: &'static str) -> Self {
        Self {
            registry,
            name,
            sink: None,
        }
    }

    /// Also hands every refusal to `sink`.
    pub fn with_sink(mut self, sink: RefusalSink) -> Self {
        self.sink = Some(sink);
        self
    }

    fn refused(&self, peer: SocketAddr, reason: &'static str, error: &dyn std::fmt::Display) {
        self.registry
            .counter(
                self.name,
                "TLS handshakes refused, by reason (no_certificate, unknown_ca, expired, bad_certificate, protocol_version, timeout, other).",
                &[("reason", reason)],
            )
            .inc();
        tracing::warn!(%peer, reason, error = %error, "TLS handshake refused");
        if let Some(sink) = &self.sink {
            sink(peer, reason);
        }
    }
}

/// The metric label for why a handshake failed (see [`HandshakeRefusals`]).
pub fn refusal_reason(error: &io::Error) -> &'static str {
    use rustls::{CertificateError, Error};
    let Some(tls) = error.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return "other";
    };
    match tls {
        Error::NoCertificatesPresented => "no_certificate",
        Error::InvalidCertificate(
            CertificateError::Expired | CertificateError::ExpiredContext { .. },
        ) => "expired",
        Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "unknown_ca",
        Error::InvalidCertificate(_) => "bad_certificate",
        Error::PeerIncompatible(_) => "protocol_version",
        _ => "other",
    }
}

/// Binds `addr` (use port 0 in tests) and returns the listener and its real address.
pub async fn bind(addr: SocketAddr) -> io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Opens a gRPC channel to `https://host:port` over mTLS with our client
/// certificate. `server_name` is what the server certificate must be valid
/// for (a DNS SAN such as `localhost`, or an IP address).
pub fn channel(
    endpoint: &str,
    server_name: &str,
    files: &TlsFiles,
) -> Result<tonic::transport::Channel, TlsError> {
    let config = Arc::new(client_config(files)?);
    let name = ServerName::try_from(server_name.to_owned())
        .map_err(|e| config_error(files, format!("invalid server name {server_name:?}: {e}")))?;
    let connector = TlsConnector::from(config);
    let target = endpoint
        .trim_start_matches("https://")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    // The URI only feeds HTTP/2's :authority; the connector decides where to dial.
    let uri = format!("http://{target}");
    let endpoint = tonic::transport::Endpoint::from_shared(uri)
        .map_err(|e| config_error(files, format!("invalid endpoint {endpoint:?}: {e}")))?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(30));
    Ok(
        endpoint.connect_with_connector_lazy(tower::service_fn(move |_: http::Uri| {
            let connector = connector.clone();
            let name = name.clone();
            let target = target.clone();
            async move {
                let tcp = TcpStream::connect(&target).await?;
                tcp.set_nodelay(true)?;
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        })),
    )
}
