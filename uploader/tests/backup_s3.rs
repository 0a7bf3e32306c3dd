//! The backup store in our own S3-compatible bucket, against a real s3s-fs
//! server in this process (SigV4, checksums; ListMultipartUploads added by
//! the test host): ingest and read back, what is at rest, a refused SHA-256,
//! the store going down mid-ingest, delete/exists/rehash/list, locations
//! outside the store, stale multipart uploads, and that the credential never
//! shows in a message.
#![allow(clippy::unwrap_used)]

#[path = "support/keys.rs"]
mod keys;
#[path = "support/s3.rs"]
mod s3_server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream;
use recvault_proto::uploader::v1::{
    Chunk, UploadHeader, UploadRequest, UploadTrailer, upload_request::Part,
};
use recvault_uploader::backup::{BackupError, BackupStore, S3Tuning, StoredBackup};
use recvault_uploader::config::BackupStoreSettings;
use recvault_uploader::credential::S3Credential;
use recvault_uploader::destination::Source as _;
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::ingest::{IngestError, IngestLimits, receive};
use recvault_uploader::jobs::{RecordingId, TenantId};
use s3_server::{S3Server, S3ServerOptions};
use tokio::io::AsyncReadExt as _;
use tonic::{Code, Status};

const MIB: usize = 1024 * 1024;
const BUCKET: &str = "backups";
const MARKER: &[u8] = b"PLAINTEXT-MARKER-";

struct Fixture {
    server: S3Server,
    store: BackupStore,
    wrapping: Arc<keys::TestWrapping>,
    settings: BackupStoreSettings,
}

fn settings(server: &S3Server, prefix: &str) -> BackupStoreSettings {
    BackupStoreSettings {
        endpoint: server.endpoint.clone(),
        region: String::new(),
        bucket: BUCKET.into(),
        prefix: prefix.into(),
        path_style: true,
        credentials_file: PathBuf::new(),
        stale_upload_secs: 24 * 3600,
    }
}

/// 5 MiB parts (the smallest S3 takes), so 20 MiB is a multipart upload.
fn tuning() -> S3Tuning {
    S3Tuning {
        part_size: 5 * MIB,
        ..S3Tuning::default()
    }
}

fn credential(server: &S3Server) -> S3Credential {
    S3Credential::from_json(server.credential_json().as_bytes()).unwrap()
}

async fn fixture(prefix: &str) -> Fixture {
    let server = S3Server::start_with(S3ServerOptions {
        list_multipart_uploads: Some(2),
        ..S3ServerOptions::default()
    })
    .await;
    server.create_bucket(BUCKET);
    let wrapping = keys::TestWrapping::generate();
    let settings = settings(&server, prefix);
    let store = BackupStore::open_s3_with(
        &settings,
        &credential(&server),
        wrapping.key.clone(),
        tuning(),
    )
    .await
    .unwrap();
    Fixture {
        server,
        store,
        wrapping,
        settings,
    }
}

impl Fixture {
    /// Multipart uploads in progress in the bucket (ListMultipartUploads).
    async fn open_uploads(&self) -> Vec<String> {
        let out = self
            .server
            .client()
            .list_multipart_uploads()
            .bucket(BUCKET)
            .send()
            .await
            .unwrap();
        out.uploads()
            .iter()
            .filter_map(|u| u.key().map(str::to_owned))
            .collect()
    }

    /// Object keys in the bucket.
    async fn objects(&self) -> Vec<String> {
        let out = self
            .server
            .client()
            .list_objects_v2()
            .bucket(BUCKET)
            .send()
            .await
            .unwrap();
        out.contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect()
    }

    /// The object's key for a location `s3://backups/<key>`.
    fn key_of(path: &Path) -> String {
        path.to_str()
            .unwrap()
            .strip_prefix(&format!("s3://{BUCKET}/"))
            .unwrap()
            .to_owned()
    }

    /// Writes `data` with begin/write_chunk/finish on a blocking thread.
    async fn store_blocking(
        &self,
        data: Vec<u8>,
        expected: Sha256Digest,
    ) -> Result<StoredBackup, BackupError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || {
            let mut w = store.begin(
                &TenantId::parse("acme").unwrap(),
                &RecordingId::parse("rec-1").unwrap(),
            )?;
            for piece in data.chunks(MIB + 7) {
                w.write_chunk(piece)?;
            }
            w.finish(expected)
        })
        .await
        .unwrap()
    }
}

/// `len` bytes of a recognisable plaintext.
fn recording(len: usize) -> Vec<u8> {
    MARKER.iter().copied().cycle().take(len).collect()
}

