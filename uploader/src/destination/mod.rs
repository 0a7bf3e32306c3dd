//! Delivery destinations: upload one recording, write its `<name>.sha256`
//! sidecar, and verify what the destination now holds before anyone may
//! delete the backup. This module never decides about retries or job state; it
//! classifies errors (`DeliveryError::is_permanent`) and the caller decides.
//! It never keeps a credential beyond the destination value's lifetime.

pub mod fs;
pub mod s3;
pub mod source;

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

pub use self::fs::{FsAllowedRoots, FsDestination, FsRootError};
pub use self::s3::{S3Destination, S3Options};
pub use self::source::{FileSource, RangeFuture, RangeReader, Source};
use crate::credential::{CredentialError, S3Credential};

/// A storage provider a destination can point at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Provider {
    /// Amazon S3 or an S3-compatible service (`"s3"`).
    S3,
    /// A local directory (`"fs"`): the embedded default.
    Fs,
}

impl Provider {
    /// The wire name (`PutDestinationRequest.provider`).
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::S3 => "s3",
            Provider::Fs => "fs",
        }
    }
}

impl fmt::Display for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The provider name is not one this uploader supports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown storage provider {0:?}; supported: \"s3\", \"fs\"")]
pub struct UnknownProvider(pub String);

impl FromStr for Provider {
    type Err = UnknownProvider;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "s3" => Ok(Provider::S3),
            "fs" => Ok(Provider::Fs),
            other => Err(UnknownProvider(other.to_owned())),
        }
    }
}

/// Where recordings go: the non-secret half of a destination (the credential
/// is leased per attempt and passed separately).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DestinationConfig {
    /// Which provider.
    pub provider: Provider,
    /// Custom endpoint URL (`http://host:port` or `https://…`); empty for AWS.
    pub endpoint: String,
    /// Region used for signing; empty means `us-east-1`.
    pub region: String,
    /// Bucket name; for `fs`, the destination directory.
    pub bucket: String,
    /// Key prefix ("folder") under which recordings are written; may be empty.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`), needed by most S3-compatibles.
    pub path_style: bool,
}

impl DestinationConfig {
    /// The place objects are really written, normalized, so that two
    /// destinations pointing at the same bucket (or one deleted and created
    /// again) share one namespace of object keys: the provider, the endpoint
    /// (scheme and host lowercased, default port and trailing `/` dropped;
    /// AWS when empty, with its region) and the bucket. Path-style or
    /// virtual-host addressing reach the same bucket, so it is left out.
    /// For `fs`, the directory.
    pub fn real_location(&self) -> String {
        match self.provider {
            Provider::Fs => format!("fs:{}", self.bucket.trim_end_matches('/')),
            Provider::S3 => {
                let endpoint = normalize_endpoint(&self.endpoint);
                let endpoint = if endpoint.is_empty() {
                    let region = if self.region.is_empty() {
                        "us-east-1"
                    } else {
                        &self.region
                    };
                    format!("aws:{region}")
                } else {
                    endpoint
                };
                format!("s3:{endpoint}/{}", self.bucket)
            }
        }
    }
}

/// `HTTPS://Host:443/` → `https://host`: scheme and host lowercased, the
/// scheme's default port and trailing slashes dropped.
fn normalize_endpoint(endpoint: &str) -> String {
    let endpoint = endpoint.trim().trim_end_matches('/');
    let (scheme, rest) = endpoint.split_once("://").unwrap_or(("https", endpoint));
    let scheme = scheme.to_ascii_lowercase();
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    let mut authority = authority.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => ":80",
        "https" => ":443",
        _ => "",
    };
    if !default_port.is_empty() && authority.ends_with(default_port) {
        authority.truncate(authority.len() - default_port.len());
    }
    if authority.is_empty() {
        return String::new();
    }
    if path.is_empty() {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}/{path}")
    }
}

