//! The Upload stream protocol: header, CRC-32-checked chunks, SHA-256
//! trailer, checked in one pass as bytes arrive and written to the backup
//! store. Transport-agnostic; it creates no job and never leaves a partial file.
//!
//! Chunks are CRC-checked on the calling task while a blocking thread hashes,
//! encrypts and writes the previous ones, so intake uses two cores and memory stays
//! bounded by [`IngestLimits::max_chunk_bytes`] × [`PIPELINE_DEPTH`]. A
//! stream that stops sending is ended after [`IngestLimits::idle_timeout`],
//! so a stalled recorder does not hold a staging file and a call for ever.

use std::time::Duration;

use futures_util::{Stream, StreamExt as _};
use recvault_proto::uploader::v1::{UploadHeader, UploadRequest, upload_request::Part};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tonic::{Code, Status};

use crate::backup::{BackupError, BackupStore, StoredBackup};
use crate::digest::Sha256Digest;
use crate::jobs::{
    ContentType, DestinationId, FileName, InvalidValue, NewJob, RecordingId, TenantId,
};

/// Chunks in flight between the stream and the writing thread.
pub const PIPELINE_DEPTH: usize = 2;

/// Limits for one Upload call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestLimits {
    /// Largest chunk payload. Default 4 MiB, tonic's default message limit.
    pub max_chunk_bytes: usize,
    /// Largest recording. Default 64 GiB.
    pub max_total_bytes: u64,
    /// Longest time without any bytes arriving while the call waits for its
    /// next message (the header, a chunk, the trailer, or the end of the
    /// stream after the trailer); a large chunk that keeps arriving on a slow
    /// link is not idle (see [`crate::activity`]). Past it the call fails with
    /// DEADLINE_EXCEEDED and nothing is stored. Default 60 s (config
    /// `ingest_idle_timeout_secs`).
    pub idle_timeout: Duration,
}

impl Default for IngestLimits {
    fn default() -> Self {
        Self {
            max_chunk_bytes: 4 << 20,
            max_total_bytes: 64 << 30,
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why an Upload was refused. Whatever the variant, nothing was stored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The first message was not a header (or the stream was empty).
    #[error(
        "the first message must be the header, but it was {got}; send an UploadHeader \
         (tenant_id, recording_id, file_name, destination_id) before any chunk"
    )]
    MissingHeader {
        /// What came instead.
        got: &'static str,
    },
    /// A header field is missing or malformed.
    #[error("header field `{field}` {problem}")]
    InvalidHeader {
        /// The proto field name.
        field: &'static str,
        /// What is wrong and what to send.
        problem: String,
    },
    /// A message carried no part at all.
    #[error("message {index} is empty; every message must carry a header, a chunk or a trailer")]
    EmptyMessage {
        /// Position in the stream, the header being message 0.
        index: u64,
    },
    /// A second header arrived.
    #[error("message {index} is a second header; send exactly one header, first")]
    UnexpectedHeader {
        /// Position in the stream.
        index: u64,
    },
    /// A chunk is larger than the limit.
    #[error("chunk {index} is {len} bytes; the limit is {max}; send smaller chunks")]
    ChunkTooLarge {
        /// Chunk number, from 0.
        index: u64,
        /// Its size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The recording is larger than the limit.
    #[error("the recording exceeds the limit of {max} bytes; nothing was stored")]
    TooLarge {
        /// The limit.
        max: u64,
    },
    /// A chunk's data does not match its CRC-32: corrupted in transit.
    #[error(
        "chunk {index} (bytes {start}..{end}) failed its CRC-32 check: sent 0x{sent:08x}, \
         computed 0x{computed:08x}; nothing was stored; resend the recording"
    )]
    ChunkCrcMismatch {
        /// Chunk number, from 0.
        index: u64,
        /// Offset of its first byte in the recording.
        start: u64,
        /// Offset just past its last byte.
        end: u64,
        /// CRC-32 the sender put in the chunk.
        sent: u32,
        /// CRC-32 of the data received.
        computed: u32,
    },
    /// The trailer's SHA-256 is not 32 bytes.
    #[error("the trailer's sha256 must be 32 raw bytes, not {len}; nothing was stored")]
    BadTrailer {
        /// Length received.
        len: usize,
    },
    /// The whole-file SHA-256 does not match the trailer.
    #[error(
        "the recording's SHA-256 does not match the trailer: sent {sent}, computed {computed} \
         over {size} bytes; nothing was stored; resend the recording"
    )]
    Sha256Mismatch {
        /// From the trailer.
        sent: Sha256Digest,
        /// Of the bytes received.
        computed: Sha256Digest,
        /// Bytes received.
        size: u64,
    },
    /// The stream ended without a trailer.
    #[error(
        "stream ended before the trailer, after {chunks} chunks ({bytes} bytes); nothing was \
         stored; resend the recording and finish with the trailer"
    )]
    EndedBeforeTrailer {
        /// Chunks received.
        chunks: u64,
        /// Bytes received.
        bytes: u64,
    },
    /// Something followed the trailer.
    #[error(
        "a message followed the trailer; the trailer must be the last message; nothing was stored"
    )]
    AfterTrailer,
    /// No message arrived within [`IngestLimits::idle_timeout`].
    #[error(
        "no message arrived for {} after {bytes} bytes (the uploader's ingest_idle_timeout_secs); \
         nothing was stored; resend the recording without pausing the stream",
        humantime(*.idle)
    )]
    Idle {
        /// The idle timeout that passed.
        idle: Duration,
        /// Bytes received before.
        bytes: u64,
    },
    /// The transport failed (client cancelled, connection reset).
    #[error("the upload stream failed after {bytes} bytes ({}); nothing was stored; resend the recording", .status.message())]
    Stream {
        /// The transport's status.
        status: Status,
        /// Bytes received before.
        bytes: u64,
    },
    /// The backup store failed (disk full, I/O error).
    #[error("could not store the recording: {0}; nothing was stored; try again")]
    Storage(#[source] BackupError),
}

