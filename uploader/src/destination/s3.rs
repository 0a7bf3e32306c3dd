//! S3 and S3-compatible delivery with aws-sdk-s3 low-level calls: single PUT or
//! multipart, streamed from the recording's [`Source`], with our own CRC-32
//! sent as plain headers, then verified (provider checksum, else read-back).
//! It never opens the backup itself, never logs or formats a request, a
//! response dump or the credential, and never buffers a whole file.

mod body;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::retry::RetryConfig;
use aws_sdk_s3::config::timeout::TimeoutConfig;
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::operation::get_object::GetObjectOutput;
use aws_sdk_s3::operation::head_object::HeadObjectOutput;
use aws_sdk_s3::operation::list_multipart_uploads::ListMultipartUploadsError;
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{
    ChecksumAlgorithm, ChecksumMode, ChecksumType, CompletedMultipartUpload, CompletedPart,
    MultipartUpload,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use tokio::task::JoinSet;

use self::body::ReadErrors;
use super::{
    Delivery, DeliveryError, DeliveryHooks, DestinationConfig, ObjectInfo, ProbeError, Source,
    VerifiedBy, check_source_size, classify_provider, connect_hint, describe_connect_error,
    sidecar_contents, sidecar_name,
};
use crate::credential::S3Credential;

/// Smallest part S3 accepts (except the last one).
const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Most parts S3 accepts in one upload.
const MAX_PARTS: u64 = 10_000;
/// Read buffer for computing a part's CRC-32.
const CRC_BUFFER: usize = 256 * 1024;
/// Most bytes of a request body read from the source at a time.
const BODY_BUFFER: usize = 256 * 1024;
/// Read-backs of objects up to this size use one GET; larger ones use
/// ranged GETs requested ahead (see `S3Destination::read_back_ranged`).
const READ_BACK_SINGLE_MAX: u64 = 64 * 1024 * 1024;
/// Size of each ranged GET of a read-back. Small enough that a range
/// requested ahead fits in the socket buffers while it waits its turn (8 MiB
/// ranges made the server stall and halved read-back speed from s3s-fs).
const READ_BACK_RANGE: u64 = 4 * 1024 * 1024;
/// The `x-amz-meta-*` key that carries the SHA-256 (hex).
const SHA256_METADATA: &str = "sha256";

/// Transfer settings. Parts are streamed from the source and read-backs are hashed
/// as they arrive, so memory stays a few MiB per connection whatever the
/// file size or part size.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// Files of at least this size go multipart. Default 16 MiB.
    pub multipart_threshold: u64,
    /// Part size; raised automatically to stay within 10 000 parts and to at
    /// least 5 MiB. Default 8 MiB.
    pub part_size: u64,
    /// Parts in flight at once. Default 4.
    pub concurrency: usize,
    /// Ranged GETs a read-back keeps requested ahead of the one it is
    /// hashing (one connection each). Default 16.
    pub read_back_streams: usize,
    /// TCP (and TLS) connect timeout. Default 10 s.
    pub connect_timeout: Duration,
    /// Time from sending a request until its response starts, body upload
    /// included, so it must allow for a whole part. Default 5 min.
    pub read_timeout: Duration,
    /// Attempts per request inside the SDK (its standard retry mode) before
    /// the error is returned to the job. Default 3.
    pub max_attempts: u32,
    /// Test only: send a deliberately wrong CRC-32 for the recording (PUT,
    /// parts and complete) so a test can prove the provider rejects it.
    #[doc(hidden)]
    pub corrupt_checksum_for_test: bool,
}

impl Default for S3Options {
    fn default() -> Self {
        Self {
            multipart_threshold: 16 * 1024 * 1024,
            part_size: 8 * 1024 * 1024,
            concurrency: 4,
            read_back_streams: 16,
            connect_timeout: Duration::from_secs(10),
            read_timeout: Duration::from_secs(300),
            max_attempts: 3,
            corrupt_checksum_for_test: false,
        }
    }
}

/// An S3 bucket (and prefix) with a client holding one leased credential.
pub struct S3Destination {
    client: Client,
    bucket: String,
    prefix: String,
    /// For messages: the endpoint, or the AWS region.
    endpoint: String,
    options: S3Options,
}

impl fmt::Debug for S3Destination {
    // The client is left out: its configuration holds the credential.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Destination")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .field("endpoint", &self.endpoint)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// `s3://bucket (endpoint)` for messages about a destination.
pub(crate) fn describe(config: &DestinationConfig) -> String {
    format!("s3://{} ({})", config.bucket, endpoint_label(config))
}

fn endpoint_label(config: &DestinationConfig) -> String {
    if config.endpoint.is_empty() {
        format!("AWS region {}", region_or_default(&config.region))
    } else {
        format!("endpoint {}", config.endpoint)
    }
}

fn region_or_default(region: &str) -> &str {
    if region.is_empty() {
        "us-east-1"
    } else {
        region
    }
}

/// CRC-32 in the form S3 expects: base64 of the 4 big-endian bytes
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_PutObject.html#AmazonS3-PutObject-request-header-ChecksumCRC32>).
pub(crate) fn crc32_header(crc: u32) -> String {
    BASE64.encode(crc.to_be_bytes())
}

/// Where and how an S3 client connects: a customer's destination, or the
/// uploader's own object-store backup.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientSettings<'a> {
    /// `http(s)://host[:port]`, or empty for AWS (the region's endpoint).
    pub endpoint: &'a str,
    /// Empty means `us-east-1`.
    pub region: &'a str,
    pub path_style: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub max_attempts: u32,
}