/// What is being delivered. The caller computed the checksums at intake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// File name; the object key is `prefix/name`. Must not contain `/`.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256 of the whole file.
    pub sha256: [u8; 32],
    /// CRC-32/IEEE (as crc32fast computes it) of the whole file.
    pub crc32: u32,
    /// MIME type; empty means `application/octet-stream`.
    pub content_type: String,
}

impl ObjectInfo {
    pub(crate) fn content_type_or_default(&self) -> &str {
        if self.content_type.is_empty() {
            "application/octet-stream"
        } else {
            &self.content_type
        }
    }
}

/// How a delivery was verified (recorded on the job).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VerifiedBy {
    /// The provider returned a CRC-32 for the whole object and it matched.
    ProviderChecksum,
    /// The object was read back and its SHA-256 matched.
    ReadBack,
}

impl VerifiedBy {
    /// Stable name for storage and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifiedBy::ProviderChecksum => "provider_checksum",
            VerifiedBy::ReadBack => "read_back",
        }
    }
}

/// A verified delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Where the recording is, e.g. `s3://bucket/prefix/name` or a path.
    pub location: String,
    /// The object key (`prefix/name`).
    pub key: String,
    /// Where its `sha256sum` sidecar is.
    pub sidecar_location: String,
    /// How the recording was verified.
    pub verified_by: VerifiedBy,
}

/// The error type a hook may return.
pub type HookError = Box<dyn StdError + Send + Sync>;

/// What [`DeliveryHooks::on_multipart_started`] returns: the work of making
/// the upload id durable, awaited before any part is sent. It owns what it
/// needs (`'static`), so it can be handed to other tasks.
pub type HookFuture = Pin<Box<dyn Future<Output = Result<(), HookError>> + Send + 'static>>;

/// Callbacks and resume state for one delivery.
pub struct DeliveryHooks<'a> {
    /// Called with the number of bytes uploaded so far (per part for multipart).
    pub progress: &'a (dyn Fn(u64) + Send + Sync),
    /// Called with a multipart upload id as soon as it is created. Its future
    /// is awaited to completion before the first part is sent: it must have
    /// made the id durable (committed to the job store) by the time it
    /// resolves, so that after a crash the upload is resumed or aborted,
    /// never orphaned. An error aborts the new upload and fails the delivery
    /// (transient). Blocking work (a SQLite commit) belongs on the blocking
    /// pool, not on the async runtime's worker threads.
    pub on_multipart_started: &'a (dyn Fn(String) -> HookFuture + Send + Sync),
    /// Called with a multipart upload id once the provider no longer holds
    /// that upload: it was completed, or an abort succeeded (or found it
    /// gone). Awaited; the id may then be forgotten (cleared from the job),
    /// so a later resend elsewhere is not held up by it. Never called for an
    /// upload whose abort failed: that id must be kept, since the upload
    /// (and its billed parts) may still exist. An error is only logged.
    pub on_multipart_closed: &'a (dyn Fn(String) -> HookFuture + Send + Sync),
    /// A multipart upload id persisted by an earlier attempt: parts already
    /// uploaded with the right size (and CRC-32 when the provider reports one)
    /// are kept. If the upload no longer exists a new one is started.
    pub resume_upload_id: Option<&'a str>,
}

fn no_progress(_: u64) {}

fn no_multipart_hook(_: String) -> HookFuture {
    Box::pin(std::future::ready(Ok(())))
}

impl Default for DeliveryHooks<'_> {
    fn default() -> Self {
        Self {
            progress: &no_progress,
            on_multipart_started: &no_multipart_hook,
            on_multipart_closed: &no_multipart_hook,
            resume_upload_id: None,
        }
    }
}

impl fmt::Debug for DeliveryHooks<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeliveryHooks")
            .field("resume_upload_id", &self.resume_upload_id)
            .finish_non_exhaustive()
    }
}

