//! The backup store in our own S3-compatible bucket (`[backup_store]`).
//!
//! Objects are `<prefix>/objects/<tenant_id>/<job_id>`, in the same encrypted
//! format as the directory store; a job keeps the location
//! `s3://<bucket>/<prefix>/objects/<tenant_id>/<job_id>` as its backup path.
//!
//! **Writing** ([`S3Sink`], on the backup writer's thread): sealed bytes fill
//! parts of [`S3Tuning::part_size`]; a recording that fits in one part is
//! one PutObject, a larger one a multipart upload (created when the first
//! part is full) with at most [`S3Tuning::parts_in_flight`] parts uploading
//! while the next fills. Every request carries our CRC-32 as
//! `x-amz-checksum-crc32` (the whole object's as a FULL_OBJECT checksum on
//! complete). Then the stored object is verified: its length, and the
//! server's whole-object CRC-32 from HEAD when it keeps one, otherwise a
//! streamed read-back whose SHA-256 must be the one the writer computed
//! (s3s-fs ignores part checksums, so a multipart object there is read
//! back). Only then is the backup stored. Any failure aborts the upload or
//! deletes the object, retried in the background while the store is down.
//!
//! **Reading** ([`S3Object`]): ranged GETs of [`S3Tuning::read_range`] bytes,
//! [`S3Tuning::read_ahead`] of them requested ahead, so memory stays a few
//! MiB per reader whatever the object's size.
//!
//! The requests run on the tokio runtime the store was opened in, driven
//! from the writer's or the blocking pool's thread (`Handle::block_on`), so
//! the store needs tokio's multi-thread runtime. No message ever holds the
//! credential: errors name the bucket, the endpoint, the operation and the key.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
};
use bytes::Bytes;
use tokio::runtime::{Handle, RuntimeFlavor};
use tokio::task::JoinHandle;

use super::source::{StoredObject, StoredRead, hash_stored};
use super::{BackupError, Result, SealedSink, StoredDigest};
use crate::config::BackupStoreSettings;
use crate::credential::S3Credential;
use crate::destination::describe_connect_error;
use crate::destination::s3::{
    ClientSettings, build_client, crc32_header, full_object_crc32, len_i64, list_multipart_uploads,
    trim_message,
};
use crate::jobs::{JobId, TenantId};

/// Transfer sizes of the object-store backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S3Tuning {
    /// Bytes per part of a multipart upload; a recording whose stored bytes
    /// fit in one part is a single PutObject. At least 5 MiB. Default 8 MiB.
    pub part_size: usize,
    /// Parts uploading at once while the next one fills. Default 2.
    pub parts_in_flight: usize,
    /// Bytes per ranged GET when reading. Default 1 MiB.
    pub read_range: u64,
    /// Ranged GETs requested ahead of the one being read. Default 4.
    pub read_ahead: usize,
    /// Attempts per request inside the SDK (standard retry mode). Default 3.
    pub max_attempts: u32,
}

impl Default for S3Tuning {
    fn default() -> Self {
        Self {
            part_size: 8 * 1024 * 1024,
            parts_in_flight: 2,
            read_range: 1024 * 1024,
            read_ahead: 4,
            max_attempts: 3,
        }
    }
}

/// Smallest part S3 accepts (except the last one).
const MIN_PART_SIZE: usize = 5 * 1024 * 1024;
/// How long an upload or object left by a failed ingest is retried to be
/// aborted or deleted in the background (the stale-upload sweep and the
/// bucket's lifecycle rule catch what outlives this).
const DISCARD_RETRY_FOR: Duration = Duration::from_secs(15 * 60);

/// A request to the object store failed. Names the store, the operation and
/// the key; never the credential.
#[derive(Debug, thiserror::Error)]
#[error("backup store {store}: {operation} {key} failed: {detail}")]
pub struct ObjectStoreError {
    /// `s3://bucket (endpoint …)`.
    pub store: String,
    /// The S3 operation, e.g. `UploadPart`.
    pub operation: &'static str,
    /// The key (or prefix) it was about.
    pub key: String,
    /// HTTP status, when a response arrived.
    pub status: Option<u16>,
    /// The server's error code, e.g. `SlowDown`.
    pub code: Option<String>,
    /// What happened, in one line.
    pub detail: String,
}

