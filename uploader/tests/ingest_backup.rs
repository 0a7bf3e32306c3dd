//! Ingest into the backup store with real files: the happy path, every refusal
//! (and that each leaves no file behind), a 20 MiB recording, and the idle
//! timeout, also through the real `Recordings/Upload` service over mTLS.
#![allow(clippy::unwrap_used)]

#[path = "support/audit.rs"]
mod audit_support;
#[path = "support/keys.rs"]
mod keys;

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::{StreamExt as _, stream};
use recvault_proto::uploader::v1::{
    Chunk, UploadHeader, UploadRequest, UploadTrailer, upload_request::Part,
};
use recvault_uploader::backup::BackupStore;
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::ingest::{IngestError, IngestLimits, Received, receive};
use tonic::{Code, Status};

fn valid_header() -> UploadHeader {
    UploadHeader {
        tenant_id: "acme".into(),
        recording_id: "rec-0001".into(),
        file_name: "call 2024-05-01.mp4".into(),
        content_type: "video/mp4".into(),
        destination_id: "dest-1".into(),
    }
}

fn header(h: UploadHeader) -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Header(h)),
    })
}

fn chunk(data: &[u8]) -> Result<UploadRequest, Status> {
    chunk_with_crc(data, crc32fast::hash(data))
}

fn chunk_with_crc(data: &[u8], crc32: u32) -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Chunk(Chunk {
            data: data.to_vec(),
            crc32,
        })),
    })
}

fn trailer(sha256: &[u8]) -> Result<UploadRequest, Status> {
    Ok(UploadRequest {
        part: Some(Part::Trailer(UploadTrailer {
            sha256: sha256.to_vec(),
        })),
    })
}

/// A whole, correct upload of `data` in `chunk_size` pieces.
fn upload(data: &[u8], chunk_size: usize) -> Vec<Result<UploadRequest, Status>> {
    let mut msgs = vec![header(valid_header())];
    msgs.extend(data.chunks(chunk_size).map(chunk));
    msgs.push(trailer(Sha256Digest::of(data).as_bytes()));
    msgs
}

/// Every regular file under `dir`.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    store: BackupStore,
    wrapping: std::sync::Arc<keys::TestWrapping>,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("backups");
    let wrapping = keys::TestWrapping::generate();
    let store = BackupStore::open(&root, wrapping.key.clone()).unwrap();
    Fixture {
        _dir: dir,
        root,
        store,
        wrapping,
    }
}

async fn run(
    f: &Fixture,
    msgs: Vec<Result<UploadRequest, Status>>,
) -> Result<Received, IngestError> {
    receive(stream::iter(msgs), &f.store, &IngestLimits::default()).await
}

/// Runs a refused upload; checks the code, that the message names `needle`,
/// and that no file at all is left in the store.
async fn refused(
    f: &Fixture,
    msgs: Vec<Result<UploadRequest, Status>>,
    code: Code,
    needle: &str,
) -> Status {
    let err = run(f, msgs).await.expect_err("must be refused");
    let status = Status::from(err);
    assert_eq!(status.code(), code, "{status:?}");
    assert!(
        status.message().contains(needle),
        "{:?} does not mention {needle:?}",
        status.message()
    );
    assert_eq!(
        files_under(&f.root),
        Vec::<PathBuf>::new(),
        "files left behind"
    );
    status
}

