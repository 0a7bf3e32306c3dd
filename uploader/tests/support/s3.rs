//! An in-process S3 server for tests: s3s-fs 0.14.1 on a temporary directory,
//! served over real HTTP on `127.0.0.1:0` with SigV4 auth (s3s `SimpleAuth`).
//! It records each authenticated request's operation and headers (to check
//! what went on the wire) and can refuse chosen operations with AccessDenied
//! (from the start, or from any moment with [`S3Server::set_denied`]).
//!
//! Use from a test crate with `#[path = "support/s3.rs"] mod s3_server;`.
//! s3s-fs quirks worth knowing (0.14.1): a bucket is a directory under the
//! root and PutObject creates it if missing; multipart part checksums are
//! ignored and no whole-object checksum is kept; an unknown access key gets
//! `NotSignedUp` (not `InvalidAccessKeyId`); an unknown multipart upload id
//! gets 403 AccessDenied (not 404 NoSuchUpload) and ListParts lists it empty;
//! ListMultipartUploads is not implemented (501 NotImplemented, the s3s
//! default). [`S3ServerOptions::list_multipart_uploads`] adds it here, as a
//! custom route over s3s-fs's own upload files (see [`ListUploadsRoute`]).
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
use tonic::codegen::http;

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
    /// `Some(page)`: serve ListMultipartUploads (which s3s-fs lacks) with at
    /// most `page` uploads per response, so paging is exercised. `None`: the
    /// s3s-fs behaviour, 501 NotImplemented.
    pub list_multipart_uploads: Option<usize>,
    /// Called with each request as it arrives, after it is recorded and
    /// before the operation runs (for ListMultipartUploads served here:
    /// after authentication).
    pub on_request: Option<RequestHook>,
}

/// A test's callback on incoming requests (see [`S3ServerOptions::on_request`]).
#[derive(Clone)]
pub struct RequestHook(pub Arc<dyn Fn(&RecordedRequest) + Send + Sync>);

impl std::fmt::Debug for RequestHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestHook")
    }
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
    deny: Arc<Mutex<HashSet<&'static str>>>,
    unavailable: Arc<Mutex<HashSet<&'static str>>>,
    service: s3s::service::S3Service,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Accepts connections on `listener` until the returned sender fires (or is
/// dropped); the open connections end with it.
fn serve(
    listener: TcpListener,
    service: s3s::service::S3Service,
) -> tokio::sync::oneshot::Sender<()> {
    let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let builder = ConnBuilder::new(TokioExecutor::new());
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let socket = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((socket, _)) => socket,
                    Err(_) => continue,
                },
                _ = &mut rx => break,
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            };
            let builder = builder.clone();
            let service = service.clone();
            connections.spawn(async move {
                let _ = builder
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    });
    tx
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
    deny: Arc<Mutex<HashSet<&'static str>>>,
    unavailable: Arc<Mutex<HashSet<&'static str>>>,
    on_request: Option<RequestHook>,
}

impl Recorder {
    fn record(&self, request: RecordedRequest) {
        self.requests.lock().unwrap().push(request.clone());
        if let Some(hook) = &self.on_request {
            (hook.0)(&request);
        }
    }
}

fn record_of(
    operation: String,
    method: &http::Method,
    uri: &http::Uri,
    headers: &http::HeaderMap,
) -> RecordedRequest {
    RecordedRequest {
        operation,
        method: method.to_string(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        headers: headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
    }
}

/// The recorder as s3s's access check (shared with [`ListUploadsRoute`]).
struct SharedRecorder(Arc<Recorder>);

// `S3Access` is an `#[async_trait]` trait; this is the signature the macro
// generates, written out so the tests need no async-trait dependency.
impl S3Access for SharedRecorder {
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
        let denied = self.0.deny.lock().unwrap().contains(operation.as_str());
        let unavailable = self
            .0
            .unavailable
            .lock()
            .unwrap()
            .contains(operation.as_str());
        self.0
            .record(record_of(operation, cx.method(), cx.uri(), cx.headers()));
        Box::pin(async move {
            if !authenticated || denied {
                Err(s3s::s3_error!(AccessDenied))
            } else if unavailable {
                Err(s3s::s3_error!(ServiceUnavailable))
            } else {
                Ok(())
            }
        })
    }
}