impl ObjectStoreError {
    /// The store could not be reached, timed out, or answered 5xx or 429:
    /// the same request may work later.
    pub fn is_unavailable(&self) -> bool {
        self.status.is_none_or(|s| s >= 500 || s == 429)
    }

    fn into_io(self) -> io::Error {
        let kind = match self.status {
            Some(404) => io::ErrorKind::NotFound,
            Some(416) => io::ErrorKind::UnexpectedEof,
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, self)
    }
}

/// The bucket, the client, and the runtime its requests run on.
pub(super) struct S3Store {
    client: Client,
    bucket: String,
    /// `<prefix>/objects/` (or `objects/`): every key of a backup starts so.
    key_prefix: String,
    /// `s3://<bucket>/<prefix>/objects`.
    objects_root: PathBuf,
    endpoint: String,
    handle: Handle,
    stale_upload: Duration,
    tuning: S3Tuning,
}

impl fmt::Debug for S3Store {
    // The client is left out: its configuration holds the credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store")
            .field("bucket", &self.bucket)
            .field("key_prefix", &self.key_prefix)
            .field("endpoint", &self.endpoint)
            .field("stale_upload", &self.stale_upload)
            .field("tuning", &self.tuning)
            .finish_non_exhaustive()
    }
}

impl S3Store {
    /// Checks the settings and builds the client (nothing is sent yet).
    pub(super) fn new(
        settings: &BackupStoreSettings,
        credential: &S3Credential,
        tuning: S3Tuning,
    ) -> Result<Self> {
        settings.validate().map_err(BackupError::Config)?;
        let handle = Handle::try_current().map_err(|_| {
            BackupError::Config("[backup_store] can only be opened inside the tokio runtime".into())
        })?;
        if handle.runtime_flavor() == RuntimeFlavor::CurrentThread {
            return Err(BackupError::Config(
                "[backup_store] needs tokio's multi-thread runtime (the backup writer drives \
                 requests from its own thread)"
                    .into(),
            ));
        }
        let client = build_client(
            &ClientSettings {
                endpoint: &settings.endpoint,
                region: &settings.region,
                path_style: settings.path_style,
                connect_timeout: Duration::from_secs(10),
                read_timeout: Duration::from_secs(300),
                max_attempts: tuning.max_attempts,
            },
            credential,
            "recvault-backup-store",
        );
        let prefix = settings.prefix.trim_matches('/');
        let key_prefix = if prefix.is_empty() {
            "objects/".to_owned()
        } else {
            format!("{prefix}/objects/")
        };
        let objects_root = PathBuf::from(format!(
            "s3://{}/{}",
            settings.bucket,
            key_prefix.trim_end_matches('/')
        ));
        Ok(Self {
            client,
            bucket: settings.bucket.clone(),
            key_prefix,
            objects_root,
            endpoint: settings.endpoint.clone(),
            handle,
            stale_upload: Duration::from_secs(settings.stale_upload_secs),
            tuning: S3Tuning {
                part_size: tuning.part_size.max(MIN_PART_SIZE),
                parts_in_flight: tuning.parts_in_flight.max(1),
                read_range: tuning.read_range.max(64 * 1024),
                read_ahead: tuning.read_ahead.max(1),
                ..tuning
            },
        })
    }

    /// `s3://bucket (endpoint …)`, for messages.
    pub(super) fn describe(&self) -> String {
        format!("s3://{} (endpoint {})", self.bucket, self.endpoint)
    }

    pub(super) fn objects_root(&self) -> &Path {
        &self.objects_root
    }

    fn location_of(&self, key: &str) -> PathBuf {
        PathBuf::from(format!("s3://{}/{key}", self.bucket))
    }

    /// A sink for a new backup of `tenant` named `id`. Sends nothing yet.
    pub(super) fn sink(self: &Arc<Self>, id: JobId, tenant: &TenantId) -> S3Sink {
        S3Sink {
            store: Arc::clone(self),
            key: format!("{}{tenant}/{id}", self.key_prefix),
            part: Vec::new(),
            upload: None,
            crc: crc32fast::Hasher::new(),
            stored: false,
            committed: false,
        }
    }