#[tokio::test]
async fn happy_path_stores_bytes_and_sha256() {
    let f = fixture();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let got = run(&f, upload(&data, 64 * 1024)).await.unwrap();

    assert_eq!(got.backup.sha256, Sha256Digest::of(&data));
    assert_eq!(got.backup.size, data.len() as u64);
    assert_eq!(
        f.wrapping
            .read_plain(&f.store, &got.backup.path)
            .await
            .unwrap(),
        data
    );
    let stored = std::fs::read(&got.backup.path).unwrap();
    assert!(stored.starts_with(b"RVBK"), "encrypted at rest");
    assert_eq!(got.header.file_name.as_str(), "call 2024-05-01.mp4");
    assert_eq!(got.header.content_type.as_str(), "video/mp4");
    assert!(
        got.backup
            .path
            .starts_with(f.store.objects_dir().join("acme"))
    );
    assert_eq!(
        got.backup.path.file_name().unwrap().to_str().unwrap(),
        got.backup.id.to_string(),
        "the object is named by its id, not by the client's file name"
    );
    let mode = std::fs::metadata(&got.backup.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        files_under(f.store.staging_dir().unwrap()),
        Vec::<PathBuf>::new()
    );
    assert_eq!(files_under(&f.root), vec![got.backup.path.clone()]);

    // The stored bytes hash to what the job keeps for the scrub, and deleting is idempotent.
    let (sha, size) = f.store.rehash(&got.backup.path).await.unwrap();
    assert_eq!((sha, size), (got.backup.stored_sha256, stored.len() as u64));
    let job = got.new_job(Some("req-1".into()));
    assert_eq!(job.job_id, got.backup.id);
    f.store.delete(&got.backup.path).await.unwrap();
    f.store.delete(&got.backup.path).await.unwrap();
    assert_eq!(files_under(&f.root), Vec::<PathBuf>::new());
}

#[tokio::test]
async fn empty_recording_and_empty_chunks_are_fine() {
    let f = fixture();
    let msgs = vec![
        header(UploadHeader {
            content_type: String::new(),
            ..valid_header()
        }),
        chunk(b""),
        trailer(Sha256Digest::of(b"").as_bytes()),
    ];
    let got = run(&f, msgs).await.unwrap();
    assert_eq!(got.backup.size, 0);
    assert_eq!(got.header.content_type.as_str(), "application/octet-stream");
}

#[tokio::test]
async fn bad_chunk_crc_is_data_loss_and_leaves_nothing() {
    let f = fixture();
    let msgs = vec![
        header(valid_header()),
        chunk(b"hello"),
        chunk_with_crc(b"world", crc32fast::hash(b"world") ^ 1),
        chunk(b"!"),
        trailer(Sha256Digest::of(b"helloworld!").as_bytes()),
    ];
    let status = refused(
        &f,
        msgs,
        Code::DataLoss,
        "chunk 1 (bytes 5..10) failed its CRC-32 check",
    )
    .await;
    assert!(
        status
            .message()
            .contains(&format!("0x{:08x}", crc32fast::hash(b"world")))
    );
    assert!(status.message().contains("resend the recording"));
}

#[tokio::test]
async fn sha256_mismatch_is_data_loss_and_leaves_nothing() {
    let f = fixture();
    let data = vec![7u8; 100_000];
    let wrong = Sha256Digest::of(b"something else");
    let mut msgs = upload(&data, 10_000);
    *msgs.last_mut().unwrap() = trailer(wrong.as_bytes());
    let status = refused(&f, msgs, Code::DataLoss, "does not match the trailer").await;
    assert!(status.message().contains(&wrong.to_hex()));
    assert!(status.message().contains(&Sha256Digest::of(&data).to_hex()));
}

#[tokio::test]
async fn stream_cut_before_trailer_is_data_loss_and_leaves_nothing() {
    let f = fixture();
    let mut msgs = upload(&[1u8; 50_000], 8192);
    msgs.pop();
    refused(&f, msgs, Code::DataLoss, "stream ended before the trailer").await;

    // Header only.
    refused(
        &f,
        vec![header(valid_header())],
        Code::DataLoss,
        "nothing was stored",
    )
    .await;
}

#[tokio::test]
async fn transport_error_mid_stream_keeps_its_code_and_leaves_nothing() {
    let f = fixture();
    let mut msgs = upload(&[1u8; 50_000], 8192);
    msgs.insert(3, Err(Status::cancelled("client went away")));
    refused(&f, msgs, Code::Cancelled, "client went away").await;
}