impl From<IngestError> for Status {
    fn from(e: IngestError) -> Self {
        let code = match &e {
            IngestError::MissingHeader { .. }
            | IngestError::InvalidHeader { .. }
            | IngestError::EmptyMessage { .. }
            | IngestError::UnexpectedHeader { .. }
            | IngestError::ChunkTooLarge { .. }
            | IngestError::TooLarge { .. }
            | IngestError::BadTrailer { .. }
            | IngestError::AfterTrailer => Code::InvalidArgument,
            IngestError::ChunkCrcMismatch { .. }
            | IngestError::Sha256Mismatch { .. }
            | IngestError::EndedBeforeTrailer { .. } => Code::DataLoss,
            IngestError::Idle { .. } => Code::DeadlineExceeded,
            // A chunk over the message size cap, refused by the decoder.
            IngestError::Stream { status, .. } => {
                recvault_runtime::oversized::oversized(status.clone()).code()
            }
            IngestError::Storage(b) if b.io_kind() == Some(std::io::ErrorKind::StorageFull) => {
                Code::ResourceExhausted
            }
            IngestError::Storage(_) => Code::Unavailable,
        };
        Status::new(code, e.to_string())
    }
}

/// "60 s", "300 ms": the idle timeout as a person reads it.
fn humantime(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}

/// The stream's next message, waiting while the request body keeps
/// delivering bytes and at most [`IngestLimits::idle_timeout`] after the last
/// ones ([`IngestError::Idle`] then; see [`crate::activity`]). Without a
/// watched body the timeout counts per message. `bytes` received so far, for
/// the error.
pub async fn next_message<S>(
    stream: &mut S,
    limits: &IngestLimits,
    bytes: u64,
) -> Result<Option<Result<UploadRequest, Status>>, IngestError>
where
    S: Stream<Item = Result<UploadRequest, Status>> + Unpin,
{
    let idle = limits.idle_timeout;
    let Ok(activity) = crate::activity::BODY_ACTIVITY.try_with(Clone::clone) else {
        // No watched body (a stream built in-process): count per message.
        return tokio::time::timeout(idle, stream.next())
            .await
            .map_err(|_| IngestError::Idle { idle, bytes });
    };
    // Count from the later of this wait's start and the last bytes received,
    // so a large chunk that is still arriving on a slow link is not "idle".
    let started = tokio::time::Instant::now();
    let next = stream.next();
    tokio::pin!(next);
    loop {
        let quiet_since = started.max(tokio::time::Instant::from_std(activity.last()));
        tokio::select! {
            message = &mut next => return Ok(message),
            () = tokio::time::sleep_until(quiet_since + idle) => {
                let quiet_since = started.max(tokio::time::Instant::from_std(activity.last()));
                if quiet_since + idle <= tokio::time::Instant::now() {
                    return Err(IngestError::Idle { idle, bytes });
                }
            }
        }
    }
}

/// A header whose every field passed validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidatedHeader {
    /// Owner.
    pub tenant_id: TenantId,
    /// The recorder's id.
    pub recording_id: RecordingId,
    /// Plain file name for the destination.
    pub file_name: FileName,
    /// Media type; `application/octet-stream` when the header left it empty.
    pub content_type: ContentType,
    /// Where to deliver.
    pub destination_id: DestinationId,
}

