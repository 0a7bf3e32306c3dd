//! Destinations against a real S3 server (s3s-fs, in-process over HTTP) and
//! the local-directory destination: delivery, checksums on the wire,
//! verification, error classification, probes, and that no secret leaks.
#![allow(clippy::unwrap_used)]

#[path = "support/s3.rs"]
mod s3_server;
#[path = "support/source.rs"]
mod source_support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use recvault_uploader::credential::{CredentialError, S3Credential};
use recvault_uploader::destination::{
    DeliveryError, DeliveryHooks, Destination, DestinationConfig, FileSource, FsAllowedRoots,
    HookFuture, ObjectInfo, ProbeStep, Provider, S3Options, Source, VerifiedBy,
};
use s3_server::{S3Server, S3ServerOptions};
use sha2::{Digest as _, Sha256};
use source_support::{UNAUTHENTIC, UnauthenticSource};

const MIB: u64 = 1024 * 1024;

fn s3_config(server: &S3Server, bucket: &str, prefix: &str) -> DestinationConfig {
    DestinationConfig {
        provider: Provider::S3,
        endpoint: server.endpoint.clone(),
        region: "us-east-1".into(),
        bucket: bucket.into(),
        prefix: prefix.into(),
        path_style: true,
    }
}

fn s3_destination(server: &S3Server, bucket: &str, options: S3Options) -> Destination {
    Destination::with_options(
        &s3_config(server, bucket, "recordings/2024"),
        Some(server.credential_json().as_bytes()),
        options,
        &FsAllowedRoots::default(),
    )
    .unwrap()
}

/// Writes `size` pseudo-random bytes (in 1 MiB chunks, never whole in memory)
/// and returns the file and its ObjectInfo.
fn recording(dir: &Path, name: &str, size: u64, seed: u64) -> (PathBuf, ObjectInfo) {
    let path = dir.join(format!("backup-{name}"));
    let mut file = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut sha = Sha256::new();
    let mut crc = crc32fast::Hasher::new();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut left = size;
    let mut chunk = vec![0u8; MIB as usize];
    while left > 0 {
        let n = left.min(MIB) as usize;
        for b in chunk[..n].iter_mut() {
            // xorshift64: cheap, deterministic, incompressible enough.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *b = (state >> 24) as u8;
        }
        sha.update(&chunk[..n]);
        crc.update(&chunk[..n]);
        file.write_all(&chunk[..n]).unwrap();
        left -= n as u64;
    }
    file.flush().unwrap();
    let info = ObjectInfo {
        name: name.into(),
        size,
        sha256: sha.finalize().into(),
        crc32: crc.finalize(),
        content_type: "video/mp4".into(),
    };
    (path, info)
}

/// The recording at `path` as a delivery reads it.
async fn file(path: &Path) -> Arc<dyn Source> {
    Arc::new(FileSource::open(path).await.unwrap())
}

fn sha256_file(path: &Path) -> [u8; 32] {
    use std::io::Read as _;
    let mut file = std::fs::File::open(path).unwrap();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    sha.finalize().into()
}