/// An SDK client signing with SigV4 under `credential`. Request checksums
/// are ours, sent as plain headers (many S3-compatibles reject the SDK's
/// default trailing aws-chunked checksums; with WhenRequired the SDK adds
/// none unless an operation demands one). Nothing is sent until the first
/// operation; the client's own `Debug` is never shown (its configuration
/// holds the credential).
pub(crate) fn build_client(
    settings: &ClientSettings<'_>,
    credential: &S3Credential,
    provider_name: &'static str,
) -> Client {
    // The SDK copies the strings into its own zeroizing storage.
    let credentials = Credentials::new(
        credential.access_key_id(),
        credential.expose_secret_access_key(),
        credential.expose_session_token().map(str::to_owned),
        None,
        provider_name,
    );
    let mut builder = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new(region_or_default(settings.region).to_owned()))
        .credentials_provider(credentials)
        .force_path_style(settings.path_style)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .timeout_config(
            TimeoutConfig::builder()
                .connect_timeout(settings.connect_timeout)
                .read_timeout(settings.read_timeout)
                .build(),
        )
        .retry_config(RetryConfig::standard().with_max_attempts(settings.max_attempts.max(1)));
    if !settings.endpoint.is_empty() {
        builder = builder.endpoint_url(settings.endpoint.trim_end_matches('/'));
    }
    Client::from_conf(builder.build())
}

/// The whole-object CRC-32 a HeadObject (with checksum mode) reports, when
/// it is one that can be compared with the object's CRC-32. A composite
/// multipart checksum ("…-N") is a checksum of part checksums and not
/// comparable. For multipart, only an explicit FULL_OBJECT checksum counts
/// (s3s-fs, for one, keeps a stale checksum of an earlier object under the
/// same key).
pub(crate) fn full_object_crc32(head: &HeadObjectOutput, multipart: bool) -> Option<&str> {
    match (head.checksum_crc32(), head.checksum_type()) {
        (Some(v), Some(ChecksumType::FullObject)) if !v.contains('-') => Some(v),
        (Some(v), None) if !multipart && !v.contains('-') => Some(v),
        _ => None,
    }
}

impl S3Destination {
    /// Builds the client. Nothing is sent until the first operation.
    pub fn new(
        config: &DestinationConfig,
        credential: &S3Credential,
        options: S3Options,
    ) -> Result<Self, DeliveryError> {
        let destination = describe(config);
        let config_error = |message: String| DeliveryError::Config {
            destination: destination.clone(),
            message,
        };
        if config.bucket.is_empty() {
            return Err(config_error(
                "the bucket is empty; set the destination's bucket".into(),
            ));
        }
        let endpoint_ok = config.endpoint.is_empty()
            || config.endpoint.starts_with("http://")
            || config.endpoint.starts_with("https://");
        if !endpoint_ok {
            return Err(config_error(
                "the endpoint must be a URL starting with http:// or https://".into(),
            ));
        }
        super::object_key(&config.prefix, "x").map_err(|e| config_error(e.to_string()))?;

        let client = build_client(
            &ClientSettings {
                endpoint: &config.endpoint,
                region: &config.region,
                path_style: config.path_style,
                connect_timeout: options.connect_timeout,
                read_timeout: options.read_timeout,
                max_attempts: options.max_attempts,
            },
            credential,
            "recvault-lease",
        );
        Ok(Self {
            client,
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            endpoint: endpoint_label(config),
            options,
        })
    }

    /// The key for a recording called `name`.
    pub fn object_key(&self, name: &str) -> Result<String, DeliveryError> {
        super::object_key(&self.prefix, name).map_err(|e| DeliveryError::Config {
            destination: self.describe(),
            message: format!("cannot name an object {name:?}: {e}"),
        })
    }

    fn describe(&self) -> String {
        format!("s3://{} ({})", self.bucket, self.endpoint)
    }

    fn location(&self, key: &str) -> String {
        format!("s3://{}/{key}", self.bucket)
    }

    fn location_with_endpoint(&self, key: &str) -> String {
        format!("s3://{}/{key} ({})", self.bucket, self.endpoint)
    }

    /// Uploads, writes the sidecar, verifies. See [`super::Destination::deliver`].
    pub async fn deliver(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<Delivery, DeliveryError> {
        let key = self.object_key(&object.name)?;
        check_source_size(source.as_ref(), object)?;
        self.check_bucket().await?;

        let multipart = object.size >= self.options.multipart_threshold;
        if multipart {
            self.put_multipart(source, object, &key, hooks).await?;
        } else {
            self.put_single(source, object, &key).await?;
            (hooks.progress)(object.size);
        }
        let verified_by = self
            .verify(&key, object.size, &object.sha256, object.crc32, multipart)
            .await?;

        let sidecar_key = self.object_key(&sidecar_name(&object.name))?;
        let sidecar = sidecar_contents(&object.sha256, &object.name).into_bytes();
        let sidecar_sha: [u8; 32] = Sha256::digest(&sidecar).into();
        let sidecar_crc = crc32fast::hash(&sidecar);
        let sidecar_len = sidecar.len() as u64;
        self.put_bytes(
            &sidecar_key,
            sidecar,
            "text/plain; charset=utf-8",
            sidecar_crc,
        )
        .await?;
        self.verify(&sidecar_key, sidecar_len, &sidecar_sha, sidecar_crc, false)
            .await?;

        tracing::info!(
            location = %self.location(&key),
            size = object.size,
            multipart,
            verified_by = verified_by.as_str(),
            "recording delivered"
        );
        Ok(Delivery {
            location: self.location(&key),
            key,
            sidecar_location: self.location(&sidecar_key),
            verified_by,
        })
    }

    /// HeadBucket before writing. A missing bucket must be reported as such
    /// (some S3-compatibles, s3s-fs among them, would create it on PUT). A 403
    /// is not conclusive, since write-only credentials may not list the
    /// bucket; the PUT itself will tell.
    async fn check_bucket(&self) -> Result<(), DeliveryError> {
        let location = format!("s3://{} ({})", self.bucket, self.endpoint);
        match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => Ok(()),
            Err(e) => match e.raw_response().map(|r| r.status().as_u16()) {
                Some(403) => Ok(()),
                // HEAD responses carry no error body: name the cause ourselves.
                Some(404) => {
                    let (permanent, step, hint) =
                        classify_provider(Some(404), Some("NoSuchBucket"));
                    Err(DeliveryError::Provider {
                        location,
                        operation: "HeadBucket",
                        status: Some(404),
                        code: Some("NoSuchBucket".to_owned()),
                        message: None,
                        permanent,
                        step,
                        hint,
                    })
                }
                _ => Err(sdk_error(e, "HeadBucket", location)),
            },
        }
    }

