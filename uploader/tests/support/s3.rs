//! An in-process S3 server for tests: s3s-fs 0.14.1 on a temporary directory,
//! served over real HTTP on `127.0.0.1:0` with SigV4 auth (s3s `SimpleAuth`).
//! It records each authenticated request's operation and headers (to check
//! what went on the wire) and can refuse chosen operations with AccessDenied.
//!
//! Use from a test crate with `#[path = "support/s3.rs"] mod s3_server;`.
//! s3s-fs quirks worth knowing (0.14.1): a bucket is a directory under the
//! root and PutObject creates it if missing; multipart part checksums are
//! ignored and no whole-object checksum is kept; an unknown access key gets
//! `NotSignedUp` (not `InvalidAccessKeyId`); an unknown multipart upload id
//! gets 403 AccessDenied (not 404 NoSuchUpload) and ListParts lists it empty.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashSet;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region, RequestChecksumCalculation};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::net::TcpListener;

/// One request as the server saw it, after authentication.
#[derive(Debug, Clone)]
pub struct RecordedRequest {
    /// The S3 operation, e.g. `PutObject`, `UploadPart`.
    pub operation: String,
    /// HTTP method.
    pub method: String,
    /// Request path (path-style: `/bucket/key`).
    pub path: String,
    /// Query string, e.g. `partNumber=1&uploadId=…`.
    pub query: String,
    /// Headers, names lower-case.
    pub headers: Vec<(String, String)>,
}

impl RecordedRequest {
    /// The value of query parameter `name`.
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Settings for [`S3Server::start_with`].
#[derive(Debug, Clone, Default)]
pub struct S3ServerOptions {
    /// Operations (e.g. `"DeleteObject"`) answered with 403 AccessDenied.
    pub deny: HashSet<&'static str>,
}

/// A running s3s-fs server. Stops when dropped.
pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    /// The port it listens on.
    pub port: u16,
    /// The one access key it accepts.
    pub access_key: String,
    /// Its secret key.
    pub secret_key: String,
    root: tempfile::TempDir,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for S3Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Server")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

struct Recorder {
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    deny: HashSet<&'static str>,
}

// `S3Access` is an `#[async_trait]` trait; this is the signature the macro
// generates, written out so the tests need no async-trait dependency.
impl S3Access for Recorder {
    fn check<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        cx: &'life1 mut S3AccessContext<'life2>,
    ) -> Pin<Box<dyn Future<Output = s3s::S3Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let operation = cx.s3_op().name().to_owned();
        let authenticated = cx.credentials().is_some();
        let denied = self.deny.contains(operation.as_str());
        self.requests.lock().unwrap().push(RecordedRequest {
            operation,
            method: cx.method().to_string(),
            path: cx.uri().path().to_owned(),
            query: cx.uri().query().unwrap_or_default().to_owned(),
            headers: cx
                .headers()
                .iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
        });
        Box::pin(async move {
            if authenticated && !denied {
                Ok(())
            } else {
                Err(s3s::s3_error!(AccessDenied))
            }
        })
    }
}

impl S3Server {
    /// Starts a server with random credentials on a fresh directory.
    pub async fn start() -> Self {
        Self::start_with(S3ServerOptions::default()).await
    }

    /// Starts a server with `options`.
    pub async fn start_with(options: S3ServerOptions) -> Self {
        let root = tempfile::tempdir().unwrap();
        let access_key = format!(
            "AKIATEST{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        )
        .to_uppercase();
        let secret_key = format!("sk-{}", uuid::Uuid::new_v4().simple());
        let requests = Arc::new(Mutex::new(Vec::new()));

        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(
                access_key.clone(),
                secret_key.clone(),
            ));
            b.set_access(Recorder {
                requests: Arc::clone(&requests),
                deny: options.deny,
            });
            b.build()
        };

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let builder = ConnBuilder::new(TokioExecutor::new());
            loop {
                let socket = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok((socket, _)) => socket,
                        Err(_) => continue,
                    },
                    _ = &mut rx => break,
                };
                let builder = builder.clone();
                let service = service.clone();
                tokio::spawn(async move {
                    let _ = builder
                        .serve_connection(TokioIo::new(socket), service)
                        .await;
                });
            }
        });

        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            access_key,
            secret_key,
            root,
            requests,
            shutdown: Some(tx),
        }
    }

    /// The directory s3s-fs serves.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// Creates a bucket (for s3s-fs, a directory under the root).
    pub fn create_bucket(&self, name: &str) -> PathBuf {
        let dir = self.root.path().join(name);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Where s3s-fs keeps the bytes of `bucket/key`.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// The credential as the vault would hand it out.
    pub fn credential_json(&self) -> String {
        serde_json::json!({
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
        })
        .to_string()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests.lock().unwrap().clone()
    }

    /// Requests of one operation seen so far.
    pub fn requests_of(&self, operation: &str) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.operation == operation)
            .collect()
    }

    /// Forgets recorded requests.
    pub fn clear_requests(&self) {
        self.requests.lock().unwrap().clear();
    }

    /// An independent SDK client for reading back and for setting up state
    /// (path-style, no automatic checksums).
    pub fn client(&self) -> aws_sdk_s3::Client {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(Credentials::new(
                &self.access_key,
                &self.secret_key,
                None,
                None,
                "test",
            ))
            .endpoint_url(&self.endpoint)
            .force_path_style(true)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        aws_sdk_s3::Client::from_conf(config)
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
