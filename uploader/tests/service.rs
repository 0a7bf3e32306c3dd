//! The uploader's gRPC services as a recorder and a manager see them, over
//! real mTLS, with the real worker delivering: recordings never overwrite
//! each other at a destination (ingest, resend, attempts), and a multipart
//! upload a failed delivery leaves behind never blocks a resend. The vault is
//! a stand-in Leases service (the real one is another crate) that hands out
//! the in-process S3 server's credential.
#![allow(clippy::unwrap_used)]

#[path = "support/s3.rs"]
mod s3_server;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use recvault_proto::uploader::v1 as up;
use recvault_proto::uploader::v1::{
    destinations_client::DestinationsClient, jobs_client::JobsClient,
    recordings_client::RecordingsClient, upload_request::Part,
};
use recvault_proto::vault::v1 as vault;
use recvault_runtime::{devcerts, tls};
use recvault_uploader::config::UploaderConfig;
use recvault_uploader::jobs::{JobFilter, JobId};
use recvault_uploader::service::Shared;
use sha2::Digest as _;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status};

const TENANT: &str = "acme";
const MIB: usize = 1024 * 1024;

/// A vault that leases whatever secret a test stored for a credential id.
#[derive(Clone, Default)]
struct StandInVault {
    secrets: Arc<Mutex<HashMap<String, Vec<u8>>>>,
}

#[tonic::async_trait]
impl vault::leases_server::Leases for StandInVault {
    async fn acquire_lease(
        &self,
        request: Request<vault::AcquireLeaseRequest>,
    ) -> Result<Response<vault::AcquireLeaseResponse>, Status> {
        let id = request.into_inner().credential_id;
        let secret = self.secrets.lock().unwrap().get(&id).cloned();
        let secret = secret.ok_or_else(|| Status::not_found(format!("credential {id}")))?;
        Ok(Response::new(vault::AcquireLeaseResponse {
            lease_id: format!("lease-{}", uuid::Uuid::new_v4().simple()),
            secret,
            ..Default::default()
        }))
    }

    async fn release_lease(
        &self,
        request: Request<vault::ReleaseLeaseRequest>,
    ) -> Result<Response<vault::ReleaseLeaseResponse>, Status> {
        Ok(Response::new(vault::ReleaseLeaseResponse {
            lease_id: request.into_inner().lease_id,
        }))
    }
}

/// uploaderd's server (gRPC, worker) on free ports, a stand-in vault, and
/// clients for the recorder and the manager.
struct Rig {
    dir: tempfile::TempDir,
    certs: PathBuf,
    addr: SocketAddr,
    shared: Arc<Shared>,
    vault: StandInVault,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        devcerts::generate(&certs, &["uploader", "recorder", "manager", "vault"]).unwrap();

        let vault = StandInVault::default();
        let vault_tls = tls::ReloadingServerTls::load(devcerts::files(&certs, "vault")).unwrap();
        let (listener, vault_addr) = tls::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let leases = vault::leases_server::LeasesServer::new(vault.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(leases)
                .serve_with_incoming(tls::incoming(listener, vault_tls)),
        );