    /// The object at `path`, which must be exactly
    /// `s3://<bucket>/<prefix>/objects/<tenant_id>/<job_id>` of this store
    /// (a valid tenant id and a job id in its canonical form), so a tampered
    /// job row cannot make the store touch any other key.
    pub(super) fn object(self: &Arc<Self>, path: &Path) -> Result<S3Object> {
        let key = path
            .to_str()
            .and_then(|text| text.strip_prefix("s3://"))
            .and_then(|rest| rest.strip_prefix(self.bucket.as_str()))
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|key| {
                key.strip_prefix(self.key_prefix.as_str())
                    .and_then(|rest| rest.split_once('/'))
                    .is_some_and(|(tenant, job)| {
                        TenantId::parse(tenant).is_ok()
                            && JobId::parse(job).is_ok_and(|id| id.to_string() == job)
                    })
            })
            .ok_or_else(|| BackupError::OutsideStore(path.to_owned()))?;
        Ok(S3Object {
            store: Arc::clone(self),
            key: key.to_owned(),
            location: path.to_owned(),
        })
    }

    fn error<E>(
        &self,
        err: SdkError<E, HttpResponse>,
        operation: &'static str,
        key: &str,
    ) -> ObjectStoreError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        let status = err.raw_response().map(|r| r.status().as_u16());
        let code = err.code().map(str::to_owned);
        let detail = match &err {
            SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
                let mut detail = format!("HTTP {}", status.unwrap_or_default());
                if let Some(code) = &code {
                    detail.push(' ');
                    detail.push_str(code);
                }
                if let Some(message) = err.message() {
                    detail.push_str(": ");
                    detail.push_str(&trim_message(message));
                }
                detail
            }
            SdkError::TimeoutError(_) => "timed out".to_owned(),
            _ => format!("cannot reach the store: {}", describe_connect_error(&err).1),
        };
        self.failure(operation, key, status, code, detail)
    }

    fn failure(
        &self,
        operation: &'static str,
        key: &str,
        status: Option<u16>,
        code: Option<String>,
        detail: String,
    ) -> ObjectStoreError {
        ObjectStoreError {
            store: self.describe(),
            operation,
            key: key.to_owned(),
            status,
            code,
            detail,
        }
    }

    /// Every object under `<prefix>/objects/` (ListObjectsV2, every page).
    pub(super) async fn list_objects(&self) -> Result<Vec<PathBuf>> {
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(&self.key_prefix)
            .into_paginator()
            .send();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.error(e, "ListObjectsV2", &self.key_prefix))?;
            out.extend(
                page.contents()
                    .iter()
                    .filter_map(|o| o.key())
                    .map(|key| self.location_of(key)),
            );
        }
        Ok(out)
    }

    /// Aborts the multipart uploads under `<prefix>/objects/` initiated more
    /// than `stale_upload_secs` ago; returns how many. A server without
    /// ListMultipartUploads (501) is logged: the bucket's lifecycle rule
    /// AbortIncompleteMultipartUpload then does this.
    pub(super) async fn abort_stale_uploads(&self) -> Result<u64> {
        let uploads = match list_multipart_uploads(&self.client, &self.bucket, &self.key_prefix)
            .await
        {
            Ok(uploads) => uploads,
            Err(e) => {
                let e = self.error(e, "ListMultipartUploads", &self.key_prefix);
                if e.status == Some(501) || e.code.as_deref() == Some("NotImplemented") {
                    tracing::info!(
                        store = %self.describe(),
                        "the backup store does not implement ListMultipartUploads; uploads left by ingests that were cut off are removed only by the bucket's AbortIncompleteMultipartUpload lifecycle rule"
                    );
                    return Ok(0);
                }
                return Err(e.into());
            }
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let cutoff = i64::try_from(now.saturating_sub(self.stale_upload.as_secs())).unwrap_or(0);
        let mut aborted = 0;
        for upload in uploads {
            let (Some(key), Some(id), Some(initiated)) =
                (upload.key(), upload.upload_id(), upload.initiated())
            else {
                continue;
            };
            if !key.starts_with(&self.key_prefix) || initiated.secs() > cutoff {
                continue;
            }
            self.abort_upload(key, id).await?;
            tracing::info!(
                location = %self.location_of(key).display(),
                upload_id = %id,
                initiated = %initiated,
                "aborted a multipart upload of an ingest that was cut off"
            );
            aborted += 1;
        }
        Ok(aborted)
    }

    async fn abort_upload(&self, key: &str, upload_id: &str) -> Result<(), ObjectStoreError> {
        match self
            .client
            .abort_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(self.error(e, "AbortMultipartUpload", key)),
        }
    }

    async fn delete_object(&self, key: &str) -> Result<(), ObjectStoreError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(self.error(e, "DeleteObject", key)),
        }
    }

    async fn head(
        &self,
        key: &str,
    ) -> Result<aws_sdk_s3::operation::head_object::HeadObjectOutput, ObjectStoreError> {
        self.client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.error(e, "HeadObject", key))
    }

    /// Stored bytes `start .. start + len` in one GET.
    async fn get_range(&self, key: &str, start: u64, len: u64) -> Result<Bytes, ObjectStoreError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range(format!("bytes={start}-{}", start + len - 1))
            .send()
            .await
            .map_err(|e| self.error(e, "GetObject", key))?;
        let body = out.body.collect().await.map_err(|e| {
            let detail = format!("the response broke off: {}", describe_connect_error(&e).1);
            self.failure("GetObject", key, None, None, detail)
        })?;
        Ok(body.into_bytes())
    }

    async fn upload_part(
        self: Arc<Self>,
        key: String,
        upload_id: String,
        number: i32,
        body: Vec<u8>,
    ) -> Result<CompletedPart, ObjectStoreError> {
        let crc = crc32_header(crc32fast::hash(&body));
        let out = self
            .client
            .upload_part()
            .bucket(&self.bucket)
            .key(&key)
            .upload_id(&upload_id)
            .part_number(number)
            .content_length(len_i64(body.len() as u64))
            .checksum_crc32(&crc)
            .body(ByteStream::from(body))
            .send()
            .await
            .map_err(|e| self.error(e, "UploadPart", &key))?;
        let e_tag = out.e_tag.ok_or_else(|| {
            let detail = format!("part {number}: the response carried no ETag");
            self.failure("UploadPart", &key, None, None, detail)
        })?;
        Ok(CompletedPart::builder()
            .part_number(number)
            .e_tag(e_tag)
            .checksum_crc32(crc)
            .build())
    }
}