/// ListMultipartUploads for s3s-fs 0.14.1, which does not implement it:
/// served as an s3s custom route (after SigV4 authentication) from the files
/// s3s-fs keeps per upload in its root: `.upload-{id}.json` while the upload
/// is in progress (removed by complete and abort) and
/// `.bucket-{b64(bucket)}.object-{b64(key)}.upload-{id}.metadata.json`
/// naming its bucket and key (URL-safe base64 without padding). Honours
/// `prefix`, `key-marker`, `upload-id-marker` and `max-uploads`, ordered by
/// key then upload id, as
/// <https://docs.aws.amazon.com/AmazonS3/latest/API/API_ListMultipartUploads.html>
/// describes. Written from that page, so it shows that the uploader's
/// client side works against a server speaking the documented protocol, not
/// how any particular provider behaves.
struct ListUploadsRoute {
    root: PathBuf,
    page: usize,
    recorder: Arc<Recorder>,
}

fn query_pairs(uri: &http::Uri) -> Vec<(String, String)> {
    uri.query()
        .unwrap_or_default()
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(b);
            i += 3;
        } else {
            out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

impl ListUploadsRoute {
    /// (key, upload id, when it was created) of every upload in progress in `bucket`.
    fn in_progress(&self, bucket: &str) -> Vec<(String, String, std::time::SystemTime)> {
        use base64::Engine as _;
        let decode = |s: &str| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let mut uploads = Vec::new();
        for entry in std::fs::read_dir(&self.root).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(rest) = name
                .strip_prefix(".bucket-")
                .and_then(|r| r.strip_suffix(".metadata.json"))
            else {
                continue;
            };
            let Some((b, rest)) = rest.split_once(".object-") else {
                continue;
            };
            let Some((k, id)) = rest.split_once(".upload-") else {
                continue;
            };
            let started = std::fs::metadata(self.root.join(format!(".upload-{id}.json")))
                .and_then(|m| m.modified());
            if let (Some(b), Some(k), Ok(started)) = (decode(b), decode(k), started)
                && b == bucket
            {
                uploads.push((k, id.to_owned(), started));
            }
        }
        uploads.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        uploads
    }

    fn respond(&self, uri: &http::Uri) -> String {
        let bucket = uri.path().trim_matches('/').to_owned();
        let params = query_pairs(uri);
        let param = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        let prefix = param("prefix").unwrap_or_default();
        let key_marker = param("key-marker").unwrap_or_default();
        let id_marker = param("upload-id-marker").unwrap_or_default();
        let max = param("max-uploads")
            .and_then(|m| m.parse::<usize>().ok())
            .unwrap_or(1000)
            .min(self.page)
            .max(1);
        let after_marker = |(k, id, _): &(String, String, std::time::SystemTime)| {
            if key_marker.is_empty() {
                true
            } else if id_marker.is_empty() {
                *k > key_marker
            } else {
                *k > key_marker || (*k == key_marker && *id > id_marker)
            }
        };
        let matching: Vec<(String, String, std::time::SystemTime)> = self
            .in_progress(&bucket)
            .into_iter()
            .filter(|(k, _, _)| k.starts_with(&prefix))
            .filter(after_marker)
            .collect();
        let truncated = matching.len() > max;
        let page = &matching[..matching.len().min(max)];
        let mut xml = String::from(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <ListMultipartUploadsResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\">",
        );
        xml.push_str(&format!(
            "<Bucket>{}</Bucket><KeyMarker>{}</KeyMarker><UploadIdMarker>{}</UploadIdMarker>\
             <Prefix>{}</Prefix><MaxUploads>{max}</MaxUploads><IsTruncated>{truncated}</IsTruncated>",
            xml_escape(&bucket),
            xml_escape(&key_marker),
            xml_escape(&id_marker),
            xml_escape(&prefix),
        ));
        if truncated && let Some((k, id, _)) = page.last() {
            xml.push_str(&format!(
                "<NextKeyMarker>{}</NextKeyMarker><NextUploadIdMarker>{}</NextUploadIdMarker>",
                xml_escape(k),
                xml_escape(id)
            ));
        }
        for (k, id, started) in page {
            // When s3s-fs created the upload (its upload file's mtime), in
            // whole seconds as S3 writes it.
            let initiated = time::OffsetDateTime::from(*started)
                .replace_nanosecond(0)
                .unwrap()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap();
            xml.push_str(&format!(
                "<Upload><Key>{}</Key><UploadId>{}</UploadId>\
                 <Initiated>{initiated}</Initiated></Upload>",
                xml_escape(k),
                xml_escape(id)
            ));
        }
        xml.push_str("</ListMultipartUploadsResult>");
        xml
    }
}