    fn recording_crc(&self, crc: u32) -> u32 {
        if self.options.corrupt_checksum_for_test {
            !crc
        } else {
            crc
        }
    }

    /// One PutObject streamed from the source with an explicit length, with
    /// `x-amz-checksum-crc32` (the intake CRC-32) as a plain header: S3 checks
    /// it against the bytes received and answers 400 BadDigest on mismatch
    /// (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html>).
    /// A source that fails mid-body fails the request, so nothing is stored
    /// under the key (the provider never receives the declared length). The
    /// SDK may resend the request after a 5xx or a broken connection: the
    /// body then reads the range from the source again (see
    /// [`body::streamed`]). A failed source read is not resent by the SDK (it
    /// is the caller's error, not the connection's); the job's own retry
    /// policy decides, and a backup that failed authentication is not retried.
    async fn put_single(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        key: &str,
    ) -> Result<(), DeliveryError> {
        let errors = ReadErrors::default();
        let body = body::streamed(source, 0, object.size, BODY_BUFFER, errors.clone());
        let sent = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(body)
            .content_length(len_i64(object.size))
            .content_type(object.content_type_or_default())
            .checksum_crc32(crc32_header(self.recording_crc(object.crc32)))
            .metadata(SHA256_METADATA, hex::encode(object.sha256))
            .send()
            .await;
        match sent {
            Ok(_) => Ok(()),
            Err(e) => match errors.take() {
                Some(read) => Err(DeliveryError::from_source_read(read)),
                None => Err(self
                    .explain_broken_put(key, self.sdk_error(e, "PutObject", key))
                    .await),
            },
        }
    }

    /// A server that refuses a request's signature before reading its body
    /// may close the connection while the body is still being sent; the
    /// client then sees a broken pipe (transient) instead of the 403, and a
    /// wrong secret would be retried as an outage. So after a broken PutObject
    /// this asks again with a request that has no body (GetObject of the
    /// key's first byte, under the same credential): SignatureDoesNotMatch or
    /// InvalidAccessKeyId there is the answer. Anything else (NoSuchKey,
    /// AccessDenied for a write-only credential, another broken connection)
    /// keeps the original error.
    async fn explain_broken_put(&self, key: &str, original: DeliveryError) -> DeliveryError {
        if !matches!(original, DeliveryError::Connection { .. }) {
            return original;
        }
        let Err(e) = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .range("bytes=0-0")
            .send()
            .await
        else {
            return original;
        };
        let answer = self.sdk_error(e, "PutObject", key);
        match &answer {
            DeliveryError::Provider {
                code: Some(code), ..
            } if code == "SignatureDoesNotMatch" || code == "InvalidAccessKeyId" => {
                tracing::info!(location = %self.location(key), %code, "the PutObject connection broke; a request without a body named the reason");
                answer
            }
            _ => original,
        }
    }