/// A multipart upload being written.
struct Upload {
    id: String,
    in_flight: VecDeque<JoinHandle<Result<CompletedPart, ObjectStoreError>>>,
    done: Vec<CompletedPart>,
    next_number: i32,
}

/// A backup being stored in the object store; see the module documentation.
/// Blocking: runs on the backup writer's thread.
pub(super) struct S3Sink {
    store: Arc<S3Store>,
    key: String,
    /// Sealed bytes of the part being filled.
    part: Vec<u8>,
    upload: Option<Upload>,
    /// Of every byte written: the whole object's CRC-32.
    crc: crc32fast::Hasher,
    /// An object may exist under `key` (PutObject or CompleteMultipartUpload was sent).
    stored: bool,
    committed: bool,
}

impl S3Sink {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.store.handle.block_on(future)
    }

    /// Hands the full part to an upload task, once fewer than
    /// `parts_in_flight` are uploading (creating the multipart upload first).
    fn send_part(&mut self) -> Result<()> {
        if self.upload.is_none() {
            let out = self
                .block_on(
                    self.store
                        .client
                        .create_multipart_upload()
                        .bucket(&self.store.bucket)
                        .key(&self.key)
                        .checksum_algorithm(ChecksumAlgorithm::Crc32)
                        .checksum_type(ChecksumType::FullObject)
                        .send(),
                )
                .map_err(|e| self.store.error(e, "CreateMultipartUpload", &self.key))?;
            let id = out.upload_id.ok_or_else(|| {
                let detail = "the response carried no upload id".to_owned();
                self.store
                    .failure("CreateMultipartUpload", &self.key, None, None, detail)
            })?;
            self.upload = Some(Upload {
                id,
                in_flight: VecDeque::new(),
                done: Vec::new(),
                next_number: 1,
            });
        }
        while self
            .upload
            .as_ref()
            .is_some_and(|u| u.in_flight.len() >= self.store.tuning.parts_in_flight)
        {
            self.wait_oldest()?;
        }
        let body = std::mem::take(&mut self.part);
        let Some(upload) = self.upload.as_mut() else {
            return Err(BackupError::Abandoned);
        };
        let task = Arc::clone(&self.store).upload_part(
            self.key.clone(),
            upload.id.clone(),
            upload.next_number,
            body,
        );
        upload.next_number += 1;
        upload.in_flight.push_back(self.store.handle.spawn(task));
        Ok(())
    }

    /// Waits for the oldest part upload in flight.
    fn wait_oldest(&mut self) -> Result<()> {
        let Some(task) = self.upload.as_mut().and_then(|u| u.in_flight.pop_front()) else {
            return Ok(());
        };
        let part = self
            .block_on(task)
            .map_err(|e| BackupError::Task(format!("a part upload failed: {e}")))??;
        if let Some(upload) = self.upload.as_mut() {
            upload.done.push(part);
        }
        Ok(())
    }

    /// The last part, then CompleteMultipartUpload with the whole object's
    /// CRC-32 (FULL_OBJECT) and size.
    fn complete(&mut self, crc: u32, len: u64) -> Result<()> {
        if !self.part.is_empty() {
            self.send_part()?;
        }
        while self
            .upload
            .as_ref()
            .is_some_and(|u| !u.in_flight.is_empty())
        {
            self.wait_oldest()?;
        }
        let Some(upload) = self.upload.as_ref() else {
            return Err(BackupError::Abandoned);
        };
        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(upload.done.clone()))
            .build();
        self.stored = true;
        self.block_on(
            self.store
                .client
                .complete_multipart_upload()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .upload_id(&upload.id)
                .multipart_upload(completed)
                .checksum_type(ChecksumType::FullObject)
                .checksum_crc32(crc32_header(crc))
                .mpu_object_size(len_i64(len))
                .send(),
        )
        .map_err(|e| self.store.error(e, "CompleteMultipartUpload", &self.key))?;
        // Completed: there is no upload left to abort.
        self.upload = None;
        Ok(())
    }

    /// One PutObject of the whole (small) backup with its CRC-32.
    fn put(&mut self, crc: u32) -> Result<()> {
        let body = std::mem::take(&mut self.part);
        let len = body.len() as u64;
        self.stored = true;
        self.block_on(
            self.store
                .client
                .put_object()
                .bucket(&self.store.bucket)
                .key(&self.key)
                .content_length(len_i64(len))
                .checksum_crc32(crc32_header(crc))
                .body(ByteStream::from(body))
                .send(),
        )
        .map_err(|e| self.store.error(e, "PutObject", &self.key))?;
        Ok(())
    }

    /// The stored object is `stored`: its length, then the server's
    /// whole-object CRC-32 when HEAD returns one, else a read-back's SHA-256.
    fn verify(&self, stored: &StoredDigest, crc: u32, multipart: bool) -> Result<()> {
        let mismatch = |detail: String| BackupError::Verification {
            store: self.store.describe(),
            location: self.store.location_of(&self.key).display().to_string(),
            detail,
        };
        let head = self.block_on(self.store.head(&self.key))?;
        let len = head.content_length().and_then(|l| u64::try_from(l).ok());
        if len != Some(stored.len) {
            return Err(mismatch(format!(
                "the store reports {} bytes, {} were sent",
                len.map_or_else(|| "an unknown number of".to_owned(), |l| l.to_string()),
                stored.len
            )));
        }
        if let Some(theirs) = full_object_crc32(&head, multipart) {
            let ours = crc32_header(crc);
            return if theirs == ours {
                Ok(())
            } else {
                Err(mismatch(format!(
                    "the store's CRC-32 is {theirs}, the backup's is {ours}"
                )))
            };
        }
        let object = S3Object {
            store: Arc::clone(&self.store),
            key: self.key.clone(),
            location: self.store.location_of(&self.key),
        };
        let (sha256, read) =
            hash_stored(&object).map_err(|e| BackupError::io("read back", &object.location)(e))?;
        if sha256 != stored.sha256 || read != stored.len {
            return Err(mismatch(format!(
                "read back {read} bytes with SHA-256 {sha256}, wrote {} bytes with SHA-256 {}",
                stored.len, stored.sha256
            )));
        }
        Ok(())
    }
}