fn b64_crc(crc: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

/// The secret must not appear in the error's Display, alternate Display or Debug.
fn assert_no_secret(err: &dyn std::fmt::Debug, shown: &str, secret: &str) {
    let debug = format!("{err:?}");
    assert!(!shown.contains(secret), "secret in message: {shown}");
    assert!(!debug.contains(secret), "secret in Debug: {debug}");
}

fn assert_error_has_no_secret(err: &DeliveryError, secret: &str) {
    assert_no_secret(err, &err.to_string(), secret);
    assert_no_secret(err, &format!("{err:#}"), secret);
}

/// Downloads `bucket/key` with the test's own client, streaming to `dest`.
async fn download(server: &S3Server, bucket: &str, key: &str, dest: &Path) {
    let out = server
        .client()
        .get_object()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap();
    let mut body = out.body;
    let mut file = std::fs::File::create(dest).unwrap();
    while let Some(chunk) = body.try_next().await.unwrap() {
        file.write_all(&chunk).unwrap();
    }
}

/// Runs the real `sha256sum -c SIDECAR` in `dir`; true when it reports OK.
fn sha256sum_check(dir: &Path, sidecar: &str) -> bool {
    let out = Command::new("sha256sum")
        .arg("-c")
        .arg(sidecar)
        .current_dir(dir)
        .output()
        .unwrap();
    out.status.success()
}

/// No request carried an aws-chunked body or a trailing checksum.
fn assert_plain_checksum_headers(requests: &[s3_server::RecordedRequest]) {
    for r in requests {
        let content_sha = r.header("x-amz-content-sha256").unwrap_or_default();
        assert!(
            !content_sha.starts_with("STREAMING-"),
            "{} used a streaming signature: {content_sha}",
            r.operation
        );
        assert!(
            r.header("x-amz-trailer").is_none(),
            "{} used a trailer",
            r.operation
        );
        assert!(
            !r.header("content-encoding")
                .unwrap_or_default()
                .contains("aws-chunked"),
            "{} was aws-chunked",
            r.operation
        );
        assert!(
            r.header("x-amz-decoded-content-length").is_none(),
            "{}",
            r.operation
        );
    }
}

#[tokio::test]
async fn small_file_single_put_is_verified_by_provider_checksum() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "call-1.mp4", 3 * MIB + 17, 1);
    let destination = s3_destination(&server, "media", S3Options::default());

    let seen = Mutex::new(Vec::new());
    let progress = |n: u64| seen.lock().unwrap().push(n);
    let hooks = DeliveryHooks {
        progress: &progress,
        ..DeliveryHooks::default()
    };
    let delivery = destination
        .deliver(file(&source).await, &info, &hooks)
        .await
        .unwrap();

    assert_eq!(delivery.verified_by, VerifiedBy::ProviderChecksum);
    assert_eq!(delivery.key, "recordings/2024/call-1.mp4");
    assert_eq!(delivery.location, "s3://media/recordings/2024/call-1.mp4");
    assert_eq!(
        delivery.sidecar_location,
        "s3://media/recordings/2024/call-1.mp4.sha256"
    );
    assert_eq!(seen.lock().unwrap().last(), Some(&info.size));
    // Byte-identical on the server's disk.
    assert_eq!(
        sha256_file(&server.object_path("media", &delivery.key)),
        info.sha256
    );

    // The stored checksum and metadata, as an independent client sees them.
    let head = server
        .client()
        .head_object()
        .bucket("media")
        .key(&delivery.key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(head.checksum_crc32(), Some(b64_crc(info.crc32).as_str()));
    assert_eq!(head.content_length(), Some(info.size as i64));
    assert_eq!(head.content_type(), Some("video/mp4"));
    assert_eq!(
        head.metadata().unwrap().get("sha256").map(String::as_str),
        Some(hex::encode(info.sha256).as_str())
    );

    // On the wire: the CRC-32 went as a plain header, the body was not aws-chunked.
    let puts = server.requests_of("PutObject");
    assert_eq!(puts.len(), 2, "recording and sidecar");
    let put = puts
        .iter()
        .find(|r| r.path.ends_with("/call-1.mp4"))
        .unwrap();
    assert_eq!(
        put.header("x-amz-checksum-crc32"),
        Some(b64_crc(info.crc32).as_str())
    );
    assert_eq!(
        put.header("x-amz-meta-sha256"),
        Some(hex::encode(info.sha256).as_str())
    );
    assert_eq!(
        put.header("content-length"),
        Some(info.size.to_string().as_str())
    );
    assert_plain_checksum_headers(&server.requests());

    // The customer's check: download both, run the real sha256sum -c.
    let download_dir = tempfile::tempdir().unwrap();
    download(
        &server,
        "media",
        &delivery.key,
        &download_dir.path().join("call-1.mp4"),
    )
    .await;
    download(
        &server,
        "media",
        "recordings/2024/call-1.mp4.sha256",
        &download_dir.path().join("call-1.mp4.sha256"),
    )
    .await;
    let sidecar = std::fs::read_to_string(download_dir.path().join("call-1.mp4.sha256")).unwrap();
    assert_eq!(
        sidecar,
        format!("{}  call-1.mp4\n", hex::encode(info.sha256))
    );
    assert!(sha256sum_check(download_dir.path(), "call-1.mp4.sha256"));
    // ...and the check is meaningful: one flipped byte fails it.
    let mut bytes = std::fs::OpenOptions::new()
        .write(true)
        .open(download_dir.path().join("call-1.mp4"))
        .unwrap();
    bytes.write_all(b"X").unwrap();
    drop(bytes);
    assert!(!sha256sum_check(download_dir.path(), "call-1.mp4.sha256"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_file_goes_multipart_and_is_verified_by_read_back() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "long-call.mp4", 40 * MIB, 2);
    let options = S3Options {
        part_size: 8 * MIB,
        ..S3Options::default()
    };
    let destination = s3_destination(&server, "media", options);

    let started = Arc::new(Mutex::new(Vec::new()));
    let started_ids = Arc::clone(&started);
    let on_started = move |id: String| -> HookFuture {
        started_ids.lock().unwrap().push(id);
        Box::pin(async { Ok(()) })
    };
    let closed = Arc::new(Mutex::new(Vec::new()));
    let closed_ids = Arc::clone(&closed);
    let on_closed = move |id: String| -> HookFuture {
        closed_ids.lock().unwrap().push(id);
        Box::pin(async { Ok(()) })
    };
    let seen = Mutex::new(Vec::new());
    let progress = |n: u64| seen.lock().unwrap().push(n);
    let hooks = DeliveryHooks {
        progress: &progress,
        on_multipart_started: &on_started,
        on_multipart_closed: &on_closed,
        resume_upload_id: None,
    };
    let delivery = destination
        .deliver(file(&source).await, &info, &hooks)
        .await
        .unwrap();
    // Completed: reported closed, so the job may forget the id.
    assert_eq!(*closed.lock().unwrap(), *started.lock().unwrap());

    // s3s-fs keeps no whole-object checksum for multipart: read-back it is.
    assert_eq!(delivery.verified_by, VerifiedBy::ReadBack);
    assert_eq!(
        sha256_file(&server.object_path("media", &delivery.key)),
        info.sha256
    );
    assert_eq!(started.lock().unwrap().len(), 1);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 5);
    assert_eq!(seen.last(), Some(&info.size));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    // On the wire: five 8 MiB parts, each with its own CRC-32 as a plain
    // header; the complete carries the FULL_OBJECT CRC-32 of the whole file.
    let parts = server.requests_of("UploadPart");
    assert_eq!(parts.len(), 5);
    // Test-side only: the expected CRC-32 of each 8 MiB part.
    let data = std::fs::read(&source).unwrap();
    let expected: Vec<String> = data
        .chunks(8 * MIB as usize)
        .map(|c| b64_crc(crc32fast::hash(c)))
        .collect();
    drop(data);
    let mut numbers = Vec::new();
    for part in &parts {
        let number: usize = part.query_param("partNumber").unwrap().parse().unwrap();
        assert_eq!(
            part.header("x-amz-checksum-crc32"),
            Some(expected[number - 1].as_str()),
            "part {number}"
        );
        assert_eq!(
            part.header("content-length"),
            Some((8 * MIB).to_string().as_str())
        );
        numbers.push(number);
    }
    numbers.sort_unstable();
    assert_eq!(numbers, [1, 2, 3, 4, 5]);
    let create = server.requests_of("CreateMultipartUpload");
    assert_eq!(create[0].header("x-amz-checksum-algorithm"), Some("CRC32"));
    assert_eq!(create[0].header("x-amz-checksum-type"), Some("FULL_OBJECT"));
    let complete = server.requests_of("CompleteMultipartUpload");
    assert_eq!(complete.len(), 1);
    assert_eq!(
        complete[0].header("x-amz-checksum-crc32"),
        Some(b64_crc(info.crc32).as_str())
    );
    assert_eq!(
        complete[0].header("x-amz-checksum-type"),
        Some("FULL_OBJECT")
    );
    assert_eq!(
        complete[0].header("x-amz-mp-object-size"),
        Some(info.size.to_string().as_str())
    );
    assert_plain_checksum_headers(&server.requests());
    // The read-back happened, and nothing of the upload is left behind.
    assert_eq!(server.requests_of("GetObject").len(), 1);
    let leftovers: Vec<_> = std::fs::read_dir(server.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let download_dir = tempfile::tempdir().unwrap();
    download(
        &server,
        "media",
        "recordings/2024/long-call.mp4.sha256",
        &download_dir.path().join("long-call.mp4.sha256"),
    )
    .await;
    std::fs::copy(
        server.object_path("media", &delivery.key),
        download_dir.path().join("long-call.mp4"),
    )
    .unwrap();
    assert!(sha256sum_check(download_dir.path(), "long-call.mp4.sha256"));
}

/// s3s-fs keeps the checksum of an earlier single-PUT object when a
/// multipart upload replaces it; verification must not trust that.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_replacing_a_single_put_object_is_still_verified() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let small = tempfile::tempdir().unwrap();
    let (first, first_info) = recording(small.path(), "same.mp4", 1000, 12);
    let (second, second_info) = recording(work.path(), "same.mp4", 17 * MIB, 13);
    let destination = s3_destination(&server, "media", S3Options::default());
    let hooks = DeliveryHooks::default();
    let d1 = destination
        .deliver(file(&first).await, &first_info, &hooks)
        .await
        .unwrap();
    assert_eq!(d1.verified_by, VerifiedBy::ProviderChecksum);
    let d2 = destination
        .deliver(file(&second).await, &second_info, &hooks)
        .await
        .unwrap();
    assert_eq!(d2.verified_by, VerifiedBy::ReadBack);
    // The quirk itself: HEAD still reports the first object's CRC-32.
    let head = server
        .client()
        .head_object()
        .bucket("media")
        .key(&d2.key)
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.checksum_crc32(),
        Some(b64_crc(first_info.crc32).as_str())
    );
    assert_eq!(
        sha256_file(&server.object_path("media", &d2.key)),
        second_info.sha256
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_resumes_an_upload_started_earlier() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "resumed.mp4", 20 * MIB, 3);
    let key = "recordings/2024/resumed.mp4";
    // An earlier attempt created the upload and sent part 1, then "crashed".
    let client = server.client();
    let upload_id = client
        .create_multipart_upload()
        .bucket("media")
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap();
    let first = std::fs::read(&source).unwrap()[..8 * MIB as usize].to_vec();
    client
        .upload_part()
        .bucket("media")
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .body(first.into())
        .send()
        .await
        .unwrap();
    server.clear_requests();

    let destination = s3_destination(
        &server,
        "media",
        S3Options {
            part_size: 8 * MIB,
            ..S3Options::default()
        },
    );
    let on_started = |_: String| -> HookFuture { panic!("must resume, not start a new upload") };
    let hooks = DeliveryHooks {
        on_multipart_started: &on_started,
        resume_upload_id: Some(&upload_id),
        ..DeliveryHooks::default()
    };
    let delivery = destination
        .deliver(file(&source).await, &info, &hooks)
        .await
        .unwrap();
    assert_eq!(delivery.verified_by, VerifiedBy::ReadBack);
    assert_eq!(sha256_file(&server.object_path("media", key)), info.sha256);
    assert!(server.requests_of("CreateMultipartUpload").is_empty());
    assert_eq!(server.requests_of("ListParts").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_upload_id_hook_aborts_the_upload() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "hook.mp4", 17 * MIB, 4);
    let destination = s3_destination(&server, "media", S3Options::default());
    let on_started =
        |_: String| -> HookFuture { Box::pin(async { Err("job store is read-only".into()) }) };
    let hooks = DeliveryHooks {
        on_multipart_started: &on_started,
        ..DeliveryHooks::default()
    };
    let err = destination
        .deliver(file(&source).await, &info, &hooks)
        .await
        .unwrap_err();
    assert!(matches!(err, DeliveryError::Hook { .. }), "{err:?}");
    assert!(!err.is_permanent());
    assert!(err.to_string().contains("job store is read-only"), "{err}");
    assert_eq!(server.requests_of("AbortMultipartUpload").len(), 1);
    assert!(server.requests_of("UploadPart").is_empty());
}