    async fn put_bytes(
        &self,
        key: &str,
        bytes: Vec<u8>,
        content_type: &str,
        crc: u32,
    ) -> Result<(), DeliveryError> {
        let len = bytes.len() as u64;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(ByteStream::from(bytes))
            .content_length(len_i64(len))
            .content_type(content_type)
            .checksum_crc32(crc32_header(crc))
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "PutObject", key))?;
        Ok(())
    }

    /// Multipart upload: CreateMultipartUpload declaring a FULL_OBJECT CRC-32,
    /// parts streamed from the source each with its own `x-amz-checksum-crc32`, and
    /// CompleteMultipartUpload with the whole object's CRC-32
    /// (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/checking-object-integrity.html#full-object-checksums>).
    async fn put_multipart(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        key: &str,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<(), DeliveryError> {
        let part_size = effective_part_size(object.size, self.options.part_size);
        let mut existing = Vec::new();
        let mut upload_id = None;
        if let Some(id) = hooks.resume_upload_id {
            match self.list_parts(key, id).await {
                Ok(parts) if !parts.is_empty() => {
                    existing = parts;
                    upload_id = Some(id.to_owned());
                }
                // Nothing to keep. Starting afresh also covers providers that
                // list an unknown upload as empty instead of answering 404
                // NoSuchUpload (s3s-fs does, then refuses its parts with 403).
                Ok(_) => self.abort_and_report(key, id, hooks).await,
                Err(e) if e.http_status() == Some(404) => {
                    tracing::info!(location = %self.location(key), "earlier multipart upload is gone; starting a new one");
                }
                Err(e) => return Err(e),
            }
        }
        let upload_id = match upload_id {
            Some(id) => id,
            None => {
                self.abort_unrecorded_uploads(key).await?;
                let id = self.create_multipart(object, key).await?;
                // Durable before any part is sent (the hook commits the id).
                if let Err(e) = (hooks.on_multipart_started)(id.clone()).await {
                    self.abort_and_report(key, &id, hooks).await;
                    return Err(DeliveryError::Hook {
                        location: self.location(key),
                        message: e.to_string(),
                    });
                }
                id
            }
        };

        let result = self
            .upload_and_complete(source, object, key, &upload_id, part_size, existing, hooks)
            .await;
        match &result {
            // Completed: the provider holds no upload under this id any more.
            Ok(()) => report_closed(hooks, &upload_id).await,
            // Nobody will resume it: do not leave parts behind (they are
            // billed). Only an abort that worked lets the id be forgotten.
            Err(e) if e.is_permanent() => self.abort_and_report(key, &upload_id, hooks).await,
            // Retried: the next attempt resumes it.
            Err(_) => {}
        }
        result
    }

    /// Aborts `upload_id`; once that worked, tells `on_multipart_closed`. A
    /// failed abort is logged and the id is not reported, so it is kept.
    async fn abort_and_report(&self, key: &str, upload_id: &str, hooks: &DeliveryHooks<'_>) {
        match self.abort_multipart(key, upload_id).await {
            Ok(()) => report_closed(hooks, upload_id).await,
            Err(e) => tracing::warn!(
                location = %self.location(key),
                %upload_id,
                error = %e,
                "could not abort a multipart upload; it is not reported closed, so a job that recorded its id keeps it for a resend or the next attempt to abort or resume"
            ),
        }
    }

    /// Aborts every multipart upload still in progress for exactly `key`,
    /// before a new one is created for it (there is no recorded upload to
    /// resume). It closes the one window the job store cannot: a crash after
    /// the provider created an upload but before its id was committed, which
    /// leaves an upload nobody knows about and whose parts are billed for
    /// ever. The key is the recording's own, so any upload for it is one of
    /// ours that was interrupted.
    ///
    /// ListMultipartUploads (prefix = the key, every page; only entries whose
    /// key equals it exactly), then AbortMultipartUpload for each. A provider
    /// that does not implement the listing (NotImplemented / 501, s3s-fs for
    /// one) or a credential not allowed to list (`s3:ListBucketMultipartUploads`)
    /// does not fail the delivery: it is logged and the delivery goes on.
    /// Other failures (a busy provider, a broken connection) fail the attempt
    /// as transient, so it is retried instead of leaving an upload behind.
    ///
    /// This is best effort by nature: the operator's safety net remains an S3
    /// lifecycle rule `AbortIncompleteMultipartUpload` on the bucket
    /// (<https://docs.aws.amazon.com/AmazonS3/latest/userguide/mpu-abort-incomplete-mpu-lifecycle-config.html>).
    async fn abort_unrecorded_uploads(&self, key: &str) -> Result<(), DeliveryError> {
        let location = self.location(key);
        let stale = match self.list_uploads_for_key(key).await {
            Ok(ids) => ids,
            Err(e)
                if e.http_status() == Some(501) || e.provider_code() == Some("NotImplemented") =>
            {
                tracing::info!(
                    %location,
                    "the provider does not implement ListMultipartUploads, so an upload left by a crash before its id was recorded cannot be found; an AbortIncompleteMultipartUpload lifecycle rule on the bucket cleans such uploads up"
                );
                return Ok(());
            }
            Err(e) if e.is_permanent() => {
                tracing::warn!(
                    %location,
                    error = %e,
                    "cannot list in-progress multipart uploads (grant s3:ListBucketMultipartUploads to find uploads left by a crash); delivering anyway"
                );
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        for upload_id in stale {
            tracing::info!(
                %location,
                %upload_id,
                "aborting a multipart upload left by an interrupted attempt"
            );
            match self.abort_multipart(key, &upload_id).await {
                Ok(()) => {}
                Err(e) if e.is_permanent() => tracing::warn!(
                    %location,
                    %upload_id,
                    error = %e,
                    "could not abort a multipart upload left by an interrupted attempt; delivering anyway"
                ),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The ids of the multipart uploads in progress for exactly `key`, from
    /// every page of ListMultipartUploads with prefix `key`.
    async fn list_uploads_for_key(&self, key: &str) -> Result<Vec<String>, DeliveryError> {
        let uploads = list_multipart_uploads(&self.client, &self.bucket, key)
            .await
            .map_err(|e| self.sdk_error(e, "ListMultipartUploads", key))?;
        let mut ids: Vec<String> = Vec::new();
        for upload in &uploads {
            if upload.key() == Some(key)
                && let Some(id) = upload.upload_id()
                && !ids.iter().any(|known| known == id)
            {
                ids.push(id.to_owned());
            }
        }
        Ok(ids)
    }

    async fn create_multipart(
        &self,
        object: &ObjectInfo,
        key: &str,
    ) -> Result<String, DeliveryError> {
        let out = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(object.content_type_or_default())
            .metadata(SHA256_METADATA, hex::encode(object.sha256))
            .checksum_algorithm(ChecksumAlgorithm::Crc32)
            .checksum_type(ChecksumType::FullObject)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "CreateMultipartUpload", key))?;
        out.upload_id.ok_or_else(|| DeliveryError::Provider {
            location: self.location_with_endpoint(key),
            operation: "CreateMultipartUpload",
            status: None,
            code: None,
            message: Some("the response carried no upload id".into()),
            permanent: false,
            step: super::ProbeStep::Other,
            hint: "the provider answered incompletely; it will be retried",
        })
    }

    /// Parts already uploaded under `upload_id` (all pages).
    async fn list_parts(
        &self,
        key: &str,
        upload_id: &str,
    ) -> Result<Vec<ExistingPart>, DeliveryError> {
        let mut parts = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let out = self
                .client
                .list_parts()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .set_part_number_marker(marker.clone())
                .send()
                .await
                .map_err(|e| self.sdk_error(e, "ListParts", key))?;
            for p in out.parts() {
                if let (Some(number), Some(size)) = (p.part_number(), p.size()) {
                    parts.push(ExistingPart {
                        number,
                        size: u64::try_from(size).unwrap_or(u64::MAX),
                        e_tag: p.e_tag().map(str::to_owned),
                        crc32: p.checksum_crc32().map(str::to_owned),
                    });
                }
            }
            match (out.is_truncated(), out.next_part_number_marker()) {
                (Some(true), Some(next)) if Some(next) != marker.as_deref() => {
                    marker = Some(next.to_owned())
                }
                _ => break,
            }
        }
        Ok(parts)
    }

    #[allow(clippy::too_many_arguments)]
    async fn upload_and_complete(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        key: &str,
        upload_id: &str,
        part_size: u64,
        existing: Vec<ExistingPart>,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<(), DeliveryError> {
        let part_count = object.size.div_ceil(part_size).max(1);
        let shared = Arc::new(PartShared {
            client: self.client.clone(),
            bucket: self.bucket.clone(),
            key: key.to_owned(),
            upload_id: upload_id.to_owned(),
            source,
            location: self.location_with_endpoint(key),
            corrupt: self.options.corrupt_checksum_for_test,
        });
        let mut existing: std::collections::HashMap<i32, ExistingPart> =
            existing.into_iter().map(|p| (p.number, p)).collect();

        let mut done: Vec<Option<PartDone>> = (0..part_count).map(|_| None).collect();
        let mut tasks = JoinSet::new();
        let mut next: u64 = 0;
        let mut uploaded: u64 = 0;
        let concurrency = self.options.concurrency.max(1);
        while next < part_count || !tasks.is_empty() {
            while next < part_count && tasks.len() < concurrency {
                let offset = next * part_size;
                let len = part_size.min(object.size - offset);
                let number = i32::try_from(next + 1).unwrap_or(i32::MAX);
                let previous = existing.remove(&number);
                tasks.spawn(upload_part(
                    Arc::clone(&shared),
                    number,
                    offset,
                    len,
                    previous,
                ));
                next += 1;
            }
            let Some(joined) = tasks.join_next().await else {
                break;
            };
            let part = match joined {
                Ok(result) => result?,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(_) => {
                    return Err(DeliveryError::Connection {
                        location: self.location_with_endpoint(key),
                        operation: "UploadPart",
                        step: super::ProbeStep::Other,
                        message: "the part upload was cancelled".into(),
                        hint: "the uploader is shutting down; it will be retried",
                    });
                }
            };
            uploaded += part.len;
            (hooks.progress)(uploaded);
            let index = usize::try_from(part.number - 1).unwrap_or(usize::MAX);
            if let Some(slot) = done.get_mut(index) {
                *slot = Some(part);
            }
        }
        let parts: Vec<PartDone> = done.into_iter().flatten().collect();

        // The parts' CRCs, combined, must equal the CRC recorded at intake:
        // otherwise the backup changed since and must not be completed.
        let mut whole = crc32fast::Hasher::new();
        for p in &parts {
            whole.combine(&crc32fast::Hasher::new_with_initial_len(p.crc32, p.len));
        }
        if whole.finalize() != object.crc32 {
            return Err(DeliveryError::SourceMismatch { what: "CRC-32" });
        }

        let completed = CompletedMultipartUpload::builder()
            .set_parts(Some(
                parts
                    .iter()
                    .map(|p| {
                        CompletedPart::builder()
                            .part_number(p.number)
                            .e_tag(&p.e_tag)
                            .checksum_crc32(crc32_header(p.sent_crc32))
                            .build()
                    })
                    .collect(),
            ))
            .build();
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(completed)
            .checksum_type(ChecksumType::FullObject)
            .checksum_crc32(crc32_header(self.recording_crc(object.crc32)))
            .mpu_object_size(len_i64(object.size))
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "CompleteMultipartUpload", key))?;
        Ok(())
    }

    /// HEAD with `x-amz-checksum-mode: ENABLED`
    /// (<https://docs.aws.amazon.com/AmazonS3/latest/API/API_HeadObject.html#AmazonS3-HeadObject-request-header-ChecksumMode>):
    /// compare size and, when the provider returns a whole-object CRC-32,
    /// that; otherwise read the object back and compare its SHA-256.
    async fn verify(
        &self,
        key: &str,
        size: u64,
        sha256: &[u8; 32],
        crc32: u32,
        multipart: bool,
    ) -> Result<VerifiedBy, DeliveryError> {
        let head = self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .checksum_mode(ChecksumMode::Enabled)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "HeadObject", key))?;
        let mismatch = |detail: String| DeliveryError::Verification {
            location: self.location_with_endpoint(key),
            detail,
        };
        let stored_len = head.content_length().and_then(|l| u64::try_from(l).ok());
        if stored_len != Some(size) {
            return Err(mismatch(format!(
                "the provider reports {} bytes, {size} were sent",
                stored_len.map_or_else(|| "an unknown number of".to_owned(), |l| l.to_string())
            )));
        }
        if let Some(stored) = head.metadata().and_then(|m| m.get(SHA256_METADATA))
            && !stored.eq_ignore_ascii_case(&hex::encode(sha256))
        {
            return Err(mismatch(
                "the object's sha256 metadata differs from the recording's".into(),
            ));
        }
        if let Some(stored) = full_object_crc32(&head, multipart) {
            if stored == crc32_header(crc32) {
                return Ok(VerifiedBy::ProviderChecksum);
            }
            return Err(mismatch(format!(
                "the provider's CRC-32 is {stored}, the recording's is {}",
                crc32_header(crc32)
            )));
        }
        self.read_back(key, size, sha256).await?;
        Ok(VerifiedBy::ReadBack)
    }

    /// Reads the object back and compares its size and SHA-256. Objects up to
    /// [`READ_BACK_SINGLE_MAX`] come in one GET; larger ones in ranged GETs,
    /// several requested ahead and read in order (see [`Self::read_back_ranged`]).
    /// One stream is slow on many servers (s3s-fs serves a GET in 4 KiB
    /// reads, about 60 MiB/s here; one connection to AWS S3 is limited too),
    /// so a large read-back would otherwise take far longer than the upload.
    async fn read_back(
        &self,
        key: &str,
        size: u64,
        sha256: &[u8; 32],
    ) -> Result<(), DeliveryError> {
        let mut ranged = None;
        if size > READ_BACK_SINGLE_MAX {
            ranged = self
                .read_back_ranged(key, size, READ_BACK_RANGE, self.options.read_back_streams)
                .await?;
        }
        // Also the fallback when the server ignored the Range header.
        let (read, digest) = match ranged {
            Some(r) => r,
            None => self.read_back_whole(key).await?,
        };
        if read != size || &digest != sha256 {
            return Err(DeliveryError::Verification {
                location: self.location_with_endpoint(key),
                detail: format!(
                    "read back {read} bytes with SHA-256 {}, expected {size} bytes with SHA-256 {}",
                    hex::encode(digest),
                    hex::encode(sha256)
                ),
            });
        }
        Ok(())
    }

    /// GetObject, streamed through SHA-256.
    async fn read_back_whole(&self, key: &str) -> Result<(u64, [u8; 32]), DeliveryError> {
        let out = self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "GetObject", key))?;
        let mut hasher = OrderedHasher::default();
        let read = hash_body(
            out.body,
            u64::MAX,
            &mut hasher,
            &self.location_with_endpoint(key),
        )
        .await?;
        Ok((read, hasher.finish().await))
    }

    /// Ranged GETs of `range` bytes with up to `ahead` requested at once, their
    /// bodies read strictly in order through one SHA-256. A range requested
    /// ahead is not read by us until its turn: the server starts sending it
    /// at once and the bytes wait in the kernel's socket buffers (HTTP flow
    /// control stops the server when those are full), so the server works on
    /// several ranges in parallel while this process holds no range in its
    /// own memory. `None` if the server ignored the Range header (the caller
    /// reads the object whole).
    async fn read_back_ranged(
        &self,
        key: &str,
        size: u64,
        range: u64,
        ahead: usize,
    ) -> Result<Option<(u64, [u8; 32])>, DeliveryError> {
        let count = size.div_ceil(range);
        let location = self.location_with_endpoint(key);
        let mut requested: std::collections::VecDeque<
            tokio::task::JoinHandle<Result<GetObjectOutput, DeliveryError>>,
        > = std::collections::VecDeque::new();
        let mut hasher = OrderedHasher::default();
        let (mut next, mut read) = (0u64, 0u64);
        let result = async {
            for index in 0..count {
                while next < count && requested.len() < ahead.max(1) {
                    let start = next * range;
                    let len = range.min(size - start);
                    let request = self
                        .client
                        .get_object()
                        .bucket(&self.bucket)
                        .key(key)
                        .range(format!("bytes={start}-{}", start + len - 1));
                    let location = location.clone();
                    requested.push_back(tokio::spawn(async move {
                        request
                            .send()
                            .await
                            .map_err(|e| sdk_error(e, "GetObject", location))
                    }));
                    next += 1;
                }
                let Some(handle) = requested.pop_front() else {
                    break;
                };
                let out = match handle.await {
                    Ok(out) => out?,
                    Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                    Err(_) => {
                        return Err(DeliveryError::Connection {
                            location: location.clone(),
                            operation: "GetObject",
                            step: super::ProbeStep::Other,
                            message: "the read-back was cancelled".into(),
                            hint: "the uploader is shutting down; it will be retried",
                        });
                    }
                };
                if out.content_range().is_none() {
                    return Ok(None);
                }
                let len = range.min(size - index * range);
                let got = hash_body(out.body, len, &mut hasher, &location).await?;
                if got != len {
                    return Err(DeliveryError::Verification {
                        location: location.clone(),
                        detail: format!("a ranged read-back of {len} bytes returned {got}"),
                    });
                }
                read += got;
            }
            Ok(Some(()))
        }
        .await;
        // Requests still out (after an error) are dropped with their connections.
        for handle in requested {
            handle.abort();
        }
        Ok(match result? {
            Some(()) => Some((read, hasher.finish().await)),
            None => None,
        })
    }

    /// Writes and deletes a small probe object under the prefix.
    pub async fn probe(&self) -> Result<(), ProbeError> {
        let key = self.object_key(&format!(".recvault-probe-{}", uuid::Uuid::new_v4()))?;
        self.check_bucket().await?;
        let body = b"recvault destination probe\n".to_vec();
        let crc = crc32fast::hash(&body);
        self.put_bytes(&key, body, "text/plain; charset=utf-8", crc)
            .await?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(&key)
            .send()
            .await
            .map_err(|e| self.sdk_error(e, "DeleteObject", &key))?;
        Ok(())
    }

    /// Aborts a multipart upload; one that no longer exists counts as aborted.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), DeliveryError> {
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
            Err(e) => Err(self.sdk_error(e, "AbortMultipartUpload", key)),
        }
    }

    fn sdk_error<E>(
        &self,
        err: SdkError<E, HttpResponse>,
        operation: &'static str,
        key: &str,
    ) -> DeliveryError
    where
        E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
    {
        sdk_error(err, operation, self.location_with_endpoint(key))
    }
}