#[tokio::test]
async fn dropped_call_removes_the_staging_file() {
    let f = fixture();
    let msgs = upload(&[1u8; 50_000], 8192);
    let open_ended = stream::iter(msgs[..4].to_vec()).chain(stream::pending());
    let limits = IngestLimits::default();
    let call = receive(open_ended, &f.store, &limits);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), call)
            .await
            .is_err()
    );
    // The writer thread notices the dropped call and removes its file.
    for _ in 0..100 {
        if files_under(&f.root).is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("files left behind: {:?}", files_under(&f.root));
}

/// A stream that stops sending (header and one chunk, then nothing, the
/// stream left open) is ended after the idle timeout with DEADLINE_EXCEEDED,
/// naming the setting, and its staging file is gone when `receive` returns.
/// Silence before the header and after the trailer counts the same.
#[tokio::test]
async fn silent_stream_times_out_and_leaves_nothing() {
    let f = fixture();
    let limits = IngestLimits {
        idle_timeout: Duration::from_millis(300),
        ..IngestLimits::default()
    };
    let data = [7u8; 10_000];
    let msgs = upload(&data, 4096);
    // (case, what is sent before the silence, bytes received, staging files meanwhile)
    let cases = [
        ("after a chunk", msgs[..2].to_vec(), 4096u64, 1usize),
        ("before the header", Vec::new(), 0, 0),
        ("after the trailer", msgs.clone(), data.len() as u64, 1),
    ];
    for (case, sent, bytes, staged) in cases {
        let silent = stream::iter(sent).chain(stream::pending());
        let started = std::time::Instant::now();
        let call = tokio::time::timeout(Duration::from_secs(5), receive(silent, &f.store, &limits));
        let during = async {
            tokio::time::sleep(Duration::from_millis(150)).await;
            files_under(f.store.staging_dir().unwrap()).len()
        };
        let (result, staging_files) = tokio::join!(call, during);
        let err = result.expect("the call must end on its own").unwrap_err();
        let waited = started.elapsed();
        // The cleanup below has something to remove.
        assert_eq!(staging_files, staged, "{case}");
        assert!(
            matches!(err, IngestError::Idle { bytes: b, .. } if b == bytes),
            "{case}: {err:?}"
        );
        assert!(waited >= Duration::from_millis(300), "{case}: {waited:?}");
        assert!(waited < Duration::from_secs(5), "{case}: {waited:?}");
        let status = Status::from(err);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{case}");
        assert!(
            status.message().contains("ingest_idle_timeout_secs")
                && status.message().contains("300 ms"),
            "{case}: {}",
            status.message()
        );
        assert_eq!(
            files_under(&f.root),
            Vec::<PathBuf>::new(),
            "{case}: files left behind"
        );
    }
}

/// A real uploader (mTLS, dev certificates) with `ingest_idle_timeout_secs`
/// set, an fs destination of tenant "acme", and a recorder's channel.
struct IdleServer {
    _dir: tempfile::TempDir,
    backup_dir: PathBuf,
    shared: std::sync::Arc<recvault_uploader::service::Shared>,
    destination_id: String,
    channel: tonic::transport::Channel,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<Result<(), recvault_uploader::server::StartError>>,
}