/// A permanent error mid-multipart (the part is refused: AccessDenied)
/// aborts the upload; `on_multipart_closed` reports its id only when the
/// abort worked. When the abort is refused too, the upload still exists and
/// is not reported, so whoever recorded the id keeps it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upload_is_reported_closed_only_when_the_abort_worked() {
    for abort_refused in [false, true] {
        let mut deny = std::collections::HashSet::from(["UploadPart"]);
        if abort_refused {
            deny.insert("AbortMultipartUpload");
        }
        let server = S3Server::start_with(S3ServerOptions {
            deny,
            ..S3ServerOptions::default()
        })
        .await;
        server.create_bucket("media");
        let work = tempfile::tempdir().unwrap();
        let (source, info) = recording(work.path(), "denied.mp4", 17 * MIB, 7);
        let destination = s3_destination(&server, "media", S3Options::default());
        let started = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (started_ids, closed_ids) = (Arc::clone(&started), Arc::clone(&closed));
        let on_started = move |id: String| -> HookFuture {
            started_ids.lock().unwrap().push(id);
            Box::pin(async { Ok(()) })
        };
        let on_closed = move |id: String| -> HookFuture {
            closed_ids.lock().unwrap().push(id);
            Box::pin(async { Ok(()) })
        };
        let hooks = DeliveryHooks {
            on_multipart_started: &on_started,
            on_multipart_closed: &on_closed,
            ..DeliveryHooks::default()
        };
        let err = destination
            .deliver(file(&source).await, &info, &hooks)
            .await
            .unwrap_err();
        assert!(err.is_permanent(), "{err}");
        let started = started.lock().unwrap().clone();
        assert_eq!(started.len(), 1);
        let id = &started[0];
        assert_eq!(server.requests_of("AbortMultipartUpload").len(), 1);
        if abort_refused {
            assert!(closed.lock().unwrap().is_empty());
            assert!(server.upload_in_progress(id));
        } else {
            assert_eq!(*closed.lock().unwrap(), started);
            assert!(!server.upload_in_progress(id));
        }
    }
}