        let cert = |n: &str| certs.join(n).display().to_string();
        let config_path = dir.path().join("uploader.toml");
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n\
                 database = \"{db}\"\n\
                 backup_dir = \"{backups}\"\n\
                 ingest_idle_timeout_secs = 20\n\n\
                 [tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [vault]\nendpoint = \"{vault_addr}\"\n\n\
                 [vault.tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [access]\nrecorder = [\"{recorder}\"]\nmanager = [\"{manager}\"]\n\n\
                 [delivery]\nworkers = 2\nmax_attempts = 2\nretry_base_ms = 10\n\
                 retry_max_secs = 1\nscrub_interval_secs = 0\n\
                 multipart_threshold_bytes = {MIB}\npart_size_bytes = {part}\n",
                db = dir.path().join("uploader.db").display(),
                backups = dir.path().join("backups").display(),
                crt = cert("uploader.crt"),
                key = cert("uploader.key"),
                ca = cert("ca.crt"),
                recorder = devcerts::spiffe_id("recorder"),
                manager = devcerts::spiffe_id("manager"),
                part = 5 * MIB,
            ),
        )
        .unwrap();
        let config = UploaderConfig::load(&config_path).unwrap();
        let bound = recvault_uploader::server::bind(config).await.unwrap();
        let addr = bound.local_addr;
        let shared = bound.shared.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            bound
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .unwrap();
        });
        Self {
            dir,
            certs,
            addr,
            shared,
            vault,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn channel(&self, identity: &str) -> Channel {
        tls::channel(
            &self.addr.to_string(),
            "localhost",
            &devcerts::files(&self.certs, identity),
        )
        .unwrap()
    }

    fn recorder(&self) -> RecordingsClient<Channel> {
        RecordingsClient::new(self.channel("recorder"))
    }

    fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel("manager"))
    }

    fn backup_dir(&self) -> PathBuf {
        self.dir.path().join("backups")
    }

    /// A local-directory destination named `name` (PutDestination with an
    /// existing name replaces its settings and keeps its id).
    async fn put_fs_destination(&self, name: &str, directory: &Path, prefix: &str) -> String {
        self.put_destination(up::PutDestinationRequest {
            tenant_id: TENANT.into(),
            name: name.into(),
            provider: "fs".into(),
            bucket: directory.display().to_string(),
            prefix: prefix.into(),
            ..Default::default()
        })
        .await
    }

    /// An S3 destination on `server`'s `bucket`, with its credential in the vault.
    async fn put_s3_destination(&self, name: &str, server: &s3_server::S3Server) -> String {
        let credential_id = format!("cred-{name}");
        self.vault
            .secrets
            .lock()
            .unwrap()
            .insert(credential_id.clone(), server.credential_json().into_bytes());
        self.put_destination(up::PutDestinationRequest {
            tenant_id: TENANT.into(),
            name: name.into(),
            provider: "s3".into(),
            endpoint: server.endpoint.clone(),
            region: "us-east-1".into(),
            bucket: "media".into(),
            path_style: true,
            credential_id,
            ..Default::default()
        })
        .await
    }

    async fn put_destination(&self, request: up::PutDestinationRequest) -> String {
        DestinationsClient::new(self.channel("manager"))
            .put_destination(request)
            .await
            .unwrap()
            .into_inner()
            .destination_id
    }

    /// One whole Upload call.
    async fn upload(
        &self,
        destination_id: &str,
        recording_id: &str,
        file_name: &str,
        data: &[u8],
    ) -> Result<up::UploadResponse, Status> {
        let mut messages = vec![header(destination_id, recording_id, file_name)];
        messages.extend(data.chunks(256 * 1024).map(chunk));
        messages.push(trailer(data));
        let mut client = self.recorder();
        let call = client.upload(tokio_stream::iter(messages));
        tokio::time::timeout(Duration::from_secs(30), call)
            .await
            .expect("Upload answers within 30 s")
            .map(Response::into_inner)
    }

    async fn job(&self, job_id: &str) -> up::Job {
        self.jobs()
            .get_job(up::GetJobRequest {
                job_id: job_id.into(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// Polls until the job is in `state` (panics with the job after 30 s).
    async fn wait_state(&self, job_id: &str, state: up::JobState) -> up::Job {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job = self.job(job_id).await;
            if job.state == state as i32 {
                return job;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "job never reached {state:?}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn job_count(&self) -> usize {
        self.shared
            .jobs
            .list(JobFilter::default())
            .await
            .unwrap()
            .len()
    }

    async fn stored_job(&self, job_id: &str) -> recvault_uploader::jobs::Job {
        self.shared
            .jobs
            .get(JobId::parse(job_id).unwrap())
            .await
            .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}

fn header(destination_id: &str, recording_id: &str, file_name: &str) -> up::UploadRequest {
    up::UploadRequest {
        part: Some(Part::Header(up::UploadHeader {
            tenant_id: TENANT.into(),
            recording_id: recording_id.into(),
            file_name: file_name.into(),
            content_type: "video/mp4".into(),
            destination_id: destination_id.into(),
        })),
    }
}

fn chunk(data: &[u8]) -> up::UploadRequest {
    up::UploadRequest {
        part: Some(Part::Chunk(up::Chunk {
            data: data.to_vec(),
            crc32: crc32fast::hash(data),
        })),
    }
}

fn trailer(data: &[u8]) -> up::UploadRequest {
    up::UploadRequest {
        part: Some(Part::Trailer(up::UploadTrailer {
            sha256: sha2::Sha256::digest(data).to_vec(),
        })),
    }
}

fn bytes(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Every file under `dir` (none when it does not exist).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out
}

fn assert_names(status: &Status, parts: &[&str]) {
    for part in parts {
        assert!(
            status.message().contains(part),
            "the message should name {part:?}: {}",
            status.message()
        );
    }
}

/// A recording whose file name another recording (here already DELIVERED,
/// its backup deleted) uses at the destination is refused right after its
/// header: ALREADY_EXISTS naming the file name, the other recording and its
/// job, and what to do. The stream is still open when the answer comes, so
/// no byte was taken; no job, no backup or staging file is left, and the
/// delivered recording is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_recording_with_the_same_file_name_is_refused_before_any_byte() {
    let rig = Rig::start().await;
    let target = rig.dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "calls").await;
    let first_data = bytes(300_000, 1);
    let first = rig
        .upload(&destination, "rec-1", "call.mp4", &first_data)
        .await
        .unwrap();
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;
    let delivered = target.join("calls/call.mp4");
    assert_eq!(std::fs::read(&delivered).unwrap(), first_data);
    let backups_before = files_under(&rig.backup_dir());

    // Only the header; the sender stays open, so the stream does too.
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(&destination, "rec-2", "call.mp4"))
        .await
        .unwrap();
    let mut client = rig.recorder();
    let call = client.upload(tokio_stream::wrappers::ReceiverStream::new(rx));
    let status = tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .expect("refused without waiting for the stream")
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_names(
        &status,
        &[
            "\"call.mp4\"",
            "rec-1",
            &first.job_id,
            "rec-2",
            "unique",
            "recording id",
            "Nothing was stored",
        ],
    );
    drop(tx);

    // The whole recording sent the same way is refused the same way.
    let status = rig
        .upload(&destination, "rec-2", "call.mp4", &bytes(200_000, 2))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");

    assert_eq!(rig.job_count().await, 1);
    assert_eq!(files_under(&rig.backup_dir()), backups_before);
    assert_eq!(std::fs::read(&delivered).unwrap(), first_data);
    // Both refusals are counted, and exported.
    assert_eq!(rig.shared.metrics.ingest_rejected.get(), 2);
    assert_eq!(rig.shared.metrics.ingested.get(), 1);
    let exported = rig.shared.metrics.registry.render();
    assert!(
        exported
            .lines()
            .any(|l| l == "recvault_uploader_ingest_rejected_total 2"),
        "{exported}"
    );
}

/// The same recording id sent again with the same bytes is still the same
/// job (duplicate = true), also once that job holds the name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_recording_id_again_is_still_idempotent() {
    let rig = Rig::start().await;
    let target = rig.dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "").await;
    let data = bytes(100_000, 3);
    let first = rig
        .upload(&destination, "rec-1", "call.mp4", &data)
        .await
        .unwrap();
    assert!(!first.duplicate);
    let again = rig
        .upload(&destination, "rec-1", "call.mp4", &data)
        .await
        .unwrap();
    assert!(again.duplicate);
    assert_eq!(again.job_id, first.job_id);
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;
    let after_delivery = rig
        .upload(&destination, "rec-1", "call.mp4", &data)
        .await
        .unwrap();
    assert!(after_delivery.duplicate);
    assert_eq!(after_delivery.job_id, first.job_id);
    assert_eq!(rig.job_count().await, 1);
}