impl ValidatedHeader {
    /// Checks every field; the error names the first bad one and what to send.
    pub fn validate(h: UploadHeader) -> Result<Self, IngestError> {
        fn field<T>(
            name: &'static str,
            value: String,
            hint: &str,
            parse: fn(String) -> Result<T, InvalidValue>,
        ) -> Result<T, IngestError> {
            if value.is_empty() {
                return Err(IngestError::InvalidHeader {
                    field: name,
                    problem: format!("is missing; it is required: {hint}"),
                });
            }
            parse(value).map_err(|e| IngestError::InvalidHeader {
                field: name,
                problem: e.problem().to_owned(),
            })
        }
        Ok(Self {
            tenant_id: field(
                "tenant_id",
                h.tenant_id,
                "set it to the tenant the recording belongs to",
                TenantId::parse,
            )?,
            recording_id: field(
                "recording_id",
                h.recording_id,
                "set it to the recorder's unique id for this recording",
                RecordingId::parse,
            )?,
            file_name: field(
                "file_name",
                h.file_name,
                "set it to the plain file name to use at the destination, e.g. \"call-1234.mp4\"",
                FileName::parse,
            )?,
            content_type: if h.content_type.is_empty() {
                ContentType::octet_stream()
            } else {
                field("content_type", h.content_type, "", ContentType::parse)?
            },
            destination_id: field(
                "destination_id",
                h.destination_id,
                "set it to a destination id returned by PutDestination",
                DestinationId::parse,
            )?,
        })
    }
}

/// A recording received completely and durable in the backup store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The validated header.
    pub header: ValidatedHeader,
    /// The backup, with the SHA-256 that matched the trailer.
    pub backup: StoredBackup,
}

impl Received {
    /// The job to create for this recording (its id is the backup's id).
    pub fn new_job(&self, request_id: Option<String>) -> NewJob {
        NewJob {
            job_id: self.backup.id,
            tenant_id: self.header.tenant_id.clone(),
            recording_id: self.header.recording_id.clone(),
            destination_id: self.header.destination_id.clone(),
            file_name: self.header.file_name.clone(),
            content_type: self.header.content_type.clone(),
            backup_path: self.backup.path.clone(),
            sha256: self.backup.sha256,
            size: self.backup.size,
            stored_sha256: Some(self.backup.stored_sha256),
            request_id,
        }
    }
}

/// Receives one Upload stream into `store`.
///
/// Returns once the recording is fsynced and renamed into the backup store
/// and its SHA-256 matched the trailer. Waits at most
/// [`IngestLimits::idle_timeout`] for each message. On every error the
/// staging file has already been removed when this returns. If the future is dropped midway
/// the writing thread removes it shortly after (and `BackupStore::open` at
/// the next start, whatever happens).
pub async fn receive<S>(
    mut stream: S,
    store: &BackupStore,
    limits: &IngestLimits,
) -> Result<Received, IngestError>
where
    S: Stream<Item = Result<UploadRequest, Status>> + Unpin,
{
    let header = match next_message(&mut stream, limits, 0).await? {
        None => {
            return Err(IngestError::MissingHeader {
                got: "the end of the stream",
            });
        }
        Some(Err(status)) => return Err(IngestError::Stream { status, bytes: 0 }),
        Some(Ok(msg)) => match msg.part {
            Some(Part::Header(h)) => h,
            Some(Part::Chunk(_)) => return Err(IngestError::MissingHeader { got: "a chunk" }),
            Some(Part::Trailer(_)) => return Err(IngestError::MissingHeader { got: "a trailer" }),
            None => {
                return Err(IngestError::MissingHeader {
                    got: "an empty message",
                });
            }
        },
    };
    let header = ValidatedHeader::validate(header)?;

    let mut sink = Sink::spawn(
        store.clone(),
        header.tenant_id.clone(),
        header.recording_id.clone(),
    );
    match receive_body(&mut stream, &mut sink, limits).await {
        Ok(expected) => {
            let backup = sink.finish(expected).await?;
            Ok(Received { header, backup })
        }
        Err(e) => {
            sink.abort().await;
            Err(e)
        }
    }
}