/// A backup that stops authenticating in the middle of part 2 (its source
/// read fails with InvalidData), met in the part's CRC-32 pass (`clean` 0)
/// or only while the part's body is being sent (`clean` 1): the delivery
/// fails with the permanent BackupCorrupt, nothing is completed at the
/// destination, and the upload is aborted and reported closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multipart_backup_failing_authentication_is_aborted_not_completed() {
    for clean in [0, 1] {
        let server = S3Server::start().await;
        server.create_bucket("media");
        let work = tempfile::tempdir().unwrap();
        let (path, info) = recording(work.path(), "tampered.mp4", 17 * MIB, 23);
        // Parts are 8 MiB: this byte is 3 MiB into part 2.
        let at = 11 * MIB + 5;
        let source = Arc::new(UnauthenticSource::new(
            FileSource::open(&path).await.unwrap(),
            at,
            clean,
        ));
        let destination = s3_destination(&server, "media", S3Options::default());
        let started = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(Mutex::new(Vec::new()));
        let (started_ids, closed_ids) = (Arc::clone(&started), Arc::clone(&closed));
        let on_started = move |id: String| -> HookFuture {
            started_ids.lock().unwrap().push(id);
            Box::pin(async { Ok(()) })
        };
        let on_closed = move |id: String| -> HookFuture {
            closed_ids.lock().unwrap().push(id);
            Box::pin(async { Ok(()) })
        };
        let hooks = DeliveryHooks {
            on_multipart_started: &on_started,
            on_multipart_closed: &on_closed,
            ..DeliveryHooks::default()
        };
        let err = destination
            .deliver(source.clone(), &info, &hooks)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, DeliveryError::BackupCorrupt { detail } if detail.contains(UNAUTHENTIC)),
            "clean {clean}: {err:?}"
        );
        assert!(err.is_permanent());
        assert!(err.to_string().contains("check the backup store"), "{err}");

        let started = started.lock().unwrap().clone();
        assert_eq!(started.len(), 1);
        assert!(server.requests_of("CompleteMultipartUpload").is_empty());
        assert_eq!(server.requests_of("AbortMultipartUpload").len(), 1);
        assert!(!server.upload_in_progress(&started[0]));
        assert_eq!(*closed.lock().unwrap(), started);
        let key = "recordings/2024/tampered.mp4";
        assert!(!server.object_path("media", key).exists());
        assert!(
            !server
                .object_path("media", &format!("{key}.sha256"))
                .exists()
        );
        assert!(server.requests_of("HeadObject").is_empty());
        // Read once per pass (CRC-32, then the upload when that was clean),
        // and never again once it failed: no retry re-reads a corrupt range.
        assert_eq!(source.opened_over_failure(), clean + 1, "clean {clean}");
    }
}

/// The same for a single PUT: the body fails 1 MiB in, the request is cut
/// off, nothing is stored under the key and no sidecar is written.
#[tokio::test]
async fn single_put_backup_failing_authentication_stores_nothing() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (path, info) = recording(work.path(), "tampered-small.mp4", 3 * MIB + 17, 24);
    let source = Arc::new(UnauthenticSource::new(
        FileSource::open(&path).await.unwrap(),
        MIB + 5,
        0,
    ));
    let destination = s3_destination(&server, "media", S3Options::default());
    let err = destination
        .deliver(source.clone(), &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeliveryError::BackupCorrupt { detail } if detail.contains(UNAUTHENTIC)),
        "{err:?}"
    );
    assert!(err.is_permanent());
    let key = "recordings/2024/tampered-small.mp4";
    assert!(!server.object_path("media", key).exists());
    let head = server
        .client()
        .head_object()
        .bucket("media")
        .key(key)
        .send()
        .await;
    assert!(head.is_err(), "{head:?}");
    assert!(
        server
            .requests_of("PutObject")
            .iter()
            .all(|r| !r.path.ends_with(".sha256")),
        "no sidecar"
    );
    assert_eq!(source.opened_over_failure(), 1);
}

/// Uploads in progress for `bucket`, as (key, upload id), listed by the
/// test's own client (every page).
async fn uploads_in_progress(server: &S3Server, bucket: &str) -> Vec<(String, String)> {
    let client = server.client();
    let mut uploads = Vec::new();
    let (mut key_marker, mut id_marker) = (None, None);
    loop {
        let out = client
            .list_multipart_uploads()
            .bucket(bucket)
            .set_key_marker(key_marker)
            .set_upload_id_marker(id_marker)
            .send()
            .await
            .unwrap();
        for u in out.uploads() {
            uploads.push((
                u.key().unwrap().to_owned(),
                u.upload_id().unwrap().to_owned(),
            ));
        }
        if out.is_truncated() != Some(true) {
            break;
        }
        key_marker = out.next_key_marker().map(str::to_owned);
        id_marker = out.next_upload_id_marker().map(str::to_owned);
    }
    uploads.sort();
    uploads
}

async fn create_upload(server: &S3Server, bucket: &str, key: &str) -> String {
    server
        .client()
        .create_multipart_upload()
        .bucket(bucket)
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap()
}