/// A configured destination with its credential, ready for one job.
///
/// Build one per attempt from the leased secret and drop it when the attempt
/// ends: the S3 client holds the credential (in zeroizing memory) until then.
#[derive(Debug)]
#[non_exhaustive]
pub enum Destination {
    /// A local directory.
    Fs(FsDestination),
    /// S3 or an S3-compatible service.
    S3(S3Destination),
}

impl Destination {
    /// Builds a destination. `secret` is the leased credential payload (the
    /// provider's JSON); `fs` needs none. Uses default [`S3Options`] and no
    /// allowed `fs` roots, so a local-directory destination is refused, as
    /// with the uploader's default config: use [`Destination::with_options`].
    pub fn new(config: &DestinationConfig, secret: Option<&[u8]>) -> Result<Self, DeliveryError> {
        Self::with_options(
            config,
            secret,
            S3Options::default(),
            &FsAllowedRoots::default(),
        )
    }

    /// As [`Destination::new`], with explicit S3 transfer options and the
    /// directories an `fs` destination may write under (the uploader's
    /// `[destinations].fs_allowed_roots`; re-checked before every write).
    pub fn with_options(
        config: &DestinationConfig,
        secret: Option<&[u8]>,
        options: S3Options,
        fs_roots: &FsAllowedRoots,
    ) -> Result<Self, DeliveryError> {
        match config.provider {
            Provider::Fs => Ok(Destination::Fs(FsDestination::new(config, fs_roots)?)),
            Provider::S3 => {
                let destination = s3::describe(config);
                let Some(secret) = secret else {
                    return Err(DeliveryError::Credential {
                        destination,
                        source: CredentialError::Missing {
                            field: "access_key_id",
                        },
                    });
                };
                let credential = S3Credential::from_json(secret).map_err(|source| {
                    DeliveryError::Credential {
                        destination,
                        source,
                    }
                })?;
                Ok(Destination::S3(S3Destination::new(
                    config,
                    &credential,
                    options,
                )?))
            }
        }
    }

    /// Uploads the recording read from `source`, writes the `<name>.sha256`
    /// sidecar, and verifies. `object` is what intake recorded: a source of
    /// another size, or whose bytes do not hash to it, is not delivered
    /// ([`DeliveryError::SourceMismatch`]); one whose reads fail
    /// authentication is not either ([`DeliveryError::BackupCorrupt`]).
    pub async fn deliver(
        &self,
        source: Arc<dyn Source>,
        object: &ObjectInfo,
        hooks: &DeliveryHooks<'_>,
    ) -> Result<Delivery, DeliveryError> {
        match self {
            Destination::Fs(d) => d.deliver(source, object, hooks).await,
            Destination::S3(d) => d.deliver(source, object, hooks).await,
        }
    }

    /// Writes and deletes a small probe object (the storage "Test" button).
    pub async fn probe(&self) -> Result<(), ProbeError> {
        match self {
            Destination::Fs(d) => d.probe().await,
            Destination::S3(d) => d.probe().await,
        }
    }

    /// Aborts a multipart upload left by an earlier attempt. An upload that no
    /// longer exists counts as aborted. A no-op for destinations without one.
    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), DeliveryError> {
        match self {
            Destination::Fs(_) => Ok(()),
            Destination::S3(d) => d.abort_multipart(key, upload_id).await,
        }
    }

    /// The key a recording called `name` gets at this destination.
    pub fn object_key(&self, name: &str) -> Result<String, DeliveryError> {
        match self {
            Destination::Fs(d) => d.object_key(name),
            Destination::S3(d) => d.object_key(name),
        }
    }
}