fn upload_stream(
    data: &[u8],
    sha256: Sha256Digest,
) -> impl futures_util::Stream<Item = Result<UploadRequest, Status>> + Unpin + use<> {
    let mut messages = vec![header()];
    messages.extend(data.chunks(MIB).map(chunk));
    messages.push(trailer(sha256));
    stream::iter(messages)
}

fn header() -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Header(UploadHeader {
            tenant_id: "acme".into(),
            recording_id: "rec-0001".into(),
            file_name: "call.mp4".into(),
            content_type: "video/mp4".into(),
            destination_id: "dest-1".into(),
        })),
    })
}

fn chunk(data: &[u8]) -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Chunk(Chunk {
            data: data.to_vec(),
            crc32: crc32fast::hash(data),
        })),
    })
}

fn trailer(sha256: Sha256Digest) -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Trailer(UploadTrailer {
            sha256: sha256.as_bytes().to_vec(),
        })),
    })
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_into_the_object_store_reads_back_byte_identical_and_encrypted() {
    let f = fixture("team/a").await;
    // One PutObject (under a part) and a multipart upload of 5 parts.
    for (len, multipart) in [(300_000, false), (20 * MIB + 12_345, true)] {
        f.server.clear_requests();
        let data = recording(len);
        let sha = Sha256Digest::of(&data);
        let received = receive(
            upload_stream(&data, sha),
            &f.store,
            &IngestLimits::default(),
        )
        .await
        .unwrap();
        let backup = received.backup;
        assert_eq!((backup.sha256, backup.size), (sha, len as u64));
        let key = Fixture::key_of(&backup.path);
        assert_eq!(key, format!("team/a/objects/acme/{}", backup.id));
        assert!(backup.path.starts_with(f.store.objects_dir().join("acme")));

        // At rest: encrypted, and the stored SHA-256 is of these bytes.
        let at_rest = std::fs::read(f.server.object_path(BUCKET, &key)).unwrap();
        assert!(at_rest.starts_with(b"RVBK"));
        assert!(!contains(&at_rest, &MARKER[..12]), "plaintext at rest");
        assert_eq!(backup.stored_sha256, Sha256Digest::of(&at_rest));
        assert_eq!(
            f.store.rehash(&backup.path).await.unwrap(),
            (backup.stored_sha256, at_rest.len() as u64)
        );

        // Each request carried our CRC-32; a multipart one was read back
        // (s3s-fs keeps no whole-object checksum), a single PUT was not.
        let uploads = f.server.requests_of("UploadPart");
        let puts = f.server.requests_of("PutObject");
        if multipart {
            assert_eq!(uploads.len(), at_rest.len().div_ceil(5 * MIB));
            assert!(puts.is_empty());
            assert!(!f.server.requests_of("GetObject").is_empty());
            let complete = &f.server.requests_of("CompleteMultipartUpload")[0];
            assert_eq!(
                complete.header("x-amz-checksum-crc32"),
                Some(crc32_b64(&at_rest).as_str())
            );
        } else {
            assert!(uploads.is_empty());
            assert_eq!(puts.len(), 1);
            assert_eq!(
                puts[0].header("x-amz-checksum-crc32"),
                Some(crc32_b64(&at_rest).as_str())
            );
        }
        for part in &uploads {
            assert!(part.header("x-amz-checksum-crc32").is_some());
        }

        // Read back through EncryptedSource: whole, and a range across segments.
        assert_eq!(
            f.wrapping.read_plain(&f.store, &backup.path).await.unwrap(),
            data
        );
        let source = f.wrapping.source(&f.store, &backup.path).await.unwrap();
        let (offset, n) = (65_000u64, 200_000u64);
        let mut part = Vec::new();
        source
            .open_range(offset, n)
            .await
            .unwrap()
            .read_to_end(&mut part)
            .await
            .unwrap();
        assert_eq!(part, data[offset as usize..(offset + n) as usize]);
        let digest = source.digest().await.unwrap();
        assert_eq!((digest.sha256, digest.size), (sha, len as u64));
    }
    assert_eq!(f.store.list_objects().await.unwrap().len(), 2);
    assert!(f.open_uploads().await.is_empty());
}