/// The crash window the job store cannot close: the provider created an
/// upload but the uploader died before committing its id. A fresh delivery
/// of that key finds such uploads with ListMultipartUploads (every page,
/// exact key only) and aborts them before it creates its own.
///
/// s3s-fs 0.14.1 does not implement ListMultipartUploads (it answers 501);
/// the test server serves it from s3s-fs's upload files, written from the
/// S3 API reference (`S3ServerOptions::list_multipart_uploads`), with pages
/// of 2 so paging is exercised. This proves our side of the protocol against
/// a real HTTP server and the real SDK; it cannot prove how a given
/// provider's listing behaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_multipart_aborts_uploads_left_for_its_key() {
    let server = S3Server::start_with(S3ServerOptions {
        list_multipart_uploads: Some(2),
        ..S3ServerOptions::default()
    })
    .await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "crash.mp4", 17 * MIB, 21);
    let key = "recordings/2024/crash.mp4";

    // Three uploads for the key whose ids were never recorded (one with a
    // part already sent), one for a longer key sharing the prefix, one for
    // another key.
    let mut stale = Vec::new();
    for _ in 0..3 {
        stale.push(create_upload(&server, "media", key).await);
    }
    let with_part = stale[0].clone();
    server
        .client()
        .upload_part()
        .bucket("media")
        .key(key)
        .upload_id(&with_part)
        .part_number(1)
        .body(vec![9u8; 1024].into())
        .send()
        .await
        .unwrap();
    let longer = create_upload(&server, "media", "recordings/2024/crash.mp4.old").await;
    let other = create_upload(&server, "media", "recordings/2024/other.mp4").await;
    assert_eq!(uploads_in_progress(&server, "media").await.len(), 5);
    server.clear_requests();

    let destination = s3_destination(&server, "media", S3Options::default());
    let delivery = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap();
    assert_eq!(delivery.key, key);
    assert_eq!(sha256_file(&server.object_path("media", key)), info.sha256);

    // Listed with prefix = the key, page after page (4 entries, pages of 2).
    let lists = server.requests_of("ListMultipartUploads");
    assert!(lists.len() >= 2, "{lists:?}");
    for list in &lists {
        assert_eq!(
            list.query_param("prefix"),
            Some("recordings%2F2024%2Fcrash.mp4")
        );
    }
    assert!(lists[1].query_param("key-marker").is_some(), "{lists:?}");

    // Exactly the three uploads for the key were aborted, before ours was created.
    let requests = server.requests();
    let position = |op: &str| requests.iter().position(|r| r.operation == op).unwrap();
    let mut aborted: Vec<String> = requests
        .iter()
        .filter(|r| r.operation == "AbortMultipartUpload")
        .map(|r| r.query_param("uploadId").unwrap().to_owned())
        .collect();
    aborted.sort();
    stale.sort();
    assert_eq!(aborted, stale);
    let last_abort = requests
        .iter()
        .rposition(|r| r.operation == "AbortMultipartUpload")
        .unwrap();
    assert!(last_abort < position("CreateMultipartUpload"));
    assert!(position("ListMultipartUploads") < position("CreateMultipartUpload"));

    // Nothing is left for the key; the other keys' uploads are untouched.
    let mut left = uploads_in_progress(&server, "media").await;
    left.sort();
    let mut expected = vec![
        ("recordings/2024/crash.mp4.old".to_owned(), longer),
        ("recordings/2024/other.mp4".to_owned(), other),
    ];
    expected.sort();
    assert_eq!(left, expected);
    let for_key = server
        .client()
        .list_multipart_uploads()
        .bucket("media")
        .prefix(key)
        .send()
        .await
        .unwrap();
    assert!(
        for_key.uploads().iter().all(|u| u.key() != Some(key)),
        "{for_key:?}"
    );
    // The stale upload's part is gone from the server's disk too.
    let part_files = std::fs::read_dir(server.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with(&format!(".upload_id-{with_part}"))
        })
        .count();
    assert_eq!(part_files, 0);
}

/// Against s3s-fs as it is (ListMultipartUploads answers 501 NotImplemented)
/// and against a credential refused the listing (403), a fresh multipart
/// delivery still succeeds. What this cannot do is find the upload left for
/// the key: it stays, for the bucket's AbortIncompleteMultipartUpload
/// lifecycle rule to clean up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_multipart_delivers_when_uploads_cannot_be_listed() {
    for deny in [vec![], vec!["ListMultipartUploads"]] {
        let server = S3Server::start_with(S3ServerOptions {
            deny: deny.iter().copied().collect(),
            ..S3ServerOptions::default()
        })
        .await;
        server.create_bucket("media");
        let work = tempfile::tempdir().unwrap();
        let (source, info) = recording(work.path(), "unlisted.mp4", 17 * MIB, 22);
        let key = "recordings/2024/unlisted.mp4";
        let orphan = create_upload(&server, "media", key).await;
        // The listing really is refused, with the code the uploader tolerates.
        let refused = server
            .client()
            .list_multipart_uploads()
            .bucket("media")
            .prefix(key)
            .send()
            .await
            .unwrap_err();
        let status = refused.raw_response().unwrap().status().as_u16();
        assert_eq!(status, if deny.is_empty() { 501 } else { 403 });
        server.clear_requests();

        let destination = s3_destination(&server, "media", S3Options::default());
        let delivery = destination
            .deliver(file(&source).await, &info, &DeliveryHooks::default())
            .await
            .unwrap();
        assert_eq!(
            sha256_file(&server.object_path("media", &delivery.key)),
            info.sha256
        );
        let lists = server.requests_of("ListMultipartUploads");
        assert_eq!(lists.len(), 1, "{deny:?}");
        assert!(server.requests_of("AbortMultipartUpload").is_empty());
        // The limit of what can be shown here: the orphan is still there.
        assert!(
            server
                .root()
                .join(format!(".upload-{orphan}.json"))
                .exists(),
            "{deny:?}"
        );
    }
}

#[tokio::test]
async fn abort_multipart_removes_an_orphaned_upload() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let key = "recordings/2024/orphan.mp4";
    let client = server.client();
    let upload_id = client
        .create_multipart_upload()
        .bucket("media")
        .key(key)
        .send()
        .await
        .unwrap()
        .upload_id
        .unwrap();
    client
        .upload_part()
        .bucket("media")
        .key(key)
        .upload_id(&upload_id)
        .part_number(1)
        .body(vec![7u8; 1024].into())
        .send()
        .await
        .unwrap();
    let destination = s3_destination(&server, "media", S3Options::default());
    assert_eq!(destination.object_key("orphan.mp4").unwrap(), key);
    destination.abort_multipart(key, &upload_id).await.unwrap();
    let leftovers = std::fs::read_dir(server.root())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".upload_id-"))
        .count();
    assert_eq!(leftovers, 0);
}