/// The multipart uploads in progress under `prefix`, from every page of
/// ListMultipartUploads (key and upload-id markers, stopping when a page
/// does not move them on).
pub(crate) async fn list_multipart_uploads(
    client: &Client,
    bucket: &str,
    prefix: &str,
) -> Result<Vec<MultipartUpload>, SdkError<ListMultipartUploadsError, HttpResponse>> {
    let mut uploads = Vec::new();
    let mut key_marker: Option<String> = None;
    let mut upload_id_marker: Option<String> = None;
    loop {
        let out = client
            .list_multipart_uploads()
            .bucket(bucket)
            .prefix(prefix)
            .set_key_marker(key_marker.clone())
            .set_upload_id_marker(upload_id_marker.clone())
            .send()
            .await?;
        uploads.extend(out.uploads().iter().cloned());
        let next_key = out.next_key_marker().map(str::to_owned);
        let next_id = out.next_upload_id_marker().map(str::to_owned);
        let progressed =
            next_key.is_some() && (next_key != key_marker || next_id != upload_id_marker);
        if out.is_truncated() != Some(true) || !progressed {
            break;
        }
        key_marker = next_key;
        upload_id_marker = next_id;
    }
    Ok(uploads)
}

/// Awaits `on_multipart_closed` for `upload_id`; its error is only logged
/// (the id then stays recorded, which costs at most a needless abort later).
async fn report_closed(hooks: &DeliveryHooks<'_>, upload_id: &str) {
    if let Err(error) = (hooks.on_multipart_closed)(upload_id.to_owned()).await {
        tracing::warn!(%upload_id, %error, "recording that a multipart upload is closed failed");
    }
}