async fn start_idle_server(idle_secs: u64) -> IdleServer {
    use recvault_runtime::{devcerts, tls};
    use recvault_uploader::config::UploaderConfig;
    use recvault_uploader::destination::{DestinationConfig, Provider};

    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    devcerts::generate(&certs, &["uploader", "recorder"]).unwrap();
    let backup_dir = dir.path().join("backups");
    let wrap_file = dir.path().join("backup-wrap.pub");
    keys::TestWrapping::generate().write_file(&wrap_file);
    let config_path = dir.path().join("uploader.toml");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, recvault_runtime::policy::dev_uploader_toml()).unwrap();
    let cert = |n: &str| certs.join(n).display().to_string();
    std::fs::write(
        &config_path,
        format!(
            "listen = \"127.0.0.1:0\"\n\
             metrics_listen = \"127.0.0.1:0\"\n\
             database = \"{db}\"\n\
             backup_dir = \"{backups}\"\n\
             policy_file = \"{policy}\"\n\
             {audit}\
             ingest_idle_timeout_secs = {idle_secs}\n\n\
             [backup]\nwrapping_key_file = \"{wrap}\"\n\n\
             [tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
             [vault]\nendpoint = \"127.0.0.1:9\"\n\n\
             [vault.tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n",
            db = dir.path().join("uploader.db").display(),
            backups = backup_dir.display(),
            wrap = wrap_file.display(),
            audit = audit_support::audit_settings(dir.path()),
            crt = cert("uploader.crt"),
            key = cert("uploader.key"),
            ca = cert("ca.crt"),
            policy = policy.display(),
        ),
    )
    .unwrap();
    let config = UploaderConfig::load(&config_path).unwrap();
    assert_eq!(
        config.ingest_limits().idle_timeout,
        Duration::from_secs(idle_secs)
    );
    let bound = recvault_uploader::server::bind(config).await.unwrap();
    let addr = bound.local_addr;
    let shared = bound.shared.clone();
    let target = dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination_id = shared
        .destinations
        .put(
            "acme",
            "local",
            &DestinationConfig {
                provider: Provider::Fs,
                endpoint: String::new(),
                region: String::new(),
                bucket: target.display().to_string(),
                prefix: String::new(),
                path_style: false,
            },
            "",
        )
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(bound.serve(async {
        let _ = stopped.await;
    }));
    let channel = tls::channel(
        &addr.to_string(),
        "localhost",
        &devcerts::files(&certs, "recorder"),
    )
    .unwrap();
    IdleServer {
        _dir: dir,
        backup_dir,
        shared,
        destination_id,
        channel,
        stop,
        server,
    }
}

impl IdleServer {
    async fn jobs(&self) -> usize {
        self.shared
            .jobs
            .list(recvault_uploader::jobs::JobFilter::default())
            .await
            .unwrap()
            .len()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }
}

/// The same through the real service: uploaderd's server over mTLS (dev
/// certificates), `ingest_idle_timeout_secs = 1`. One recorder sends the
/// header and one chunk and then nothing, another sends nothing at all;
/// both keep their streams open. Both calls end with DEADLINE_EXCEEDED, no
/// job exists, and the backup directory holds no file (no staging file).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_upload_call_ends_with_deadline_exceeded_and_no_job() {
    use recvault_proto::uploader::v1::recordings_client::RecordingsClient;

    let server = start_idle_server(1).await;
    let data = [3u8; 10_000];
    let mut first = upload(&data, 4096);
    if let Ok(UploadRequest {
        part: Some(Part::Header(h)),
    }) = &mut first[0]
    {
        h.destination_id = server.destination_id.clone();
    }
    // Each call's sender stays alive (held below) so its stream stays open.
    let (chunk_tx, chunk_rx) = tokio::sync::mpsc::channel::<UploadRequest>(4);
    chunk_tx.send(first[0].clone().unwrap()).await.unwrap();
    chunk_tx.send(first[1].clone().unwrap()).await.unwrap();
    let (_quiet_tx, quiet_rx) = tokio::sync::mpsc::channel::<UploadRequest>(4);
    let started = std::time::Instant::now();
    let mut one = RecordingsClient::new(server.channel.clone());
    let mut two = RecordingsClient::new(server.channel.clone());
    let calls = async {
        tokio::join!(
            one.upload(tokio_stream::wrappers::ReceiverStream::new(chunk_rx)),
            two.upload(tokio_stream::wrappers::ReceiverStream::new(quiet_rx)),
        )
    };
    let staging = server.backup_dir.join("staging");
    let during = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        files_under(&staging).len()
    };
    let (calls, staging_files) =
        tokio::join!(tokio::time::timeout(Duration::from_secs(10), calls), during);
    let (after_chunk, before_header) = calls.expect("the calls must end on their own");
    let waited = started.elapsed();
    // While the first recorder was silent, its staging file existed.
    assert_eq!(staging_files, 1);
    for (case, result) in [
        ("after a chunk", after_chunk),
        ("before the header", before_header),
    ] {
        let status = result.expect_err(case);
        assert_eq!(status.code(), Code::DeadlineExceeded, "{case}: {status:?}");
        assert!(
            status.message().contains("ingest_idle_timeout_secs"),
            "{case}: {}",
            status.message()
        );
    }
    assert!(waited >= Duration::from_secs(1), "{waited:?}");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    assert_eq!(server.jobs().await, 0);
    assert_eq!(files_under(&server.backup_dir), Vec::<PathBuf>::new());
    drop(chunk_tx);
    server.stop().await;
}