/// Joins `prefix` and `name` into an object key, for every provider.
///
/// Leading, doubled and trailing slashes in the prefix are normalised away,
/// so a key is never absolute (destinations stored with a prefix such as
/// `/rec//` keep their keys; new ones are refused by [`check_prefix`]).
/// Refused, so that a key never climbs out of its prefix (a `..` in an S3 key
/// is just text, but the same key names a path in a local directory): a
/// prefix with a `.`/`..` segment; a `name` that is empty, `.`/`..` or
/// contains `/` or `\`; and ASCII control characters (0x00–0x1F, 0x7F, NUL
/// included) in either.
pub fn object_key(prefix: &str, name: &str) -> Result<String, KeyError> {
    if name.is_empty()
        || name == "."
        || name == ".."
        || name.contains(['/', '\\'])
        || name.chars().any(|c| c.is_ascii_control())
    {
        return Err(KeyError::Name);
    }
    let mut key = String::with_capacity(prefix.len() + name.len() + 1);
    for segment in prefix.split('/').filter(|s| !s.is_empty()) {
        if segment == "." || segment == ".." || segment.chars().any(|c| c.is_ascii_control()) {
            return Err(KeyError::Prefix);
        }
        key.push_str(segment);
        key.push('/');
    }
    key.push_str(name);
    Ok(key)
}

/// Checks a prefix a manager sends (PutDestination): what [`object_key`]
/// refuses, and a leading `/` too, since a prefix names a folder relative to
/// the bucket or directory, never an absolute path.
pub fn check_prefix(prefix: &str) -> Result<(), KeyError> {
    if prefix.starts_with('/') {
        return Err(KeyError::Prefix);
    }
    object_key(prefix, "x").map(|_| ())
}

/// An object name or prefix that could escape its place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The file name is empty, `.`/`..`, or contains `/`, `\` or a control character.
    #[error(
        "a file name must not be empty, \".\" or \"..\", or contain '/', '\\' or control characters"
    )]
    Name,
    /// The prefix starts with `/`, or has a `.`/`..` segment or a control character.
    #[error(
        "a prefix must be relative (no leading '/') without \".\" or \"..\" segments or control \
         characters; use one such as \"recordings/2024\""
    )]
    Prefix,
}

/// The sidecar's name for a recording called `name`.
pub fn sidecar_name(name: &str) -> String {
    format!("{name}.sha256")
}

/// The sidecar's contents, in `sha256sum -c` format: `<hex>  <name>\n`
/// (two spaces: text mode, as GNU coreutils prints it).
pub fn sidecar_contents(sha256: &[u8; 32], name: &str) -> String {
    format!("{}  {name}\n", hex::encode(sha256))
}

/// Refuses a source whose size is not the one recorded at intake (the
/// backup changed since): nothing of it is sent.
pub(crate) fn check_source_size(
    source: &dyn Source,
    object: &ObjectInfo,
) -> Result<(), DeliveryError> {
    if source.size() == object.size {
        Ok(())
    } else {
        Err(DeliveryError::SourceMismatch { what: "size" })
    }
}

/// Which step of a destination check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ProbeStep {
    /// The endpoint's host name does not resolve.
    Dns,
    /// The address resolved but nothing accepted the connection (refused,
    /// unreachable, connect timeout).
    Connect,
    /// The TLS handshake failed (certificate, protocol, plain HTTP on an https URL).
    Tls,
    /// The provider rejected the credential (unknown key id, wrong secret, expired token).
    Auth,
    /// The bucket (or, for `fs`, the directory) does not exist or is elsewhere.
    Bucket,
    /// The credential is valid but not allowed to write or delete there.
    Permission,
    /// Anything else.
    Other,
}

impl ProbeStep {
    /// Stable name for APIs and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeStep::Dns => "dns",
            ProbeStep::Connect => "connect",
            ProbeStep::Tls => "tls",
            ProbeStep::Auth => "auth",
            ProbeStep::Bucket => "bucket",
            ProbeStep::Permission => "permission",
            ProbeStep::Other => "other",
        }
    }
}

impl fmt::Display for ProbeStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A failed destination check: which step, and a message that says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("destination check failed at step {step}: {message}")]
pub struct ProbeError {
    /// The step that failed.
    pub step: ProbeStep,
    /// What failed and what to do; never contains a secret.
    pub message: String,
}