/// Maps an SDK error to a classified, secret-free error. Only the error code,
/// message and status are used: never the raw request or response, which
/// carry the Authorization header.
fn sdk_error<E>(
    err: SdkError<E, HttpResponse>,
    operation: &'static str,
    location: String,
) -> DeliveryError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    match &err {
        SdkError::ServiceError(_) | SdkError::ResponseError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            let code = err.code().map(str::to_owned);
            let message = err.message().map(trim_message);
            let (permanent, step, hint) = classify_provider(status, code.as_deref());
            DeliveryError::Provider {
                location,
                operation,
                status,
                code,
                message,
                permanent,
                step,
                hint,
            }
        }
        SdkError::TimeoutError(_) => DeliveryError::Connection {
            location,
            operation,
            step: super::ProbeStep::Connect,
            message: "timed out".into(),
            hint: "the provider did not answer in time; it will be retried",
        },
        SdkError::ConstructionFailure(_) => {
            let (_, message) = describe_connect_error(&err);
            DeliveryError::Config {
                destination: location,
                message: format!("{operation}: cannot build the request: {message}"),
            }
        }
        _ => {
            let (step, message) = describe_connect_error(&err);
            DeliveryError::Connection {
                location,
                operation,
                step,
                message,
                hint: connect_hint(step),
            }
        }
    }
}