/// A slow link is not a silent one: a 256 KiB chunk that takes 2.4 s to
/// arrive, in 16 KiB pieces every 150 ms, passes a 1 s idle timeout, because
/// the timeout counts from the last bytes received, not from the last whole
/// message. (The request is sent as raw gRPC frames so the pieces really go
/// out one by one.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_chunk_that_keeps_arriving_is_not_idle() {
    use prost::Message as _;
    use tonic::codegen::{Bytes, Service as _};

    let server = start_idle_server(1).await;
    let data = vec![9u8; 256 * 1024];
    let mut messages: Vec<UploadRequest> = upload(&data, data.len())
        .into_iter()
        .map(Result::unwrap)
        .collect();
    if let Some(Part::Header(h)) = &mut messages[0].part {
        h.destination_id = server.destination_id.clone();
    }
    let frame = |m: &UploadRequest| {
        let body = m.encode_to_vec();
        let mut f = vec![0u8];
        f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
        f.extend_from_slice(&body);
        Bytes::from(f)
    };
    let (header, chunk, trailer) = (
        frame(&messages[0]),
        frame(&messages[1]),
        frame(&messages[2]),
    );
    let (mut tx, body) = http_body_util::channel::Channel::<Bytes, tonic::Status>::new(1);
    // Stops quietly if the server ends the call early (the assertion on the
    // status below then says why).
    let feeder = tokio::spawn(async move {
        if tx.send_data(header).await.is_err() {
            return;
        }
        for piece in chunk.chunks(16 * 1024) {
            tokio::time::sleep(Duration::from_millis(150)).await;
            if tx.send_data(Bytes::copy_from_slice(piece)).await.is_err() {
                return;
            }
        }
        let _ = tx.send_data(trailer).await;
    });
    let request = tonic::codegen::http::Request::builder()
        .method("POST")
        .uri("/recvault.uploader.v1.Recordings/Upload")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(body))
        .unwrap();
    let started = std::time::Instant::now();
    let mut channel = server.channel.clone();
    std::future::poll_fn(|cx| channel.poll_ready(cx))
        .await
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(20), async {
        let response = channel.call(request).await.unwrap();
        let headers = response.headers().clone();
        let collected = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap();
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (headers, trailers, collected.to_bytes())
    })
    .await
    .expect("the call must end");
    feeder.await.unwrap();
    let (headers, trailers, bytes) = response;
    let status = trailers
        .get("grpc-status")
        .or_else(|| headers.get("grpc-status"))
        .map(|v| v.to_str().unwrap().to_owned());
    let message = trailers
        .get("grpc-message")
        .or_else(|| headers.get("grpc-message"))
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    assert_eq!(status.as_deref(), Some("0"), "{message:?}");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the chunk was meant to trickle"
    );
    let reply = recvault_proto::uploader::v1::UploadResponse::decode(&bytes[5..]).unwrap();
    assert_eq!(reply.size, data.len() as u64);
    assert_eq!(server.jobs().await, 1);
    server.stop().await;
}