impl From<DeliveryError> for ProbeError {
    fn from(e: DeliveryError) -> Self {
        ProbeError {
            step: e.probe_step(),
            message: e.to_string(),
        }
    }
}

/// Why a delivery failed. Messages name the destination, bucket and key and
/// say what to do; they never contain a credential.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DeliveryError {
    /// The destination's settings cannot work (bad endpoint, unsafe name).
    #[error("destination {destination}: {message}")]
    Config {
        /// The destination, e.g. `s3://bucket (endpoint …)`.
        destination: String,
        /// What is wrong and what to change.
        message: String,
    },
    /// The leased credential payload could not be parsed.
    #[error("destination {destination}: {source}")]
    Credential {
        /// The destination.
        destination: String,
        /// Which field is missing or invalid.
        source: CredentialError,
    },
    /// The recording could not be read from its source (the backup store).
    /// Retried, unless the backup is gone.
    #[error("cannot read the recording from its backup: {source}; check the backup store")]
    Source {
        /// The I/O error.
        source: io::Error,
    },
    /// Reading the recording failed authentication
    /// ([`io::ErrorKind::InvalidData`] from its [`Source`]): the stored
    /// backup was modified or damaged. Permanent: what was read is not
    /// delivered, a multipart upload is aborted, and the job's backup is
    /// marked corrupt so it is never sent; the backup needs attention.
    #[error(
        "the recording's backup failed authentication ({detail}); it was not delivered \
         and will not be: the backup is corrupt or was modified, check the backup store"
    )]
    BackupCorrupt {
        /// What the source reported (never key material or recording bytes).
        detail: String,
    },
    /// The backup does not match what was recorded at intake: it was not
    /// (completely) delivered. Retrying cannot help; the backup needs attention.
    #[error(
        "the recording's backup does not match its recorded {what}; it was not delivered: \
         the backup is corrupt or changed, check the backup store"
    )]
    SourceMismatch {
        /// What differs: "size", "SHA-256", "CRC-32".
        what: &'static str,
    },
    /// A directory destination does not exist.
    #[error(
        "destination directory {path} does not exist or is not a directory; create it or fix the destination's bucket"
    )]
    BucketMissing {
        /// The directory.
        path: PathBuf,
    },
    /// A directory destination is not (or no longer) inside any of the
    /// uploader's `[destinations].fs_allowed_roots`, or none is configured.
    #[error("{0}")]
    FsRoot(FsRootError),
    /// The provider answered with an error.
    #[error("{operation} {location} failed: {}; {hint}", summary(*status, code.as_deref(), message.as_deref()))]
    Provider {
        /// `s3://bucket/key` (and the endpoint, when custom).
        location: String,
        /// The API operation, e.g. `PutObject`.
        operation: &'static str,
        /// HTTP status, when a response arrived.
        status: Option<u16>,
        /// The provider's error code, e.g. `SignatureDoesNotMatch`.
        code: Option<String>,
        /// The provider's message (trimmed).
        message: Option<String>,
        /// Whether retrying the same request can succeed.
        permanent: bool,
        /// Which destination check this corresponds to.
        step: ProbeStep,
        /// What to do.
        hint: &'static str,
    },
    /// The provider could not be reached, or the connection broke.
    #[error("{operation} {location}: {message}; {hint}")]
    Connection {
        /// `s3://bucket/key` and endpoint.
        location: String,
        /// The API operation.
        operation: &'static str,
        /// DNS, Connect, TLS or Other.
        step: ProbeStep,
        /// The cause chain, without secrets.
        message: String,
        /// What to do.
        hint: &'static str,
    },
    /// The destination holds something other than what was sent. Retried.
    #[error("verification of {location} failed: {detail}; the delivery will be retried")]
    Verification {
        /// Where.
        location: String,
        /// What differed.
        detail: String,
    },
    /// Writing to a directory destination failed.
    #[error(
        "writing {path} failed: {source}; check the destination directory's permissions and free space"
    )]
    Write {
        /// The file or directory being written.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// The `on_multipart_started` hook failed; the upload was aborted.
    #[error(
        "could not record the multipart upload for {location}: {message}; it was aborted and will be retried"
    )]
    Hook {
        /// Where.
        location: String,
        /// The hook's error.
        message: String,
    },
}