/// Provider messages are for people; keep them to one short line.
pub(crate) fn trim_message(m: &str) -> String {
    let line = m.lines().next().unwrap_or_default().trim();
    if line.chars().count() > 300 {
        let mut s: String = line.chars().take(300).collect();
        s.push('…');
        s
    } else {
        line.to_owned()
    }
}

pub(crate) fn len_i64(len: u64) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

/// The part size actually used: at least 5 MiB, and large enough that the
/// file fits in 10 000 parts (rounded up to whole MiB).
fn effective_part_size(size: u64, configured: u64) -> u64 {
    const MIB: u64 = 1024 * 1024;
    let needed = size.div_ceil(MAX_PARTS).div_ceil(MIB) * MIB;
    configured.max(MIN_PART_SIZE).max(needed)
}

/// A part listed by ListParts for an upload being resumed.
#[derive(Debug)]
struct ExistingPart {
    number: i32,
    size: u64,
    e_tag: Option<String>,
    crc32: Option<String>,
}

/// What every part task of one upload shares.
struct PartShared {
    client: Client,
    bucket: String,
    key: String,
    upload_id: String,
    source: Arc<dyn Source>,
    location: String,
    corrupt: bool,
}

#[derive(Debug)]
struct PartDone {
    number: i32,
    len: u64,
    e_tag: String,
    /// The part's true CRC-32.
    crc32: u32,
    /// The CRC-32 sent for the part (differs only in corruption tests).
    sent_crc32: u32,
}

/// Computes the part's CRC-32 by reading its range from the source, then
/// streams it from a second read of the range with that CRC as the
/// `x-amz-checksum-crc32` header (the value must be known before the body is
/// sent, since no trailers are used). A part already uploaded by an earlier
/// attempt with the same size (and CRC-32, when listed) is kept.
async fn upload_part(
    shared: Arc<PartShared>,
    number: i32,
    offset: u64,
    len: u64,
    previous: Option<ExistingPart>,
) -> Result<PartDone, DeliveryError> {
    let crc32 = source_range_crc32(shared.source.as_ref(), offset, len)
        .await
        .map_err(DeliveryError::from_source_read)?;
    let sent_crc32 = if shared.corrupt { !crc32 } else { crc32 };

    if let Some(previous) = previous
        && previous.size == len
        && previous
            .crc32
            .as_deref()
            .is_none_or(|c| c == crc32_header(crc32))
        && let Some(e_tag) = previous.e_tag
    {
        return Ok(PartDone {
            number,
            len,
            e_tag,
            crc32,
            sent_crc32,
        });
    }

    let errors = ReadErrors::default();
    let body = body::streamed(
        Arc::clone(&shared.source),
        offset,
        len,
        BODY_BUFFER,
        errors.clone(),
    );
    let out = shared
        .client
        .upload_part()
        .bucket(&shared.bucket)
        .key(&shared.key)
        .upload_id(&shared.upload_id)
        .part_number(number)
        .content_length(len_i64(len))
        .checksum_crc32(crc32_header(sent_crc32))
        .body(body)
        .send()
        .await
        .map_err(|e| match errors.take() {
            Some(read) => DeliveryError::from_source_read(read),
            None => sdk_error(e, "UploadPart", shared.location.clone()),
        })?;
    let e_tag = out.e_tag.ok_or_else(|| DeliveryError::Provider {
        location: shared.location.clone(),
        operation: "UploadPart",
        status: None,
        code: None,
        message: Some(format!("part {number}: the response carried no ETag")),
        permanent: false,
        step: super::ProbeStep::Other,
        hint: "the provider answered incompletely; it will be retried",
    })?;
    Ok(PartDone {
        number,
        len,
        e_tag,
        crc32,
        sent_crc32,
    })
}

/// Feeds a GET body through `hasher`; returns its length. More than `max`
/// bytes is an error (reading stops there).
async fn hash_body(
    mut body: ByteStream,
    max: u64,
    hasher: &mut OrderedHasher,
    location: &str,
) -> Result<u64, DeliveryError> {
    let mut read = 0u64;
    loop {
        match body.try_next().await {
            Ok(Some(chunk)) => {
                read += chunk.len() as u64;
                if read > max {
                    return Err(DeliveryError::Verification {
                        location: location.to_owned(),
                        detail: format!(
                            "a ranged read-back of {max} bytes returned {read} or more"
                        ),
                    });
                }
                hasher.update(&chunk).await;
            }
            Ok(None) => return Ok(read),
            Err(e) => return Err(read_back_failed(&e, location.to_owned())),
        }
    }
}

/// SHA-256 of a byte stream, hashed on a blocking thread in blocks of
/// [`HASH_BLOCK`] while the next block fills (hashing a block takes about a
/// millisecond, too long for the async runtime). Memory: two blocks.
struct OrderedHasher {
    filling: Vec<u8>,
    hashing: Option<tokio::task::JoinHandle<(Sha256, Vec<u8>)>>,
    idle: Option<Sha256>,
}

/// Bytes hashed per blocking call of [`OrderedHasher`].
const HASH_BLOCK: usize = 1024 * 1024;

impl Default for OrderedHasher {
    fn default() -> Self {
        Self {
            filling: Vec::with_capacity(HASH_BLOCK),
            hashing: None,
            idle: Some(Sha256::new()),
        }
    }
}