// `S3Route` is an `#[async_trait]` trait too; `call` is written out the same way.
impl s3s::route::S3Route for ListUploadsRoute {
    fn is_match(
        &self,
        method: &http::Method,
        uri: &http::Uri,
        _headers: &http::HeaderMap,
        _extensions: &mut http::Extensions,
    ) -> bool {
        // GET /bucket?uploads (path-style), not GET /bucket/key?uploadId=….
        *method == http::Method::GET
            && uri.path().trim_matches('/').split('/').count() == 1
            && !uri.path().trim_matches('/').is_empty()
            && query_pairs(uri).iter().any(|(k, _)| k == "uploads")
    }

    fn call<'life0, 'async_trait>(
        &'life0 self,
        req: s3s::S3Request<s3s::Body>,
    ) -> Pin<
        Box<dyn Future<Output = s3s::S3Result<s3s::S3Response<s3s::Body>>> + Send + 'async_trait>,
    >
    where
        'life0: 'async_trait,
        Self: 'async_trait,
    {
        self.recorder.record(record_of(
            "ListMultipartUploads".to_owned(),
            &req.method,
            &req.uri,
            &req.headers,
        ));
        let xml = self.respond(&req.uri);
        Box::pin(async move {
            let mut response = s3s::S3Response::new(s3s::Body::from(xml));
            response.headers.insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/xml"),
            );
            Ok(response)
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
        let deny = Arc::new(Mutex::new(options.deny));
        let unavailable = Arc::new(Mutex::new(HashSet::new()));

        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let service = {
            let mut b = S3ServiceBuilder::new(fs);
            b.set_auth(SimpleAuth::from_single(
                access_key.clone(),
                secret_key.clone(),
            ));
            let recorder = Arc::new(Recorder {
                requests: Arc::clone(&requests),
                deny: Arc::clone(&deny),
                unavailable: Arc::clone(&unavailable),
                on_request: options.on_request,
            });
            if let Some(page) = options.list_multipart_uploads {
                b.set_route(ListUploadsRoute {
                    root: root.path().to_owned(),
                    page,
                    recorder: Arc::clone(&recorder),
                });
            }
            b.set_access(SharedRecorder(recorder));
            b.build()
        };

        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let tx = serve(listener, service.clone());

        Self {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            access_key,
            secret_key,
            root,
            requests,
            deny,
            unavailable,
            service,
            shutdown: Some(tx),
        }
    }

    /// Stops listening and closes every open connection, as a server that
    /// went down (the port refuses connections until [`S3Server::restart`]).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Serves again on the same port, over the same directory.
    pub async fn restart(&mut self) {
        self.stop();
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let listener = loop {
            match TcpListener::bind(addr).await {
                Ok(l) => break l,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        };
        self.shutdown = Some(serve(listener, self.service.clone()));
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

    /// From now on, answers exactly these operations with 403 AccessDenied
    /// (replacing [`S3ServerOptions::deny`]).
    pub fn set_denied(&self, operations: &[&'static str]) {
        *self.deny.lock().unwrap() = operations.iter().copied().collect();
    }

    /// From now on, answers exactly these operations with 503
    /// ServiceUnavailable, a transient failure (after the access check, so a
    /// denied operation stays denied).
    pub fn set_unavailable(&self, operations: &[&'static str]) {
        *self.unavailable.lock().unwrap() = operations.iter().copied().collect();
    }

    /// Whether s3s-fs still holds multipart upload `upload_id` (in progress:
    /// neither completed nor aborted).
    pub fn upload_in_progress(&self, upload_id: &str) -> bool {
        self.root
            .path()
            .join(format!(".upload-{upload_id}.json"))
            .exists()
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