/// What is compared is the key the destination writes: after the
/// destination's prefix changed from "rec" to "/rec//" (the same key
/// prefix once normalised) the name is still taken; under "other" it is free.
/// The checksum sidecar counts too: "a.mp4.sha256" would overwrite the
/// sidecar of "a.mp4", and "b.mp4"'s sidecar would overwrite "b.mp4.sha256".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_compared_as_object_keys() {
    let rig = Rig::start().await;
    let target = rig.dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "rec").await;
    let first = rig
        .upload(&destination, "rec-1", "x.mp4", &bytes(1000, 1))
        .await
        .unwrap();

    let same = rig.put_fs_destination("local", &target, "/rec//").await;
    assert_eq!(same, destination);
    let status = rig
        .upload(&destination, "rec-2", "x.mp4", &bytes(1000, 2))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_names(&status, &["\"rec/x.mp4\"", "rec-1", &first.job_id]);

    rig.put_fs_destination("local", &target, "other").await;
    rig.upload(&destination, "rec-3", "x.mp4", &bytes(1000, 3))
        .await
        .unwrap();

    // Sidecars, both ways.
    rig.upload(&destination, "rec-4", "a.mp4", &bytes(1000, 4))
        .await
        .unwrap();
    let status = rig
        .upload(&destination, "rec-5", "a.mp4.sha256", &bytes(1000, 5))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_names(&status, &["sidecar", "rec-4"]);
    rig.upload(&destination, "rec-6", "b.mp4.sha256", &bytes(1000, 6))
        .await
        .unwrap();
    let status = rig
        .upload(&destination, "rec-7", "b.mp4", &bytes(1000, 7))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_names(&status, &["sidecar", "rec-6"]);
    assert_eq!(rig.job_count().await, 4);
}