#[tokio::test]
async fn header_must_come_first() {
    let f = fixture();
    refused(
        &f,
        vec![],
        Code::InvalidArgument,
        "first message must be the header",
    )
    .await;
    refused(
        &f,
        vec![chunk(b"x")],
        Code::InvalidArgument,
        "it was a chunk",
    )
    .await;
    refused(
        &f,
        vec![trailer(Sha256Digest::of(b"").as_bytes())],
        Code::InvalidArgument,
        "it was a trailer",
    )
    .await;
    refused(
        &f,
        vec![header(valid_header()), header(valid_header())],
        Code::InvalidArgument,
        "second header",
    )
    .await;
}

#[tokio::test]
async fn missing_or_invalid_header_fields_are_named() {
    let f = fixture();
    let cases: Vec<(&str, UploadHeader)> = vec![
        (
            "tenant_id",
            UploadHeader {
                tenant_id: String::new(),
                ..valid_header()
            },
        ),
        (
            "tenant_id",
            UploadHeader {
                tenant_id: "..".into(),
                ..valid_header()
            },
        ),
        (
            "tenant_id",
            UploadHeader {
                tenant_id: "acme corp".into(),
                ..valid_header()
            },
        ),
        (
            "recording_id",
            UploadHeader {
                recording_id: String::new(),
                ..valid_header()
            },
        ),
        (
            "recording_id",
            UploadHeader {
                recording_id: "r".repeat(129),
                ..valid_header()
            },
        ),
        (
            "recording_id",
            UploadHeader {
                recording_id: "rec\n1".into(),
                ..valid_header()
            },
        ),
        (
            "file_name",
            UploadHeader {
                file_name: String::new(),
                ..valid_header()
            },
        ),
        (
            "file_name",
            UploadHeader {
                file_name: "x".repeat(256),
                ..valid_header()
            },
        ),
        (
            "file_name",
            UploadHeader {
                file_name: "a\u{7}b.mp4".into(),
                ..valid_header()
            },
        ),
        (
            "destination_id",
            UploadHeader {
                destination_id: String::new(),
                ..valid_header()
            },
        ),
        (
            "content_type",
            UploadHeader {
                content_type: "video/mp4\r\nX: y".into(),
                ..valid_header()
            },
        ),
        (
            "content_type",
            UploadHeader {
                content_type: "mp4".into(),
                ..valid_header()
            },
        ),
    ];
    for (field, h) in cases {
        let status = refused(
            &f,
            vec![
                header(h),
                chunk(b"x"),
                trailer(Sha256Digest::of(b"x").as_bytes()),
            ],
            Code::InvalidArgument,
            &format!("header field `{field}`"),
        )
        .await;
        if status.message().contains("missing") {
            assert!(
                status.message().contains("required"),
                "{}",
                status.message()
            );
        }
    }
}

#[tokio::test]
async fn path_traversal_file_names_are_refused() {
    let f = fixture();
    for name in [
        "../../etc/passwd",
        "..",
        ".",
        "a/b.mp4",
        "..\\windows.mp4",
        "/abs.mp4",
        "x/../y",
    ] {
        refused(
            &f,
            vec![
                header(UploadHeader {
                    file_name: name.into(),
                    ..valid_header()
                }),
                chunk(b"x"),
                trailer(Sha256Digest::of(b"x").as_bytes()),
            ],
            Code::InvalidArgument,
            "header field `file_name`",
        )
        .await;
    }
}

#[tokio::test]
async fn trailer_must_be_32_bytes_and_last() {
    let f = fixture();
    let mut msgs = upload(b"abc", 2);
    *msgs.last_mut().unwrap() = trailer(&[0u8; 31]);
    refused(&f, msgs, Code::InvalidArgument, "32 raw bytes, not 31").await;

    let mut msgs = upload(b"abc", 2);
    msgs.push(chunk(b"more"));
    refused(&f, msgs, Code::InvalidArgument, "followed the trailer").await;

    refused(
        &f,
        vec![header(valid_header()), Ok(UploadRequest { part: None })],
        Code::InvalidArgument,
        "message 1 is empty",
    )
    .await;
}