#[tokio::test]
async fn wrong_crc32_is_rejected_by_the_server_and_retryable() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "bad-crc.mp4", MIB, 5);
    let options = S3Options {
        corrupt_checksum_for_test: true,
        ..S3Options::default()
    };
    let destination = s3_destination(&server, "media", options);

    let err = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert_eq!(err.provider_code(), Some("BadDigest"), "{err:?}");
    assert_eq!(err.http_status(), Some(400));
    assert!(
        !err.is_permanent(),
        "a checksum mismatch in transit is retried: {err}"
    );
    assert!(
        err.to_string()
            .contains("s3://media/recordings/2024/bad-crc.mp4"),
        "{err}"
    );
    // The wrong value really went out, and nothing was stored.
    let put = &server.requests_of("PutObject")[0];
    assert_eq!(
        put.header("x-amz-checksum-crc32"),
        Some(b64_crc(!info.crc32).as_str())
    );
    // s3s-fs 0.14.1 renames the body into place before comparing checksums,
    // so the bytes are on its disk anyway; it must not have kept the wrong CRC.
    let head = server
        .client()
        .head_object()
        .bucket("media")
        .key("recordings/2024/bad-crc.mp4")
        .checksum_mode(aws_sdk_s3::types::ChecksumMode::Enabled)
        .send()
        .await;
    if let Ok(head) = head {
        assert_ne!(head.checksum_crc32(), Some(b64_crc(!info.crc32).as_str()));
    }
    // A retry with the right checksum then delivers.
    let retry = s3_destination(&server, "media", S3Options::default());
    let delivery = retry
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap();
    assert_eq!(delivery.verified_by, VerifiedBy::ProviderChecksum);
    assert_error_has_no_secret(&err, &server.secret_key);
}

#[tokio::test]
async fn wrong_secret_is_a_permanent_auth_error_without_the_secret() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "auth.mp4", 1000, 6);
    let wrong_secret = "WRONGsecretKEY/with+chars0123456789abcd";
    let json = format!(
        r#"{{"access_key_id":"{}","secret_access_key":"{wrong_secret}"}}"#,
        server.access_key
    );
    let destination =
        Destination::new(&s3_config(&server, "media", ""), Some(json.as_bytes())).unwrap();

    let err = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert_eq!(
        err.provider_code(),
        Some("SignatureDoesNotMatch"),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert_eq!(err.probe_step(), ProbeStep::Auth);
    assert!(err.to_string().contains("secret access key"), "{err}");
    assert_error_has_no_secret(&err, wrong_secret);
    assert_error_has_no_secret(&err, &server.secret_key);
    let shown = format!("{destination:?}");
    assert!(!shown.contains(wrong_secret), "{shown}");

    let probe = destination.probe().await.unwrap_err();
    assert_eq!(probe.step, ProbeStep::Auth, "{probe}");
    assert!(!probe.message.contains(wrong_secret));
    assert!(!format!("{probe:?}").contains(wrong_secret));
}

#[tokio::test]
async fn unknown_access_key_is_a_permanent_auth_error() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let json = format!(
        r#"{{"access_key_id":"AKIAUNKNOWN000000000","secret_access_key":"{}"}}"#,
        server.secret_key
    );
    let destination =
        Destination::new(&s3_config(&server, "media", ""), Some(json.as_bytes())).unwrap();
    let probe = destination.probe().await.unwrap_err();
    assert_eq!(probe.step, ProbeStep::Auth, "{probe}");
    assert!(!probe.message.contains(&server.secret_key));

    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "who.mp4", 10, 7);
    let err = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert_error_has_no_secret(&err, &server.secret_key);
}

#[tokio::test]
async fn missing_bucket_is_permanent_and_not_created() {
    let server = S3Server::start().await;
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "nobucket.mp4", 1000, 8);
    let destination = s3_destination(&server, "no-such-bucket", S3Options::default());

    let err = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert_eq!(err.probe_step(), ProbeStep::Bucket);
    assert_eq!(err.provider_code(), Some("NoSuchBucket"));
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
    // s3s-fs would create the bucket on PUT; the HeadBucket check prevents that.
    assert!(!server.root().join("no-such-bucket").exists());
    assert!(server.requests_of("PutObject").is_empty());
    assert_error_has_no_secret(&err, &server.secret_key);
}

#[tokio::test]
async fn access_denied_is_permanent_permission_error() {
    let mut deny = std::collections::HashSet::new();
    deny.insert("PutObject");
    let server = S3Server::start_with(S3ServerOptions {
        deny,
        ..S3ServerOptions::default()
    })
    .await;
    server.create_bucket("media");
    let work = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "denied.mp4", 1000, 9);
    let destination = s3_destination(&server, "media", S3Options::default());
    let err = destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert_eq!(err.provider_code(), Some("AccessDenied"));
    assert!(err.is_permanent());
    assert_eq!(err.probe_step(), ProbeStep::Permission);
}