/// ResendJob to a destination where another recording holds the name is
/// FAILED_PRECONDITION (the job exists and nothing is created by the call;
/// what stands in the way is the target, and the fix is another
/// destination), naming the other recording; the job stays where it was.
/// To a destination where the name is free it is resent and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resend_to_a_destination_where_the_name_is_taken_is_refused() {
    let rig = Rig::start().await;
    let good = rig.dir.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    let taken = rig.put_fs_destination("good", &good, "").await;
    let broken = rig
        .put_fs_destination("broken", &rig.dir.path().join("missing"), "")
        .await;
    let first_data = bytes(5000, 1);
    let first = rig
        .upload(&taken, "rec-1", "call.mp4", &first_data)
        .await
        .unwrap();
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;
    // The same name at another destination is fine; that one cannot deliver.
    let second = rig
        .upload(&broken, "rec-2", "call.mp4", &bytes(5000, 2))
        .await
        .unwrap();
    rig.wait_state(&second.job_id, up::JobState::Retained).await;

    let status = rig
        .jobs()
        .resend_job(up::ResendJobRequest {
            job_id: second.job_id.clone(),
            destination_id: taken.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_names(&status, &[&second.job_id, "rec-1", &first.job_id, &taken]);
    let job = rig.job(&second.job_id).await;
    assert_eq!(job.state, up::JobState::Retained as i32);
    assert_eq!(job.destination_id, broken);
    assert_eq!(std::fs::read(good.join("call.mp4")).unwrap(), first_data);

    let free_dir = rig.dir.path().join("free");
    std::fs::create_dir_all(&free_dir).unwrap();
    let free = rig.put_fs_destination("free", &free_dir, "").await;
    rig.jobs()
        .resend_job(up::ResendJobRequest {
            job_id: second.job_id.clone(),
            destination_id: free,
        })
        .await
        .unwrap();
    rig.wait_state(&second.job_id, up::JobState::Delivered)
        .await;
    assert_eq!(std::fs::read(good.join("call.mp4")).unwrap(), first_data);
}

/// Two uploads with the same name race: both send their header and a chunk
/// (so both passed the check at the header, and both are writing a staging
/// file) before either sends its trailer. Exactly one gets a job; the other
/// gets ALREADY_EXISTS from the check in the transaction that inserts, and
/// its bytes are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_with_the_same_name_do_not_both_pass() {
    let rig = Rig::start().await;
    let target = rig.dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "").await;
    let staging = rig.backup_dir().join("staging");

    let mut senders = Vec::new();
    let mut calls = Vec::new();
    let mut datas = Vec::new();
    for (i, recording) in ["rec-a", "rec-b"].into_iter().enumerate() {
        let data = bytes(64 * 1024, i as u8);
        let (tx, rx) = mpsc::channel(4);
        tx.send(header(&destination, recording, "same.mp4"))
            .await
            .unwrap();
        tx.send(chunk(&data)).await.unwrap();
        let mut client = rig.recorder();
        calls.push(tokio::spawn(async move {
            client
                .upload(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        }));
        senders.push(tx);
        datas.push(data);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while files_under(&staging).len() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "both uploads should be past the header: {:?}",
            files_under(&staging)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (tx, data) in senders.into_iter().zip(&datas) {
        tx.send(trailer(data)).await.unwrap();
    }
    let mut results = Vec::new();
    for call in calls {
        results.push(call.await.unwrap());
    }
    let (ok, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!(ok.len(), 1, "exactly one upload passes: {ok:?} {refused:?}");
    let winner = ok.into_iter().next().unwrap().unwrap().into_inner();
    let status = refused.into_iter().next().unwrap().unwrap_err();
    assert_eq!(status.code(), Code::AlreadyExists, "{status:?}");
    assert_names(&status, &["\"same.mp4\"", &winner.job_id]);
    assert_eq!(rig.job_count().await, 1);
    assert_eq!(rig.shared.metrics.ingest_rejected.get(), 1);
    assert!(files_under(&staging).is_empty());
    // The loser's backup is gone; the winner's is there until delivered.
    let backups: Vec<_> = files_under(&rig.backup_dir())
        .into_iter()
        .filter(|p| !p.starts_with(&staging))
        .collect();
    assert!(
        backups.len() <= 1
            && backups
                .iter()
                .all(|p| p.to_string_lossy().contains(&winner.job_id)),
        "{backups:?}"
    );
}

/// A job whose destination's prefix changed after ingest, so that its key
/// now is another recording's, is not delivered: the attempt refuses to
/// register the key and the job is RETAINED naming the other recording,
/// whose delivered file is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_never_writes_a_key_another_recording_holds() {
    let rig = Rig::start().await;
    let good = rig.dir.path().join("good");
    std::fs::create_dir_all(&good).unwrap();
    let destination = rig.put_fs_destination("d", &good, "a").await;
    let first_data = bytes(5000, 1);
    let first = rig
        .upload(&destination, "rec-1", "x.mp4", &first_data)
        .await
        .unwrap();
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;

    // Prefix "b" (key b/x.mp4 is free) on a directory that does not exist:
    // the second recording is accepted and RETAINED.
    rig.put_fs_destination("d", &rig.dir.path().join("missing"), "b")
        .await;
    let second = rig
        .upload(&destination, "rec-2", "x.mp4", &bytes(5000, 2))
        .await
        .unwrap();
    rig.wait_state(&second.job_id, up::JobState::Retained).await;
    assert_eq!(
        rig.stored_job(&second.job_id).await.object_key.as_deref(),
        Some("b/x.mp4")
    );

    // Back to the first settings, and resend: its key would be a/x.mp4.
    rig.put_fs_destination("d", &good, "a").await;
    rig.jobs()
        .resend_job(up::ResendJobRequest {
            job_id: second.job_id.clone(),
            destination_id: String::new(),
        })
        .await
        .unwrap();
    let job = rig.wait_state(&second.job_id, up::JobState::Retained).await;
    assert!(
        job.last_error.contains("rec-1") && job.last_error.contains("\"a/x.mp4\""),
        "{job:?}"
    );
    assert_eq!(job.attempts, 1);
    assert_eq!(std::fs::read(good.join("a/x.mp4")).unwrap(), first_data);
    assert_eq!(
        rig.stored_job(&second.job_id).await.object_key.as_deref(),
        Some("b/x.mp4")
    );
}

/// A multipart delivery to S3 that fails permanently mid-way (the provider
/// refuses the parts: AccessDenied) is RETAINED; its upload was aborted, so
/// the job no longer records it, and a resend to another destination is
/// accepted and delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_multipart_upload_is_forgotten_and_resend_elsewhere_works() {
    let rig = Rig::start().await;
    let s3 = s3_server::S3Server::start_with(s3_server::S3ServerOptions {
        deny: ["UploadPart"].into(),
        ..Default::default()
    })
    .await;
    s3.create_bucket("media");
    let destination = rig.put_s3_destination("s3", &s3).await;
    let data = bytes(6 * MIB, 9);
    let reply = rig
        .upload(&destination, "rec-1", "long.mp4", &data)
        .await
        .unwrap();
    let job = rig.wait_state(&reply.job_id, up::JobState::Retained).await;
    assert!(job.last_error.contains("AccessDenied"), "{job:?}");
    assert_eq!(s3.requests_of("CreateMultipartUpload").len(), 1);
    let aborted = s3.requests_of("AbortMultipartUpload");
    assert_eq!(aborted.len(), 1);
    let upload_id = aborted[0].query_param("uploadId").unwrap().to_owned();
    assert!(!s3.upload_in_progress(&upload_id));
    assert_eq!(
        rig.stored_job(&reply.job_id).await.multipart_upload_id,
        None
    );

    let elsewhere = rig.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let fs = rig.put_fs_destination("fs", &elsewhere, "").await;
    rig.jobs()
        .resend_job(up::ResendJobRequest {
            job_id: reply.job_id.clone(),
            destination_id: fs,
        })
        .await
        .unwrap();
    rig.wait_state(&reply.job_id, up::JobState::Delivered).await;
    assert!(std::fs::read(elsewhere.join("long.mp4")).unwrap() == data);
}