impl SealedSink for S3Sink {
    fn write(&mut self, sealed: &[u8]) -> Result<()> {
        self.crc.update(sealed);
        let part_size = self.store.tuning.part_size;
        let mut rest = sealed;
        while !rest.is_empty() {
            if self.part.capacity() == 0 {
                self.part.reserve_exact(part_size);
            }
            let take = (part_size - self.part.len()).min(rest.len());
            self.part.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.part.len() == part_size {
                self.send_part()?;
            }
        }
        Ok(())
    }

    fn commit(mut self: Box<Self>, stored: &StoredDigest) -> Result<PathBuf> {
        let crc = self.crc.clone().finalize();
        let multipart = self.upload.is_some();
        if multipart {
            self.complete(crc, stored.len)?;
        } else {
            self.put(crc)?;
        }
        self.verify(stored, crc, multipart)?;
        self.committed = true;
        Ok(self.store.location_of(&self.key))
    }
}

impl Drop for S3Sink {
    /// Not committed: abort the upload and delete what may be stored, once
    /// now and, while the store cannot be reached, again in the background.
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let upload_id = self.upload.take().map(|upload| {
            for task in &upload.in_flight {
                task.abort();
            }
            upload.id
        });
        let mut discard = Discard {
            store: Arc::clone(&self.store),
            key: self.key.clone(),
            upload_id,
            stored: self.stored,
        };
        if discard.is_done() {
            return;
        }
        if let Err(e) = self.block_on(discard.attempt()) {
            tracing::warn!(
                error = %e,
                "could not remove an unfinished backup from the backup store; retrying in the background"
            );
            self.store.handle.spawn(discard.retry());
        }
    }
}