#[tokio::test]
async fn probe_passes_and_names_the_failing_step() {
    let server = S3Server::start().await;
    server.create_bucket("media");
    let good = s3_destination(&server, "media", S3Options::default());
    good.probe().await.unwrap();
    // The probe object was written (with a CRC-32) and deleted again.
    let put = &server.requests_of("PutObject")[0];
    assert!(put.header("x-amz-checksum-crc32").is_some());
    assert_eq!(server.requests_of("DeleteObject").len(), 1);
    let left: Vec<_> = walk(&server.root().join("media"));
    assert!(left.is_empty(), "{left:?}");

    // No bucket.
    let err = s3_destination(&server, "absent", S3Options::default())
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.step, ProbeStep::Bucket, "{err}");

    let fast = S3Options {
        max_attempts: 1,
        connect_timeout: std::time::Duration::from_secs(3),
        ..S3Options::default()
    };
    let with_endpoint = |endpoint: String| {
        let config = DestinationConfig {
            endpoint,
            ..s3_config(&server, "media", "")
        };
        Destination::with_options(
            &config,
            Some(server.credential_json().as_bytes()),
            fast.clone(),
            &FsAllowedRoots::default(),
        )
        .unwrap()
    };

    // Nothing listening on the port.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let err = with_endpoint(format!("http://127.0.0.1:{port}"))
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.step, ProbeStep::Connect, "{err}");

    // A name that cannot resolve (RFC 6761 reserves .invalid).
    let err = with_endpoint("http://recvault-probe.invalid:9000".into())
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.step, ProbeStep::Dns, "{err}");

    // https:// to a plain-HTTP server: the TLS handshake fails.
    let err = with_endpoint(format!("https://127.0.0.1:{}", server.port))
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.step, ProbeStep::Tls, "{err}");

    // Can write but not delete.
    let mut deny = std::collections::HashSet::new();
    deny.insert("DeleteObject");
    let strict = S3Server::start_with(S3ServerOptions {
        deny,
        ..S3ServerOptions::default()
    })
    .await;
    strict.create_bucket("media");
    let err = s3_destination(&strict, "media", S3Options::default())
        .probe()
        .await
        .unwrap_err();
    assert_eq!(err.step, ProbeStep::Permission, "{err}");
    assert!(err.message.contains("DeleteObject"), "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

fn fs_config(dir: &Path, prefix: &str) -> DestinationConfig {
    DestinationConfig {
        provider: Provider::Fs,
        endpoint: String::new(),
        region: String::new(),
        bucket: dir.display().to_string(),
        prefix: prefix.into(),
        path_style: false,
    }
}

/// A local-directory destination on `dir` with `root` as the only allowed root.
fn fs_destination(dir: &Path, prefix: &str, root: &Path) -> Result<Destination, DeliveryError> {
    Destination::with_options(
        &fs_config(dir, prefix),
        None,
        S3Options::default(),
        &FsAllowedRoots::new([root.to_owned()]),
    )
}

#[tokio::test]
async fn fs_destination_delivers_and_verifies_by_read_back() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "local call.mp4", 5 * MIB + 3, 10);
    // A leading slash (stored before PutDestination refused it) is normalised away.
    let destination = fs_destination(out.path(), "/tenant-a//2024/", out.path()).unwrap();
    destination.probe().await.unwrap();

    let seen = Mutex::new(0u64);
    let progress = |n: u64| *seen.lock().unwrap() = n;
    let hooks = DeliveryHooks {
        progress: &progress,
        ..DeliveryHooks::default()
    };
    let delivery = destination
        .deliver(file(&source).await, &info, &hooks)
        .await
        .unwrap();
    assert_eq!(delivery.verified_by, VerifiedBy::ReadBack);
    assert_eq!(delivery.key, "tenant-a/2024/local call.mp4");
    assert_eq!(*seen.lock().unwrap(), info.size);
    let dir = out.path().join("tenant-a/2024");
    assert_eq!(sha256_file(&dir.join("local call.mp4")), info.sha256);
    assert!(sha256sum_check(&dir, "local call.mp4.sha256"));
    // Only the recording and its sidecar: no temporary or probe files left.
    let mut names: Vec<_> = walk(out.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["local call.mp4", "local call.mp4.sha256"]);

    // Delivering again (a retry) replaces the files and still verifies.
    destination
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn fs_destination_refuses_escapes_and_corrupt_sources() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (source, info) = recording(work.path(), "x.mp4", 1000, 11);

    let err = fs_destination(out.path(), "../outside", out.path()).unwrap_err();
    assert!(err.is_permanent(), "{err}");
    let dest = fs_destination(out.path(), "", out.path()).unwrap();
    let bad_name = ObjectInfo {
        name: "../x.mp4".into(),
        ..info.clone()
    };
    let err = dest
        .deliver(file(&source).await, &bad_name, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");

    // A prefix that is a symlink out of the directory.
    let elsewhere = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), out.path().join("link")).unwrap();
    let dest = fs_destination(out.path(), "link", out.path()).unwrap();
    let err = dest
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("outside"), "{err}");
    assert_eq!(std::fs::read_dir(elsewhere.path()).unwrap().count(), 0);

    // The backup no longer matches its recorded SHA-256: nothing lands.
    let dest = fs_destination(out.path(), "ok", out.path()).unwrap();
    let wrong = ObjectInfo {
        sha256: [0; 32],
        ..info.clone()
    };
    let err = dest
        .deliver(file(&source).await, &wrong, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            DeliveryError::SourceMismatch {
                what: "SHA-256",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert!(walk(&out.path().join("ok")).is_empty());

    // The directory itself is missing.
    let gone = fs_destination(&out.path().join("missing"), "", out.path()).unwrap();
    let err = gone
        .deliver(file(&source).await, &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.probe_step(), ProbeStep::Bucket);
    assert_eq!(gone.probe().await.unwrap_err().step, ProbeStep::Bucket);
}

/// The same for a directory: the copy fails 2 MiB in, and neither the
/// recording, its sidecar nor a temporary file is left.
#[tokio::test]
async fn fs_backup_failing_authentication_leaves_no_file() {
    let work = tempfile::tempdir().unwrap();
    let out = tempfile::tempdir().unwrap();
    let (path, info) = recording(work.path(), "tampered.mp4", 5 * MIB + 3, 25);
    let source = Arc::new(UnauthenticSource::new(
        FileSource::open(&path).await.unwrap(),
        2 * MIB + 1,
        0,
    ));
    let destination = fs_destination(out.path(), "t", out.path()).unwrap();
    let err = destination
        .deliver(source.clone(), &info, &DeliveryHooks::default())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DeliveryError::BackupCorrupt { detail } if detail.contains(UNAUTHENTIC)),
        "{err:?}"
    );
    assert!(err.is_permanent());
    assert_eq!(walk(out.path()), Vec::<PathBuf>::new());
    assert_eq!(source.opened_over_failure(), 1);
}