/// When the abort itself is refused, the upload may still exist: the job
/// keeps its id (RETAINED). ResendJob to a destination where the name is
/// taken is refused without touching the upload. ResendJob to another
/// destination first aborts it at the original destination with that
/// destination's credential. While the abort fails transiently (503), the
/// resend is UNAVAILABLE naming the upload and the id stays; once the abort
/// works the resend goes through, the upload is gone and the recording is
/// delivered elsewhere. While the abort is denied (permanent: the customer
/// revoked access), refusing would leave the job stuck forever: the resend
/// goes through, the id is given up with a history line naming the upload
/// and the bucket, and the upload is left to the bucket's lifecycle rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_that_could_not_be_aborted_is_aborted_by_the_resend() {
    let rig = Rig::start().await;
    let s3 = s3_server::S3Server::start_with(s3_server::S3ServerOptions {
        deny: ["UploadPart", "AbortMultipartUpload"].into(),
        ..Default::default()
    })
    .await;
    s3.create_bucket("media");
    let destination = rig.put_s3_destination("s3", &s3).await;
    let data = bytes(6 * MIB, 10);
    let reply = rig
        .upload(&destination, "rec-1", "long.mp4", &data)
        .await
        .unwrap();
    rig.wait_state(&reply.job_id, up::JobState::Retained).await;
    let revoked_data = bytes(6 * MIB, 11);
    let revoked = rig
        .upload(&destination, "rec-2", "revoked.mp4", &revoked_data)
        .await
        .unwrap();
    rig.wait_state(&revoked.job_id, up::JobState::Retained)
        .await;
    let created = s3.requests_of("CreateMultipartUpload");
    assert_eq!(created.len(), 2);
    let upload_id = rig
        .stored_job(&reply.job_id)
        .await
        .multipart_upload_id
        .expect("an upload whose abort failed is kept");
    assert!(s3.upload_in_progress(&upload_id));
    let revoked_upload_id = rig
        .stored_job(&revoked.job_id)
        .await
        .multipart_upload_id
        .expect("an upload whose abort failed is kept");
    assert!(s3.upload_in_progress(&revoked_upload_id));

    // Where another recording holds the name, the resend is refused before
    // the upload is touched.
    let taken_dir = rig.dir.path().join("taken");
    std::fs::create_dir_all(&taken_dir).unwrap();
    let taken = rig.put_fs_destination("taken", &taken_dir, "").await;
    rig.upload(&taken, "rec-0", "long.mp4", &bytes(100, 1))
        .await
        .unwrap();
    let aborts = s3.requests_of("AbortMultipartUpload").len();
    let status = rig
        .jobs()
        .resend_job(up::ResendJobRequest {
            job_id: reply.job_id.clone(),
            destination_id: taken,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_names(&status, &["rec-0"]);
    assert_eq!(s3.requests_of("AbortMultipartUpload").len(), aborts);

    let elsewhere = rig.dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    let fs = rig.put_fs_destination("fs", &elsewhere, "").await;
    let resend = |job_id: &str| {
        let mut jobs = rig.jobs();
        let request = up::ResendJobRequest {
            job_id: job_id.to_owned(),
            destination_id: fs.clone(),
        };
        async move { jobs.resend_job(request).await }
    };
    let history = |job_id: &str| {
        let mut jobs = rig.jobs();
        let request = up::GetJobRequest {
            job_id: job_id.to_owned(),
        };
        async move { jobs.get_job_history(request).await.unwrap().into_inner() }
    };

    // Transient: the provider is unavailable for the abort.
    s3.set_denied(&["UploadPart"]);
    s3.set_unavailable(&["AbortMultipartUpload"]);
    let status = resend(&reply.job_id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_names(&status, &[&upload_id, "could not be aborted", "kept"]);
    assert!(s3.upload_in_progress(&upload_id));
    let job = rig.stored_job(&reply.job_id).await;
    assert_eq!(job.multipart_upload_id.as_deref(), Some(upload_id.as_str()));
    assert_eq!(job.destination_id.as_str(), destination);

    s3.set_unavailable(&[]);
    resend(&reply.job_id).await.unwrap();
    assert!(!s3.upload_in_progress(&upload_id));
    rig.wait_state(&reply.job_id, up::JobState::Delivered).await;
    assert!(std::fs::read(elsewhere.join("long.mp4")).unwrap() == data);
    let events = history(&reply.job_id).await;
    assert!(
        events
            .events
            .iter()
            .any(|e| e.message.contains(&upload_id)
                && e.message.contains("aborted before the resend")),
        "{events:?}"
    );

    // Permanent: the abort is denied (access revoked). The resend proceeds
    // and the id is given up, with the upload and its bucket in the history.
    s3.set_denied(&["UploadPart", "AbortMultipartUpload"]);
    let aborts = s3.requests_of("AbortMultipartUpload").len();
    let job = resend(&revoked.job_id).await.unwrap().into_inner();
    assert_eq!(job.destination_id, fs);
    assert_eq!(s3.requests_of("AbortMultipartUpload").len(), aborts + 1);
    assert!(s3.upload_in_progress(&revoked_upload_id), "not aborted");
    rig.wait_state(&revoked.job_id, up::JobState::Delivered)
        .await;
    assert!(std::fs::read(elsewhere.join("revoked.mp4")).unwrap() == revoked_data);
    let stored = rig.stored_job(&revoked.job_id).await;
    assert_eq!(stored.multipart_upload_id, None);
    let events = history(&revoked.job_id).await;
    assert!(
        events
            .events
            .iter()
            .any(|e| e.message.contains(&revoked_upload_id)
                && e.message.contains("\"media\"")
                && e.message.contains("given up")
                && e.message.contains("AbortIncompleteMultipartUpload")),
        "{events:?}"
    );
}

/// The handlers read and write destinations off the async runtime. On a
/// single-threaded runtime (the server, the clients and a ticker all share
/// one thread), the destination store is kept busy for 1.5 s: another
/// connection holds SQLite's write lock and a blocking-pool caller waits for
/// it inside the store. Meanwhile ListDestinations and an Upload (whose
/// header looks up its destination) wait for the store too, and the ticker
/// must keep running: a store call made on the runtime thread would stop
/// everything until the lock goes.
#[tokio::test(flavor = "current_thread")]
async fn destination_store_calls_do_not_block_the_runtime() {
    let rig = Rig::start().await;
    let target = rig.dir.path().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "").await;

    let (locked_tx, locked_rx) = std::sync::mpsc::channel();
    let db = rig.dir.path().join("uploader.db");
    let holder = std::thread::spawn(move || {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch("BEGIN IMMEDIATE").unwrap();
        locked_tx.send(()).unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        conn.execute_batch("COMMIT").unwrap();
    });
    locked_rx.recv().unwrap();
    // A writer that holds the store while it waits for SQLite's lock.
    let store = rig.shared.destinations.clone();
    let (waiting_tx, waiting_rx) = std::sync::mpsc::channel();
    let writer = std::thread::spawn(move || {
        waiting_tx.send(()).unwrap();
        let config = recvault_uploader::destination::DestinationConfig {
            provider: recvault_uploader::destination::Provider::Fs,
            endpoint: String::new(),
            region: String::new(),
            bucket: "/nowhere".into(),
            prefix: String::new(),
            path_style: false,
        };
        store.put(TENANT, "blocked", &config, "").unwrap();
    });
    waiting_rx.recv().unwrap();
    std::thread::sleep(Duration::from_millis(100));

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ticker = {
        let done = done.clone();
        tokio::spawn(async move {
            let mut last = tokio::time::Instant::now();
            let mut longest = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::Acquire) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                let now = tokio::time::Instant::now();
                longest = longest.max(now - last);
                last = now;
            }
            longest
        })
    };
    let started = std::time::Instant::now();
    let mut destinations = DestinationsClient::new(rig.channel("manager"));
    let list = async {
        let listed = destinations
            .list_destinations(up::ListDestinationsRequest {
                tenant_id: TENANT.into(),
            })
            .await;
        (listed, started.elapsed())
    };
    let (tx, rx) = mpsc::channel(4);
    tx.send(header(&destination, "rec-1", "call.mp4"))
        .await
        .unwrap();
    let mut recorder = rig.recorder();
    let upload = recorder.upload(tokio_stream::wrappers::ReceiverStream::new(rx));
    let data = bytes(1000, 1);
    let finish = async {
        // The header was taken once the store answered; finish the recording.
        tokio::time::sleep(Duration::from_millis(1700)).await;
        tx.send(chunk(&data)).await.unwrap();
        tx.send(trailer(&data)).await.unwrap();
        drop(tx);
    };
    let ((listed, waited), uploaded, ()) = tokio::join!(list, upload, finish);
    done.store(true, std::sync::atomic::Ordering::Release);
    let longest = ticker.await.unwrap();
    holder.join().unwrap();
    writer.join().unwrap();

    assert!(!listed.unwrap().into_inner().destinations.is_empty());
    uploaded.unwrap();
    // ListDestinations did wait for the busy store.
    assert!(waited >= Duration::from_millis(1200), "{waited:?}");
    assert!(
        longest < Duration::from_millis(500),
        "the runtime stalled for {longest:?} while the store was busy"
    );
}