/// What a failed ingest left in the store: an upload to abort, an object to delete.
struct Discard {
    store: Arc<S3Store>,
    key: String,
    upload_id: Option<String>,
    stored: bool,
}

impl Discard {
    fn is_done(&self) -> bool {
        self.upload_id.is_none() && !self.stored
    }

    async fn attempt(&mut self) -> Result<(), ObjectStoreError> {
        if let Some(id) = &self.upload_id {
            self.store.abort_upload(&self.key, id).await?;
            self.upload_id = None;
        }
        if self.stored {
            self.store.delete_object(&self.key).await?;
            self.stored = false;
        }
        Ok(())
    }

    /// Retries with backoff (250 ms doubling to 30 s) for [`DISCARD_RETRY_FOR`].
    async fn retry(mut self) {
        let started = Instant::now();
        let mut wait = Duration::from_millis(250);
        loop {
            tokio::time::sleep(wait).await;
            match self.attempt().await {
                Ok(()) => {
                    tracing::info!(
                        location = %self.store.location_of(&self.key).display(),
                        "removed an unfinished backup from the backup store"
                    );
                    return;
                }
                Err(e) if started.elapsed() >= DISCARD_RETRY_FOR => {
                    tracing::error!(
                        error = %e,
                        "gave up removing an unfinished backup from the backup store; the stale-upload sweep or the bucket's lifecycle rule removes an upload, an object shows as an orphan in the scrub"
                    );
                    return;
                }
                Err(_) => wait = (wait * 2).min(Duration::from_secs(30)),
            }
        }
    }
}

/// A backup in the object store.
#[derive(Debug)]
pub(super) struct S3Object {
    store: Arc<S3Store>,
    key: String,
    location: PathBuf,
}

impl StoredObject for S3Object {
    fn location(&self) -> &Path {
        &self.location
    }