impl OrderedHasher {
    async fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let take = (HASH_BLOCK - self.filling.len()).min(data.len());
            self.filling.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.filling.len() == HASH_BLOCK {
                self.hand_off().await;
            }
        }
    }

    /// Waits for the block being hashed, then starts on the filled one.
    async fn hand_off(&mut self) {
        let (mut hasher, spare) = self.wait().await;
        let block = std::mem::replace(&mut self.filling, spare);
        self.hashing = Some(tokio::task::spawn_blocking(move || {
            hasher.update(&block);
            (hasher, block)
        }));
        self.filling.clear();
    }

    async fn wait(&mut self) -> (Sha256, Vec<u8>) {
        match self.hashing.take() {
            Some(handle) => {
                let (hasher, mut block) = handle
                    .await
                    .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
                block.clear();
                (hasher, block)
            }
            None => (
                self.idle.take().unwrap_or_default(),
                Vec::with_capacity(HASH_BLOCK),
            ),
        }
    }

    async fn finish(mut self) -> [u8; 32] {
        let (mut hasher, _) = self.wait().await;
        let last = std::mem::take(&mut self.filling);
        tokio::task::spawn_blocking(move || {
            hasher.update(&last);
            hasher.finalize().into()
        })
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
    }
}

fn read_back_failed(e: &(dyn std::error::Error + 'static), location: String) -> DeliveryError {
    let (step, message) = describe_connect_error(e);
    DeliveryError::Connection {
        location,
        operation: "GetObject",
        step,
        message: format!("reading the object back failed: {message}"),
        hint: connect_hint(step),
    }
}

/// CRC-32 of the source's bytes `offset .. offset + len`, read in
/// [`CRC_BUFFER`] pieces (crc32fast folds a piece in microseconds, so this
/// stays on the async runtime; a source that decrypts does its own work).
async fn source_range_crc32(source: &dyn Source, offset: u64, len: u64) -> std::io::Result<u32> {
    let mut reader = source.open_range(offset, len).await?;
    let mut buf = vec![0u8; CRC_BUFFER];
    let mut hasher = crc32fast::Hasher::new();
    let mut read: u64 = 0;
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        read += n as u64;
    }
    if read != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the source returned {read} of the {len} bytes of range {offset}+{len}"),
        ));
    }
    Ok(hasher.finalize())
}

// The crate's in-process s3s-fs test host, for the tests below and the worker's.
#[cfg(test)]
#[path = "../../tests/support/s3.rs"]
pub(crate) mod s3_server;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc_header_is_base64_big_endian() {
        // CRC-32 of "123456789" is 0xCBF43926 (the standard check value).
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32_header(0xCBF4_3926), "y/Q5Jg==");
    }

    #[test]
    fn part_size_stays_within_limits() {
        const MIB: u64 = 1024 * 1024;
        assert_eq!(effective_part_size(40 * MIB, 8 * MIB), 8 * MIB);
        assert_eq!(effective_part_size(40 * MIB, MIB), 5 * MIB);
        let huge = 200 * 1024 * MIB; // 200 GiB
        let p = effective_part_size(huge, 8 * MIB);
        assert!(huge.div_ceil(p) <= MAX_PARTS);
    }

    /// Hashing in blocks on a blocking thread gives the plain SHA-256,
    /// whatever the chunk sizes (across, at and inside block boundaries).
    #[tokio::test]
    async fn ordered_hasher_matches_plain_sha256() {
        let data: Vec<u8> = (0..3 * HASH_BLOCK + 17)
            .map(|i| (i * 7 % 253) as u8)
            .collect();
        for chunk in [4093, HASH_BLOCK - 1, HASH_BLOCK, HASH_BLOCK + 5, data.len()] {
            let mut hasher = OrderedHasher::default();
            for piece in data.chunks(chunk) {
                hasher.update(piece).await;
            }
            let expected: [u8; 32] = Sha256::digest(&data).into();
            assert_eq!(hasher.finish().await, expected, "chunk size {chunk}");
        }
        let empty = OrderedHasher::default().finish().await;
        assert_eq!(empty, <[u8; 32]>::from(Sha256::digest(b"")));
    }

    /// Ranged read-back: every byte once, in order, `concurrency` at a time,
    /// including a short last range; a changed object is caught.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[allow(clippy::unwrap_used)]
    async fn ranged_read_back_hashes_every_range_in_order() {
        const MIB: u64 = 1024 * 1024;
        let server = super::s3_server::S3Server::start().await;
        server.create_bucket("media");
        let size = 5 * MIB + 3;
        let data: Vec<u8> = (0..size).map(|i| (i * 31 % 251) as u8).collect();
        server
            .client()
            .put_object()
            .bucket("media")
            .key("r.bin")
            .body(ByteStream::from(data.clone()))
            .send()
            .await
            .unwrap();
        let config = DestinationConfig {
            provider: super::super::Provider::S3,
            endpoint: server.endpoint.clone(),
            region: String::new(),
            bucket: "media".into(),
            prefix: String::new(),
            path_style: true,
        };
        let credential = S3Credential::from_json(server.credential_json().as_bytes()).unwrap();
        let d = S3Destination::new(&config, &credential, S3Options::default()).unwrap();
        server.clear_requests();

        let (read, digest) = d
            .read_back_ranged("r.bin", size, MIB, 3)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(read, size);
        assert_eq!(digest, <[u8; 32]>::from(Sha256::digest(&data)));
        let mut ranges: Vec<String> = server
            .requests_of("GetObject")
            .iter()
            .map(|r| r.header("range").unwrap().to_owned())
            .collect();
        ranges.sort_by_key(|r| r[6..].split('-').next().unwrap().parse::<u64>().unwrap());
        let expected: Vec<String> = (0..6)
            .map(|i| format!("bytes={}-{}", i * MIB, ((i + 1) * MIB).min(size) - 1))
            .collect();
        assert_eq!(ranges, expected);

        let sha: [u8; 32] = Sha256::digest(&data).into();
        d.read_back("r.bin", size, &sha).await.unwrap();
        let mut other = sha;
        other[0] ^= 1;
        let err = d.read_back("r.bin", size, &other).await.unwrap_err();
        assert!(matches!(err, DeliveryError::Verification { .. }), "{err}");
    }
}