/// Chunks and trailer; returns the trailer's digest once the stream ended cleanly after it.
async fn receive_body<S>(
    stream: &mut S,
    sink: &mut Sink,
    limits: &IngestLimits,
) -> Result<Sha256Digest, IngestError>
where
    S: Stream<Item = Result<UploadRequest, Status>> + Unpin,
{
    let mut chunks = 0u64;
    let mut bytes = 0u64;
    let mut index = 0u64; // message index; the header was 0
    loop {
        index += 1;
        let msg = match next_message(stream, limits, bytes).await? {
            None => return Err(IngestError::EndedBeforeTrailer { chunks, bytes }),
            Some(Err(status)) => return Err(IngestError::Stream { status, bytes }),
            Some(Ok(msg)) => msg,
        };
        match msg.part {
            None => return Err(IngestError::EmptyMessage { index }),
            Some(Part::Header(_)) => return Err(IngestError::UnexpectedHeader { index }),
            Some(Part::Chunk(chunk)) => {
                let len = chunk.data.len();
                if len > limits.max_chunk_bytes {
                    return Err(IngestError::ChunkTooLarge {
                        index: chunks,
                        len,
                        max: limits.max_chunk_bytes,
                    });
                }
                let end = bytes + len as u64;
                if end > limits.max_total_bytes {
                    return Err(IngestError::TooLarge {
                        max: limits.max_total_bytes,
                    });
                }
                // CRC-32 here, SHA-256 on the writer thread: two cores, one pass each.
                let computed = crc32fast::hash(&chunk.data);
                if computed != chunk.crc32 {
                    return Err(IngestError::ChunkCrcMismatch {
                        index: chunks,
                        start: bytes,
                        end,
                        sent: chunk.crc32,
                        computed,
                    });
                }
                if len > 0 {
                    sink.write(chunk.data).await?;
                }
                chunks += 1;
                bytes = end;
            }
            Some(Part::Trailer(trailer)) => {
                let sent =
                    Sha256Digest::from_slice(&trailer.sha256).ok_or(IngestError::BadTrailer {
                        len: trailer.sha256.len(),
                    })?;
                return match next_message(stream, limits, bytes).await? {
                    None => Ok(sent),
                    Some(Ok(_)) => Err(IngestError::AfterTrailer),
                    Some(Err(status)) => Err(IngestError::Stream { status, bytes }),
                };
            }
        }
    }
}

enum Command {
    Data(Vec<u8>),
    Finish(Sha256Digest),
}

/// The blocking thread that owns the [`crate::backup::BackupWriter`].
struct Sink {
    tx: Option<mpsc::Sender<Command>>,
    /// Taken when joined (a `JoinHandle` must not be awaited twice).
    task: Option<JoinHandle<Result<StoredBackup, BackupError>>>,
}

impl Sink {
    fn spawn(store: BackupStore, tenant: TenantId, recording: RecordingId) -> Self {
        let (tx, mut rx) = mpsc::channel::<Command>(PIPELINE_DEPTH);
        let task = tokio::task::spawn_blocking(move || {
            let mut writer = store.begin(&tenant, &recording)?;
            while let Some(cmd) = rx.blocking_recv() {
                match cmd {
                    Command::Data(data) => writer.write_chunk(&data)?,
                    Command::Finish(expected) => return writer.finish(expected),
                }
            }
            // The receiving side gave up; dropping `writer` removes the staging file.
            Err(BackupError::Abandoned)
        });
        Self {
            tx: Some(tx),
            task: Some(task),
        }
    }

    async fn write(&mut self, data: Vec<u8>) -> Result<(), IngestError> {
        if let Some(tx) = &self.tx
            && tx.send(Command::Data(data)).await.is_ok()
        {
            return Ok(());
        }
        // The writer stopped early (e.g. disk full): its result says why.
        Err(match self.join().await {
            Ok(_) => IngestError::Storage(BackupError::Abandoned),
            Err(e) => IngestError::Storage(e),
        })
    }

    async fn finish(mut self, expected: Sha256Digest) -> Result<StoredBackup, IngestError> {
        if let Some(tx) = self.tx.take() {
            // If this fails the writer already stopped; the join reports why.
            let _ = tx.send(Command::Finish(expected)).await;
        }
        self.join().await.map_err(|e| match e {
            BackupError::DigestMismatch {
                expected,
                computed,
                size,
            } => IngestError::Sha256Mismatch {
                sent: expected,
                computed,
                size,
            },
            e => IngestError::Storage(e),
        })
    }

    /// Stops the writer and waits until it removed the staging file.
    async fn abort(mut self) {
        let _ = self.join().await;
    }

    /// Closes the channel and waits for the writer thread's result.
    async fn join(&mut self) -> Result<StoredBackup, BackupError> {
        self.tx = None;
        match self.task.take() {
            Some(task) => task.await.map_err(|e| BackupError::Task(e.to_string()))?,
            None => Err(BackupError::Abandoned),
        }
    }
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink").finish_non_exhaustive()
    }
}