fn crc32_b64(data: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(crc32fast::hash(data).to_be_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha256_mismatch_at_finish_leaves_no_object_and_no_upload() {
    let f = fixture("").await;
    for len in [1000, 12 * MIB] {
        let data = recording(len);
        let wrong = Sha256Digest::of(b"something else");
        let err = receive(
            upload_stream(&data, wrong),
            &f.store,
            &IngestLimits::default(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, IngestError::Sha256Mismatch { .. }), "{err}");
        assert_eq!(Status::from(err).code(), Code::DataLoss);
        assert_eq!(f.objects().await, Vec::<String>::new(), "{len}");
        assert_eq!(f.open_uploads().await, Vec::<String>::new(), "{len}");
    }
    // The multipart one had started its upload, and aborted it.
    assert_eq!(f.server.requests_of("CreateMultipartUpload").len(), 1);
    assert_eq!(f.server.requests_of("AbortMultipartUpload").len(), 1);
    assert!(f.store.list_objects().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_going_down_mid_ingest_is_unavailable_and_leaves_nothing() {
    let mut f = fixture("p").await;
    let data = recording(24 * MIB);
    let sha = Sha256Digest::of(&data);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let store = f.store.clone();
    let ingest = tokio::spawn(async move {
        receive(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &store,
            &IngestLimits::default(),
        )
        .await
    });
    tx.send(header()).await.unwrap();
    let mut pieces = data.chunks(MIB);
    for piece in pieces.by_ref().take(8) {
        tx.send(chunk(piece)).await.unwrap();
    }
    // The multipart upload has begun.
    for _ in 0..100 {
        if !f.open_uploads().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(f.open_uploads().await.len(), 1);
    f.server.stop();
    for piece in pieces {
        if tx.send(chunk(piece)).await.is_err() {
            break;
        }
    }
    let _ = tx.send(trailer(sha)).await;
    drop(tx);
    let err = ingest.await.unwrap().unwrap_err();
    assert!(matches!(err, IngestError::Storage(_)), "{err}");
    let status = Status::from(err);
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let message = status.message();
    assert!(
        message.contains(&format!("s3://{BUCKET}")) && message.contains(&f.server.endpoint),
        "{message}"
    );
    assert!(!message.contains(&f.server.secret_key), "{message}");

    // Back up: the upload the failed ingest left is aborted in the background.
    f.server.restart().await;
    let mut left = (f.open_uploads().await, f.objects().await);
    for _ in 0..240 {
        if left.0.is_empty() && left.1.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
        left = (f.open_uploads().await, f.objects().await);
    }
    assert_eq!(left, (Vec::new(), Vec::new()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_exists_rehash_and_list() {
    let f = fixture("x").await;
    let data = recording(100_000);
    let backup = f
        .store_blocking(data.clone(), Sha256Digest::of(&data))
        .await
        .unwrap();
    assert!(f.store.exists(&backup.path).await.unwrap());
    assert_eq!(
        f.store.list_objects().await.unwrap(),
        vec![backup.path.clone()]
    );
    let (sha, _) = f.store.rehash(&backup.path).await.unwrap();
    assert_eq!(sha, backup.stored_sha256);
    let header = f.store.read_header(&backup.path).await.unwrap().unwrap();
    assert_eq!(header.tenant_id, "acme");

    f.store.delete(&backup.path).await.unwrap();
    assert!(!f.store.exists(&backup.path).await.unwrap());
    // Already gone: still deleted.
    f.store.delete(&backup.path).await.unwrap();
    let err = f.store.rehash(&backup.path).await.unwrap_err();
    assert!(err.is_not_found(), "{err}");
    assert!(
        f.store
            .read_header(&backup.path)
            .await
            .unwrap_err()
            .is_not_found()
    );
    assert!(f.store.list_objects().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locations_outside_the_store_are_refused() {
    let f = fixture("team/a").await;
    let id = uuid::Uuid::new_v4();
    let good = PathBuf::from(format!("s3://{BUCKET}/team/a/objects/acme/{id}"));
    assert!(!f.store.exists(&good).await.unwrap());
    let upper = id.hyphenated().to_string().to_uppercase();
    for bad in [
        format!("s3://other/team/a/objects/acme/{id}"),
        format!("s3://{BUCKET}/team/b/objects/acme/{id}"),
        format!("s3://{BUCKET}/objects/acme/{id}"),
        format!("s3://{BUCKET}/team/a/objects/acme"),
        format!("s3://{BUCKET}/team/a/objects/acme/{id}/x"),
        format!("s3://{BUCKET}/team/a/objects/../{id}"),
        format!("s3://{BUCKET}/team/a/objects/acme/../../../x/{id}"),
        format!("s3://{BUCKET}/team/a/objects/acme/not-a-job"),
        format!("s3://{BUCKET}/team/a/objects/acme/{upper}"),
        format!("s3://{BUCKET}/team/a/objects//{id}"),
        format!("s3://{BUCKET}/team/a/objects/a b/{id}"),
        "/etc/passwd".to_owned(),
        format!("/team/a/objects/acme/{id}"),
    ] {
        let bad = PathBuf::from(bad);
        let outside = |r: Result<(), BackupError>| matches!(r, Err(BackupError::OutsideStore(_)));
        assert!(outside(f.store.delete(&bad).await), "{bad:?}");
        assert!(outside(f.store.exists(&bad).await.map(|_| ())), "{bad:?}");
        assert!(outside(f.store.rehash(&bad).await.map(|_| ())), "{bad:?}");
        assert!(
            outside(f.store.read_header(&bad).await.map(|_| ())),
            "{bad:?}"
        );
    }
    // Nothing was asked of the server for any of them.
    assert!(f.server.requests_of("DeleteObject").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_stale_multipart_uploads_under_objects_are_aborted() {
    let f = fixture("p").await;
    // A live ingest: its upload is open while the writer still writes.
    let store = f.store.clone();
    let (go_on, wait) = std::sync::mpsc::channel::<()>();
    let (started, upload_open) = tokio::sync::oneshot::channel::<()>();
    let writer = tokio::task::spawn_blocking(move || {
        let mut w = store
            .begin(
                &TenantId::parse("acme").unwrap(),
                &RecordingId::parse("rec-1").unwrap(),
            )
            .unwrap();
        let data = recording(6 * MIB);
        w.write_chunk(&data).unwrap();
        started.send(()).unwrap();
        wait.recv().unwrap();
        w.finish(Sha256Digest::of(&data))
    });
    upload_open.await.unwrap();
    for _ in 0..100 {
        if !f.open_uploads().await.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Someone else's upload outside objects/ is never ours to abort.
    f.server
        .client()
        .create_multipart_upload()
        .bucket(BUCKET)
        .key("p/elsewhere/x")
        .send()
        .await
        .unwrap();
    assert_eq!(f.open_uploads().await.len(), 2);

    // Younger than the bound (24 h): kept, by the sweep and by a new replica.
    assert_eq!(f.store.abort_stale_uploads().await.unwrap(), 0);
    BackupStore::open_s3_with(
        &f.settings,
        &credential(&f.server),
        f.wrapping.key.clone(),
        tuning(),
    )
    .await
    .unwrap();
    assert_eq!(f.open_uploads().await.len(), 2);

    // With a bound of 0 s the ingest's upload counts as stale and goes at
    // start-up; the other one stays.
    let mut now = f.settings.clone();
    now.stale_upload_secs = 0;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    BackupStore::open_s3_with(
        &now,
        &credential(&f.server),
        f.wrapping.key.clone(),
        tuning(),
    )
    .await
    .unwrap();
    assert_eq!(f.open_uploads().await, vec!["p/elsewhere/x".to_owned()]);
    // The ingest then fails, and stores nothing.
    go_on.send(()).unwrap();
    assert!(writer.await.unwrap().is_err());
    assert!(f.store.list_objects().await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_secret_key_never_shows_in_debug_or_errors() {
    let f = fixture("").await;
    let secret = "sk-WRONG-very-secret-0123456789";
    let wrong = S3Credential::from_json(
        serde_json::json!({
            "access_key_id": f.server.access_key,
            "secret_access_key": secret,
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap();
    let store = BackupStore::open_s3_with(&f.settings, &wrong, f.wrapping.key.clone(), tuning())
        .await
        .unwrap();
    let shown = format!("{store:?} {wrong:?} {:?}", f.settings);
    assert!(
        !shown.contains(secret) && !shown.contains(&f.server.secret_key),
        "{shown}"
    );

    let data = recording(10_000);
    let err = receive(
        upload_stream(&data, Sha256Digest::of(&data)),
        &store,
        &IngestLimits::default(),
    )
    .await
    .unwrap_err();
    let status = Status::from(err);
    let message = format!("{status:?} {}", status.message());
    assert!(message.contains("SignatureDoesNotMatch"), "{message}");
    assert!(!message.contains(secret), "{message}");

    let err = f
        .store_blocking(data.clone(), Sha256Digest::of(&data))
        .await
        .map(|_| ());
    assert!(err.is_ok());
    let mut f = f;
    f.server.stop();
    let err = f
        .store_blocking(data.clone(), Sha256Digest::of(&data))
        .await
        .unwrap_err();
    let message = format!("{err} {err:?}");
    assert!(err.is_store_unavailable(), "{message}");
    assert!(!message.contains(&f.server.secret_key), "{message}");
}