fn summary(status: Option<u16>, code: Option<&str>, message: Option<&str>) -> String {
    let mut s = String::new();
    match (code, status) {
        (Some(code), Some(status)) => s.push_str(&format!("{code} (HTTP {status})")),
        (Some(code), None) => s.push_str(code),
        (None, Some(status)) => s.push_str(&format!("HTTP {status}")),
        (None, None) => s.push_str("error"),
    }
    if let Some(message) = message.filter(|m| !m.is_empty() && Some(*m) != code) {
        s.push_str(": ");
        s.push_str(message);
    }
    s
}

impl DeliveryError {
    /// An error reading the recording from its [`Source`]: a failed
    /// authentication ([`io::ErrorKind::InvalidData`]) is
    /// [`DeliveryError::BackupCorrupt`], anything else [`DeliveryError::Source`].
    pub fn from_source_read(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::InvalidData {
            DeliveryError::BackupCorrupt {
                detail: error.to_string(),
            }
        } else {
            DeliveryError::Source { source: error }
        }
    }

    /// Whether retrying cannot help until someone changes something (the
    /// credential, the bucket, the destination, the backup). Permanent errors
    /// send the job to RETAINED; the rest are retried with backoff.
    pub fn is_permanent(&self) -> bool {
        match self {
            DeliveryError::Config { .. }
            | DeliveryError::Credential { .. }
            | DeliveryError::SourceMismatch { .. }
            | DeliveryError::BackupCorrupt { .. }
            | DeliveryError::BucketMissing { .. }
            | DeliveryError::FsRoot(_) => true,
            DeliveryError::Source { source, .. } => source.kind() == io::ErrorKind::NotFound,
            DeliveryError::Provider { permanent, .. } => *permanent,
            DeliveryError::Write { source, .. } => source.kind() == io::ErrorKind::PermissionDenied,
            DeliveryError::Connection { .. }
            | DeliveryError::Verification { .. }
            | DeliveryError::Hook { .. } => false,
        }
    }

    /// The destination-check step this error points at.
    pub fn probe_step(&self) -> ProbeStep {
        match self {
            DeliveryError::Credential { .. } => ProbeStep::Auth,
            DeliveryError::BucketMissing { .. } | DeliveryError::FsRoot(_) => ProbeStep::Bucket,
            DeliveryError::Provider { step, .. } | DeliveryError::Connection { step, .. } => *step,
            DeliveryError::Write { source, .. }
                if source.kind() == io::ErrorKind::PermissionDenied =>
            {
                ProbeStep::Permission
            }
            _ => ProbeStep::Other,
        }
    }