#[tokio::test]
async fn size_limits() {
    let f = fixture();
    let limits = IngestLimits {
        max_chunk_bytes: 1024,
        max_total_bytes: 4096,
        ..IngestLimits::default()
    };
    let err = receive(stream::iter(upload(&[0u8; 2048], 2048)), &f.store, &limits)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            IngestError::ChunkTooLarge {
                index: 0,
                len: 2048,
                max: 1024
            }
        ),
        "{err}"
    );
    let err = receive(stream::iter(upload(&[0u8; 5000], 1000)), &f.store, &limits)
        .await
        .unwrap_err();
    assert!(matches!(err, IngestError::TooLarge { max: 4096 }), "{err}");
    assert_eq!(Status::from(err).code(), Code::InvalidArgument);
    assert_eq!(files_under(&f.root), Vec::<PathBuf>::new());
    let ok = receive(stream::iter(upload(&[0u8; 4096], 1024)), &f.store, &limits).await;
    assert_eq!(ok.unwrap().backup.size, 4096);
}

#[tokio::test]
async fn twenty_mib_in_one_mib_chunks() {
    let f = fixture();
    let mut data = vec![0u8; 20 << 20];
    let mut x: u32 = 0x1234_5678;
    for b in &mut data {
        // xorshift: cheap bytes that are not all alike
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let got = run(&f, upload(&data, 1 << 20)).await.unwrap();
    assert_eq!(got.backup.size, 20 << 20);
    assert_eq!(got.backup.sha256, Sha256Digest::of(&data));
    let plain = f
        .wrapping
        .read_plain(&f.store, &got.backup.path)
        .await
        .unwrap();
    assert_eq!(plain.len(), data.len());
    assert!(
        plain == data,
        "20 MiB read back through the decrypting source"
    );
    assert_eq!(
        files_under(f.store.staging_dir().unwrap()),
        Vec::<PathBuf>::new()
    );
}

#[tokio::test]
async fn stale_staging_files_are_removed_at_open() {
    let f = fixture();
    std::fs::write(
        f.store.staging_dir().unwrap().join("left-by-a-crash.part"),
        b"x",
    )
    .unwrap();
    let reopened = BackupStore::open(&f.root, f.wrapping.key.clone()).unwrap();
    assert_eq!(
        files_under(reopened.staging_dir().unwrap()),
        Vec::<PathBuf>::new()
    );
}

/// Intake throughput (not a test): `cargo test --release -p recvault-uploader
/// --test ingest_backup -- --ignored --nocapture intake_throughput`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark"]
async fn intake_throughput() {
    const CHUNK: usize = 1 << 20;
    const CHUNKS: usize = 1024;
    let f = fixture();
    let block: Vec<u8> = (0..CHUNK).map(|i| (i * 31 % 251) as u8).collect();
    let crc = crc32fast::hash(&block);
    let mut whole = sha2::Sha256::default();
    for _ in 0..CHUNKS {
        sha2::Digest::update(&mut whole, &block);
    }
    let sha = Sha256Digest::from_hasher(whole);
    let msgs = stream::iter(
        std::iter::once(header(valid_header()))
            .chain((0..CHUNKS).map(|_| chunk_with_crc(&block, crc)))
            .chain(std::iter::once(trailer(sha.as_bytes()))),
    );
    let start = std::time::Instant::now();
    let got = receive(msgs, &f.store, &IngestLimits::default())
        .await
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "ingested {} MiB in {secs:.2} s: {:.0} MiB/s (CRC-32 + SHA-256 + AES-256-GCM + write + fsync)",
        got.backup.size >> 20,
        (got.backup.size >> 20) as f64 / secs
    );
    let start = std::time::Instant::now();
    f.store.rehash(&got.backup.path).await.unwrap();
    let secs = start.elapsed().as_secs_f64();
    println!(
        "re-hashed in {secs:.2} s: {:.0} MiB/s",
        (got.backup.size >> 20) as f64 / secs
    );
}