/// The allowed roots are checked when something is written, not only when
/// the destination was stored: a destination outside every root, one whose
/// directory became a symlink out of the root, and one built while no root
/// is configured all fail permanently (step "bucket") and write nothing.
/// A symlink planted at the final name is replaced, never followed.
#[tokio::test]
async fn fs_destination_writes_only_inside_an_allowed_root() {
    let work = tempfile::tempdir().unwrap();
    let root = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let (path, info) = recording(work.path(), "call.mp4", 4000, 12);
    let source = file(&path).await;
    let hooks = DeliveryHooks::default();

    let err = Destination::new(&fs_config(root.path(), ""), None).unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(
        err.to_string().contains("[destinations].fs_allowed_roots"),
        "{err}"
    );

    let elsewhere = fs_destination(outside.path(), "", root.path()).unwrap();
    let err = elsewhere
        .deliver(source.clone(), &info, &hooks)
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert_eq!(err.probe_step(), ProbeStep::Bucket);
    assert!(
        err.to_string().contains("not inside an allowed root")
            && err.to_string().contains("[destinations].fs_allowed_roots"),
        "{err}"
    );
    assert_eq!(elsewhere.probe().await.unwrap_err().step, ProbeStep::Bucket);
    assert!(walk(outside.path()).is_empty());

    // Inside: delivered. A symlink at the final names is replaced, not followed.
    let dir = root.path().join("acme");
    std::fs::create_dir_all(dir.join("p")).unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, b"keep").unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("p/call.mp4")).unwrap();
    std::os::unix::fs::symlink(&victim, dir.join("p/call.mp4.sha256")).unwrap();
    let inside = fs_destination(&dir, "p", root.path()).unwrap();
    inside.probe().await.unwrap();
    inside.deliver(source.clone(), &info, &hooks).await.unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep");
    assert!(
        !std::fs::symlink_metadata(dir.join("p/call.mp4"))
            .unwrap()
            .is_symlink()
    );
    assert_eq!(sha256_file(&dir.join("p/call.mp4")), info.sha256);

    // The same destination under another config (the roots changed).
    let moved = fs_destination(&dir, "p", outside.path()).unwrap();
    let err = moved
        .deliver(source.clone(), &info, &hooks)
        .await
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("not inside"),
        "{err}"
    );

    // The directory swapped for a symlink out of the root.
    std::fs::remove_dir_all(&dir).unwrap();
    std::os::unix::fs::symlink(outside.path(), &dir).unwrap();
    let err = inside
        .deliver(source.clone(), &info, &hooks)
        .await
        .unwrap_err();
    assert!(err.is_permanent(), "{err}");
    assert!(err.to_string().contains("it resolves to"), "{err}");
    assert_eq!(inside.probe().await.unwrap_err().step, ProbeStep::Bucket);
    assert_eq!(walk(outside.path()), std::slice::from_ref(&victim));

    // A name whose sidecar would not fit a directory entry: refused before
    // anything is written, and permanently.
    let dir = root.path().join("long");
    std::fs::create_dir_all(&dir).unwrap();
    let long = ObjectInfo {
        name: "n".repeat(250),
        ..info.clone()
    };
    let err = fs_destination(&dir, "", root.path())
        .unwrap()
        .deliver(source.clone(), &long, &hooks)
        .await
        .unwrap_err();
    assert!(
        err.is_permanent() && err.to_string().contains("at most 255 bytes"),
        "{err}"
    );
    assert!(walk(&dir).is_empty());
}

#[test]
fn credential_errors_name_the_field_and_never_the_value() {
    let secret = "verySECRETvalue/123";
    let cases: [(String, &str); 5] = [
        (
            r#"{"access_key_id":"AKIAABCDEFGHIJKL1234"}"#.to_owned(),
            "secret_access_key",
        ),
        (
            format!(r#"{{"secret_access_key":"{secret}"}}"#),
            "access_key_id",
        ),
        (
            format!(
                r#"{{"access_key_id":"AKIAABCDEFGHIJKL1234","secret_access_key":"{secret}\n"}}"#
            ),
            "secret_access_key",
        ),
        (
            format!(
                r#"{{"access_key_id":"AKIAABCDEFGHIJKL1234","secret_access_key":"{secret}","session_token":42}}"#
            ),
            "session_token",
        ),
        (
            format!(
                r#"{{"access_key_id":"AKIAABCDEFGHIJKL1234","secret_access_key":"{secret}","access_key_id":"x"}}"#
            ),
            "access_key_id",
        ),
    ];
    for (json, field) in cases {
        let err = S3Credential::from_json(json.as_bytes()).unwrap_err();
        let shown = err.to_string();
        assert!(shown.contains(field), "{shown}");
        assert!(
            !shown.contains(secret) && !format!("{err:?}").contains(secret),
            "{shown}"
        );
    }
    // Syntax errors give a position, not the text around it.
    let err = S3Credential::from_json(format!(r#"{{"secret_access_key":"{secret}" "#).as_bytes())
        .unwrap_err();
    assert!(matches!(err, CredentialError::Malformed { .. }), "{err:?}");
    assert!(!err.to_string().contains(secret));
    let err = S3Credential::from_json(b"[1,2]").unwrap_err();
    assert_eq!(err, CredentialError::NotAnObject);

    // Debug shows a masked key id and nothing secret.
    let ok = S3Credential::from_json(
        format!(r#"{{"access_key_id":"AKIAABCDEFGHIJKL1234","secret_access_key":"{secret}","session_token":"TOKENtoken"}}"#).as_bytes(),
    )
    .unwrap();
    let shown = format!("{ok:?}");
    assert!(shown.contains("AKIA…1234"), "{shown}");
    assert!(
        !shown.contains(secret) && !shown.contains("TOKENtoken") && !shown.contains("ABCDEFGHIJKL"),
        "{shown}"
    );

    // Through the destination constructor: a permanent credential error.
    let config = DestinationConfig {
        provider: Provider::S3,
        endpoint: "http://127.0.0.1:9".into(),
        region: String::new(),
        bucket: "media".into(),
        prefix: String::new(),
        path_style: true,
    };
    let err = Destination::new(
        &config,
        Some(format!(r#"{{"secret_access_key":"{secret}"}}"#).as_bytes()),
    )
    .unwrap_err();
    assert!(err.is_permanent());
    assert_eq!(err.probe_step(), ProbeStep::Auth);
    assert!(err.to_string().contains("access_key_id"), "{err}");
    assert_error_has_no_secret(&err, secret);
    let err = Destination::new(&config, None).unwrap_err();
    assert!(err.is_permanent());
}

#[tokio::test]
async fn delivery_futures_are_send() {
    fn assert_send<T: Send>(_: &T) {}
    let work = tempfile::tempdir().unwrap();
    let (source, _) = recording(work.path(), "a", 0, 0);
    let source = file(&source).await;
    let nowhere = Path::new("/nonexistent");
    let destination = fs_destination(nowhere, "", nowhere).unwrap();
    let info = ObjectInfo {
        name: "a".into(),
        size: 0,
        sha256: [0; 32],
        crc32: 0,
        content_type: String::new(),
    };
    let hooks = DeliveryHooks::default();
    assert_send(&destination.deliver(source, &info, &hooks));
    assert_send(&destination.probe());
    assert_send(&destination.abort_multipart("k", "u"));
}