    fn len(&self) -> io::Result<u64> {
        let head = self
            .store
            .handle
            .block_on(self.store.head(&self.key))
            .map_err(ObjectStoreError::into_io)?;
        head.content_length()
            .and_then(|l| u64::try_from(l).ok())
            .ok_or_else(|| io::Error::other("HeadObject returned no Content-Length"))
    }

    fn reader(&self, start: u64, end: u64) -> io::Result<Box<dyn StoredRead>> {
        Ok(Box::new(RangeReader {
            store: Arc::clone(&self.store),
            key: self.key.clone(),
            next: start,
            end,
            pending: VecDeque::new(),
            buf: Bytes::new(),
            buf_start: start,
        }))
    }

    fn read_head(&self, max: usize) -> io::Result<Vec<u8>> {
        match self
            .store
            .handle
            .block_on(self.store.get_range(&self.key, 0, max as u64))
        {
            Ok(bytes) => Ok(bytes.to_vec()),
            // An empty object: no byte is satisfiable.
            Err(e) if e.status == Some(416) => Ok(Vec::new()),
            Err(e) => Err(e.into_io()),
        }
    }

    fn delete(&self) -> io::Result<()> {
        self.store
            .handle
            .block_on(self.store.delete_object(&self.key))
            .map_err(ObjectStoreError::into_io)
    }

    fn exists(&self) -> io::Result<bool> {
        match self.store.handle.block_on(self.store.head(&self.key)) {
            Ok(_) => Ok(true),
            Err(e) if e.status == Some(404) => Ok(false),
            Err(e) => Err(e.into_io()),
        }
    }
}

/// One ranged GET, running on the runtime.
type RangeTask = JoinHandle<Result<Bytes, ObjectStoreError>>;

/// Stored bytes `next .. end` in ranged GETs, `read_ahead` requested ahead of
/// the one being read; holds at most `read_ahead + 1` ranges.
struct RangeReader {
    store: Arc<S3Store>,
    key: String,
    /// Start of the next range to request.
    next: u64,
    end: u64,
    /// Ranges requested: start, length, and the GET.
    pending: VecDeque<(u64, u64, RangeTask)>,
    buf: Bytes,
    buf_start: u64,
}

impl RangeReader {
    fn request_ahead(&mut self) {
        while self.pending.len() < self.store.tuning.read_ahead && self.next < self.end {
            let len = self.store.tuning.read_range.min(self.end - self.next);
            let (store, key, start) = (Arc::clone(&self.store), self.key.clone(), self.next);
            let task = self
                .store
                .handle
                .spawn(async move { store.get_range(&key, start, len).await });
            self.pending.push_back((start, len, task));
            self.next += len;
        }
    }

    /// Makes the next range the buffer.
    fn advance(&mut self) -> io::Result<()> {
        self.request_ahead();
        let Some((start, len, task)) = self.pending.pop_front() else {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the range",
            ));
        };
        let bytes = self
            .store
            .handle
            .block_on(task)
            .map_err(io::Error::other)?
            .map_err(ObjectStoreError::into_io)?;
        if bytes.len() as u64 != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "a ranged GET of {len} bytes at {start} returned {}",
                    bytes.len()
                ),
            ));
        }
        self.buf = bytes;
        self.buf_start = start;
        self.request_ahead();
        Ok(())
    }
}

impl StoredRead for RangeReader {
    fn read_exact_at(&mut self, out: &mut [u8], offset: u64) -> io::Result<()> {
        let mut filled = 0;
        while filled < out.len() {
            let at = offset + filled as u64;
            let buf_end = self.buf_start + self.buf.len() as u64;
            if at < self.buf_start {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a ranged reader reads forward only",
                ));
            }
            if at < buf_end {
                let from = (at - self.buf_start) as usize;
                let n = (out.len() - filled).min(self.buf.len() - from);
                out[filled..filled + n].copy_from_slice(&self.buf[from..from + n]);
                filled += n;
            } else {
                self.advance()?;
            }
        }
        Ok(())
    }
}

impl Drop for RangeReader {
    fn drop(&mut self) {
        for (_, _, task) in &self.pending {
            task.abort();
        }
    }
}
