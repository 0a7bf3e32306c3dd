//! Client calls shared by the `recvault` CLI and the dev runner: mTLS
//! channels per identity, putting a credential, streaming a recording with
//! per-chunk CRC-32 and a SHA-256 trailer, and following a job.

use std::path::{Path, PathBuf};

use recvault_proto::{
    uploader::v1::{self as up, jobs_client::JobsClient, recordings_client::RecordingsClient},
    vault::v1::{self as va, credentials_client::CredentialsClient},
};
use recvault_runtime::{devcerts, hpke, logging::REQUEST_ID_HEADER, secret::SecretBytes, tls};
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tonic::transport::Channel;

/// Chunk size for ingest: well under the uploader's 4 MiB message limit.
pub const CHUNK_BYTES: usize = 1024 * 1024;

/// Where the services are and which certificates to use.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub vault: String,
    pub uploader: String,
    /// Directory holding ca.crt and `<identity>.crt`/`.key`.
    pub certs: PathBuf,
}

impl Endpoints {
    /// An mTLS channel to `addr` as `identity`.
    pub fn channel(&self, addr: &str, identity: &str) -> Result<Channel, String> {
        tls::install_crypto_provider();
        let files = devcerts::files(&self.certs, identity);
        if !files.cert.exists() {
            return Err(format!(
                "no certificate for identity {identity:?} in {}; run the dev runner first or pass --certs",
                self.certs.display()
            ));
        }
        tls::channel(addr, "localhost", &files).map_err(|e| e.to_string())
    }
}

/// Maps a status to a one-line message.
pub fn status_text(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

fn with_request_id<T>(message: T, request_id: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Ok(v) = request_id.parse() {
        request.metadata_mut().insert(REQUEST_ID_HEADER, v);
    }
    request
}

/// Stores a credential as the manager, sealed to the vault's sealing key
/// (`Credentials/GetSealingKey`; with `pinned`, that key must be the pinned
/// one) with the tenant and name as associated data, so gRPC, HTTP/2 and TLS
/// only carry ciphertext. The secret is never printed.
pub async fn put_credential(
    channel: Channel,
    tenant: &str,
    name: &str,
    kind: va::CredentialKind,
    secret: SecretBytes,
    pinned: Option<&[u8]>,
) -> Result<va::PutCredentialResponse, String> {
    let mut client = CredentialsClient::new(channel);
    let key = client
        .get_sealing_key(va::GetSealingKeyRequest {})
        .await
        .map_err(|s| format!("asking the vault for its sealing key: {}", status_text(&s)))?
        .into_inner();
    if let Some(pin) = pinned
        && pin != key.public_key.as_slice()
    {
        return Err(
            "the vault's sealing key is not the pinned one (--sealing-key); the secret was not sent"
                .into(),
        );
    }
    let (enc, sealed_secret) = hpke::seal(
        &key.public_key,
        hpke::PUT_INFO,
        &hpke::aad(&[tenant, name]),
        secret.expose_secret(),
    )
    .map_err(|_| "the vault's sealing key is not a usable X25519 public key".to_owned())?;
    let request = va::PutCredentialRequest {
        tenant_id: tenant.to_owned(),
        name: name.to_owned(),
        kind: kind as i32,
        labels: Default::default(),
        enc,
        sealed_secret,
        sealing_key_version: key.key_version,
        ..Default::default()
    };
    client
        .put_credential(request)
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| status_text(&s))
}

/// SHA-256 and size of a file (one streaming pass).
pub async fn sha256_file(path: &Path) -> Result<([u8; 32], u64), String> {
    let mut file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .await
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
        size += n as u64;
    }
    Ok((sha.finalize().into(), size))
}

/// Streams `path` to the uploader: the header, chunks each with its CRC-32,
/// then the SHA-256 trailer. `progress` gets the bytes sent so far.
pub async fn send_recording(
    channel: Channel,
    header: up::UploadHeader,
    path: &Path,
    request_id: &str,
    progress: impl Fn(u64) + Send + 'static,
) -> Result<up::UploadResponse, String> {
    let (tx, rx) = tokio::sync::mpsc::channel::<up::UploadRequest>(4);
    let path_owned = path.to_owned();
    let producer = tokio::spawn(async move {
        use up::upload_request::Part;
        let mut file = tokio::fs::File::open(&path_owned)
            .await
            .map_err(|e| format!("cannot open {}: {e}", path_owned.display()))?;
        let send = |part| up::UploadRequest { part: Some(part) };
        if tx.send(send(Part::Header(header))).await.is_err() {
            return Ok(());
        }
        let mut sha = Sha256::new();
        let mut sent = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let mut filled = 0;
            while filled < buf.len() {
                let n = file
                    .read(&mut buf[filled..])
                    .await
                    .map_err(|e| format!("cannot read {}: {e}", path_owned.display()))?;
                if n == 0 {
                    break;
                }
                filled += n;
            }
            if filled == 0 {
                break;
            }
            buf.truncate(filled);
            sha.update(&buf);
            let crc32 = crc32fast::hash(&buf);
            sent += filled as u64;
            if tx
                .send(send(Part::Chunk(up::Chunk { data: buf, crc32 })))
                .await
                .is_err()
            {
                return Ok(());
            }
            progress(sent);
        }
        let digest: [u8; 32] = sha.finalize().into();
        let _ = tx
            .send(send(Part::Trailer(up::UploadTrailer {
                sha256: digest.to_vec(),
            })))
            .await;
        Ok::<(), String>(())
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let reply = RecordingsClient::new(channel)
        .upload(with_request_id(stream, request_id))
        .await
        .map(tonic::Response::into_inner)
        .map_err(|s| status_text(&s));
    producer.await.map_err(|e| e.to_string())??;
    reply
}

/// Follows a job with WatchJob until it settles; `on_update` sees every state.
pub async fn watch_until_settled(
    channel: Channel,
    job_id: &str,
    mut on_update: impl FnMut(&up::Job),
) -> Result<up::Job, String> {
    let mut stream = JobsClient::new(channel)
        .watch_job(up::WatchJobRequest {
            job_id: job_id.to_owned(),
        })
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    let mut last = None;
    while let Some(job) = stream.message().await.map_err(|s| status_text(&s))? {
        on_update(&job);
        last = Some(job);
    }
    last.ok_or_else(|| format!("WatchJob for {job_id} ended without an update"))
}

/// Name of a job state without the prefix (`DELIVERED`).
pub fn state_name(state: i32) -> String {
    up::JobState::try_from(state)
        .map(|s| s.as_str_name().trim_start_matches("JOB_STATE_").to_owned())
        .unwrap_or_else(|_| format!("state {state}"))
}

/// A progress bar line on stderr.
pub fn progress_line(sent: u64, total: u64, started: std::time::Instant) -> String {
    let pct = (sent * 100).checked_div(total).unwrap_or(100);
    let filled = usize::try_from(pct / 5).unwrap_or(20).min(20);
    let secs = started.elapsed().as_secs_f64().max(1e-3);
    format!(
        "\r[{}{}] {pct:>3}% {:.1}/{:.1} MiB {:.1} MiB/s",
        "#".repeat(filled),
        " ".repeat(20 - filled),
        sent as f64 / 1048576.0,
        total as f64 / 1048576.0,
        sent as f64 / 1048576.0 / secs
    )
}