    /// The provider's error code, when the provider answered with one.
    pub fn provider_code(&self) -> Option<&str> {
        match self {
            DeliveryError::Provider { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, when the provider answered.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            DeliveryError::Provider { status, .. } => *status,
            _ => None,
        }
    }
}

/// Classification of a provider error: (permanent, step, hint).
///
/// Codes from the S3 error list
/// (<https://docs.aws.amazon.com/AmazonS3/latest/API/ErrorResponses.html#ErrorCodeList>),
/// plus `NotSignedUp`, which s3s answers for an unknown access key.
/// Provider error codes for bytes that arrived other than they were sent.
pub const CORRUPTED_IN_TRANSIT: [&str; 4] = [
    "BadDigest",
    "XAmzContentSHA256Mismatch",
    "InvalidDigest",
    "IncompleteBody",
];

pub(crate) fn classify_provider(
    status: Option<u16>,
    code: Option<&str>,
) -> (bool, ProbeStep, &'static str) {
    const AUTH_KEY: &str =
        "the provider does not know this access key id: store the correct credential and resend";
    const AUTH_SECRET: &str = "the provider rejected the request signature (wrong secret access key): store the correct credential and resend";
    const AUTH_TOKEN: &str =
        "the session token is expired or invalid: store a fresh credential and resend";
    const DENIED: &str = "the credential is not allowed to do this: grant s3:PutObject, s3:GetObject and \
         s3:AbortMultipartUpload (and s3:DeleteObject for the destination check) on the prefix, then resend";
    const NO_BUCKET: &str =
        "the bucket does not exist: create it or fix the destination's bucket name, then resend";
    const REGION: &str = "the bucket is in another region or needs another endpoint: fix the destination's region/endpoint";
    const DIGEST: &str = "the provider received bytes that do not match the checksum sent (corrupted in transit); it will be retried";
    const BUSY: &str = "the provider is busy or failing; it will be retried";
    const UPLOAD_GONE: &str =
        "the multipart upload no longer exists; a new one will be started on retry";
    const REFUSED: &str = "the provider refused the request: check the destination settings";

    match code {
        Some("InvalidAccessKeyId" | "NotSignedUp") => (true, ProbeStep::Auth, AUTH_KEY),
        Some("SignatureDoesNotMatch") => (true, ProbeStep::Auth, AUTH_SECRET),
        Some("ExpiredToken" | "InvalidToken" | "TokenRefreshRequired") => {
            (true, ProbeStep::Auth, AUTH_TOKEN)
        }
        Some("AccessDenied" | "AllAccessDisabled" | "AccountProblem") => {
            (true, ProbeStep::Permission, DENIED)
        }
        Some("NoSuchBucket" | "InvalidBucketName") => (true, ProbeStep::Bucket, NO_BUCKET),
        Some(
            "PermanentRedirect"
            | "AuthorizationHeaderMalformed"
            | "IllegalLocationConstraintException",
        ) => (true, ProbeStep::Bucket, REGION),
        Some(c) if CORRUPTED_IN_TRANSIT.contains(&c) => (false, ProbeStep::Other, DIGEST),
        Some("NoSuchUpload") => (false, ProbeStep::Other, UPLOAD_GONE),
        Some(
            "RequestTimeout"
            | "SlowDown"
            | "InternalError"
            | "ServiceUnavailable"
            | "RequestTimeTooSkewed"
            | "OperationAborted"
            | "TooManyRequests",
        ) => (false, ProbeStep::Other, BUSY),
        _ => match status {
            Some(301 | 307) => (true, ProbeStep::Bucket, REGION),
            Some(403) => (true, ProbeStep::Permission, DENIED),
            Some(408 | 429) => (false, ProbeStep::Other, BUSY),
            Some(s) if (400..500).contains(&s) => (true, ProbeStep::Other, REFUSED),
            _ => (false, ProbeStep::Other, BUSY),
        },
    }
}

/// Walks an error's cause chain (never a request or response dump) into a
/// short message, and guesses which network step failed.
pub(crate) fn describe_connect_error(err: &(dyn StdError + 'static)) -> (ProbeStep, String) {
    let mut parts: Vec<String> = Vec::new();
    let mut kinds = Vec::new();
    let mut cur = Some(err);
    while let Some(e) = cur {
        if let Some(io) = e.downcast_ref::<io::Error>() {
            kinds.push(io.kind());
        }
        let text = e.to_string();
        if !text.is_empty() && !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = e.source();
    }
    let message = parts.join(": ");
    let lower = message.to_lowercase();
    let step = if lower.contains("dns error")
        || lower.contains("failed to lookup address")
        || lower.contains("name or service not known")
        || lower.contains("no such host")
        || lower.contains("name resolution")
    {
        ProbeStep::Dns
    } else if kinds.iter().any(|k| {
        matches!(
            k,
            io::ErrorKind::ConnectionRefused
                | io::ErrorKind::HostUnreachable
                | io::ErrorKind::NetworkUnreachable
                | io::ErrorKind::AddrNotAvailable
        )
    }) || lower.contains("connection refused")
        || lower.contains("tcp connect error")
    {
        ProbeStep::Connect
    } else if lower.contains("tls")
        || lower.contains("certificate")
        || lower.contains("handshake")
        || lower.contains("corrupt message")
        || lower.contains("invalidcontenttype")
    {
        ProbeStep::Tls
    } else {
        ProbeStep::Other
    };
    (step, message)
}

/// The hint for a connection failure at `step`.
pub(crate) fn connect_hint(step: ProbeStep) -> &'static str {
    match step {
        ProbeStep::Dns => {
            "the endpoint's host name does not resolve: check the destination's endpoint; it will be retried"
        }
        ProbeStep::Connect => {
            "nothing accepted the connection: check the endpoint's host and port and the network; it will be retried"
        }
        ProbeStep::Tls => {
            "the TLS handshake failed: check the endpoint's scheme (http/https) and certificate; it will be retried"
        }
        _ => "the connection failed; it will be retried",
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_are_normalised_and_contained() {
        assert_eq!(object_key("", "a.mp4").unwrap(), "a.mp4");
        assert_eq!(object_key("rec//2024/", "a.mp4").unwrap(), "rec/2024/a.mp4");
        // Stored before leading slashes were refused: still never absolute.
        assert_eq!(object_key("/rec//", "a.mp4").unwrap(), "rec/a.mp4");
        assert_eq!(object_key("/", "a.mp4").unwrap(), "a.mp4");
        assert_eq!(object_key("rec", "a.mp4").unwrap(), "rec/a.mp4");
        assert_eq!(object_key("a..b/c.", "x..y").unwrap(), "a..b/c./x..y");
        for bad in [
            "../x", "a/./b", "a/..", ".", "/../x", "a\0b", "a\nb", "a\x7fb", "a\x1f",
        ] {
            assert_eq!(object_key(bad, "a"), Err(KeyError::Prefix), "{bad:?}");
            assert_eq!(check_prefix(bad), Err(KeyError::Prefix), "{bad:?}");
        }
        for absolute in ["/rec", "//rec", "/"] {
            assert_eq!(
                check_prefix(absolute),
                Err(KeyError::Prefix),
                "{absolute:?}"
            );
        }
        assert_eq!(check_prefix(""), Ok(()));
        assert_eq!(check_prefix("rec//2024/"), Ok(()));
        for bad in [
            "", ".", "..", "x/y", "/x", "a\\b", "a\0b", "a\tb", "a\x7f", "\x01",
        ] {
            assert_eq!(object_key("p", bad), Err(KeyError::Name), "{bad:?}");
        }
    }

    #[test]
    fn sidecar_is_sha256sum_format() {
        let s = sidecar_contents(&[0xab; 32], "a b.mp4");
        assert_eq!(s, format!("{}  a b.mp4\n", "ab".repeat(32)));
        assert_eq!(sidecar_name("a.mp4"), "a.mp4.sha256");
    }

    #[test]
    fn classification() {
        assert!(classify_provider(Some(403), Some("SignatureDoesNotMatch")).0);
        assert!(classify_provider(Some(404), Some("NoSuchBucket")).0);
        assert!(!classify_provider(Some(400), Some("BadDigest")).0);
        assert!(!classify_provider(Some(400), Some("RequestTimeout")).0);
        assert!(!classify_provider(Some(503), None).0);
        assert!(!classify_provider(Some(429), None).0);
        assert!(!classify_provider(Some(408), None).0);
        assert!(classify_provider(Some(409), None).0);
        assert!(!classify_provider(None, None).0);
    }
}
