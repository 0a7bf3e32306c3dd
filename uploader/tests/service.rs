//! The uploader's gRPC services as a recorder and a manager see them, over
//! real mTLS, with the real worker delivering: recordings never overwrite
//! each other at a destination (ingest, resend, attempts), and a multipart
//! upload a failed delivery leaves behind never blocks a resend; backups are
//! encrypted at rest, a tampered one is never delivered and FetchBackup says
//! DATA_LOSS. The vault is a stand-in (the real one is another crate): a
//! Leases service that hands out the in-process S3 server's credential, and
//! DataKeys with a wrapping key pair made in the test.
#![allow(clippy::unwrap_used)]

#[path = "support/keys.rs"]
mod keys;
#[path = "support/s3.rs"]
mod s3_server;

#[path = "support/audit.rs"]
mod audit_support;

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
        let request = request.into_inner();
        let id = request.credential_id;
        let secret = self.secrets.lock().unwrap().get(&id).cloned();
        let secret = secret.ok_or_else(|| Status::not_found(format!("credential {id}")))?;
        // Sealed to the caller's one-call key, as the real vault does.
        let lease_id = format!("lease-{}", uuid::Uuid::new_v4().simple());
        let (enc, sealed_secret) = recvault_runtime::hpke::seal(
            &request.recipient_public_key,
            recvault_runtime::hpke::LEASE_INFO,
            &recvault_runtime::hpke::aad(&[&lease_id, &id]),
            &secret,
        )
        .map_err(|_| Status::invalid_argument("recipient_public_key"))?;
        Ok(Response::new(vault::AcquireLeaseResponse {
            lease_id,
            enc,
            sealed_secret,
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
    data_keys: keys::StandInDataKeys,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Rig {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        devcerts::generate(
            &certs,
            &[
                "uploader",
                "recorder",
                "manager",
                "vault",
                "manager-demo",
                "recorder-demo",
                "auditor",
                "nobody",
            ],
        )
        .unwrap();

        let vault = StandInVault::default();
        let data_keys = keys::StandInDataKeys::new(keys::TestWrapping::generate());
        let wrap_file = dir.path().join("backup-wrap.pub");
        data_keys.wrapping.write_file(&wrap_file);
        let vault_tls = tls::ReloadingServerTls::load(devcerts::files(&certs, "vault")).unwrap();
        let (listener, vault_addr) = tls::bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let leases = vault::leases_server::LeasesServer::new(vault.clone());
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(leases)
                .add_service(data_keys.server())
                .serve_with_incoming(tls::incoming(
                    listener,
                    vault_tls,
                    tls::HandshakeRefusals::new(Default::default(), "stand_in_vault_refused_total"),
                )),
        );

        let cert = |n: &str| certs.join(n).display().to_string();
        std::fs::create_dir(dir.path().join("fs")).unwrap();
        let config_path = dir.path().join("uploader.toml");
        let policy = dir.path().join("policy.toml");
        // The dev policy, plus a recorder scoped to the tenant "demo".
        let policy_text = format!(
            "{}\n[[grant]]\nidentity = \"{}\"\nroles = [\"recorder\"]\ntenants = [\"demo\"]\n",
            recvault_runtime::policy::dev_uploader_toml(),
            devcerts::spiffe_id("recorder-demo")
        );
        std::fs::write(&policy, policy_text).unwrap();
        std::fs::write(
            &config_path,
            format!(
                "listen = \"127.0.0.1:0\"\n\
                 metrics_listen = \"127.0.0.1:0\"\n\
                 database = \"{db}\"\n\
                 backup_dir = \"{backups}\"\n\
                 policy_file = \"{policy}\"\n\
                 {audit}\
                 ingest_idle_timeout_secs = 20\n\n\
                 [backup]\nwrapping_key_file = \"{wrap}\"\n\n\
                 [tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [vault]\nendpoint = \"{vault_addr}\"\n\n\
                 [vault.tls]\ncert = \"{crt}\"\nkey = \"{key}\"\nca = \"{ca}\"\n\n\
                 [destinations]\nfs_allowed_roots = [\"{fs_root}\"]\n\n\
                 [delivery]\nworkers = 2\nretry_window_secs = 1\nmax_doubtful_failures = 2\nretry_base_ms = 10\n\
                 retry_max_secs = 1\nscrub_interval_secs = 0\n\
                 multipart_threshold_bytes = {MIB}\npart_size_bytes = {part}\n",
                db = dir.path().join("uploader.db").display(),
                backups = dir.path().join("backups").display(),
                wrap = wrap_file.display(),
                fs_root = dir.path().join("fs").display(),
                audit = audit_support::audit_settings(dir.path()),
                crt = cert("uploader.crt"),
                key = cert("uploader.key"),
                ca = cert("ca.crt"),
                policy = policy.display(),
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
            data_keys,
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

    /// The one allowed root for `fs` destinations (beside, not over, the
    /// uploader's own files).
    fn fs_root(&self) -> PathBuf {
        self.dir.path().join("fs")
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

    /// A local-directory destination whose directory is gone (it existed
    /// when it was put: PutDestination refuses a missing one), so every
    /// attempt there fails permanently.
    async fn put_gone_fs_destination(&self, name: &str, prefix: &str) -> String {
        let directory = self.fs_root().join(format!("gone-{name}"));
        std::fs::create_dir_all(&directory).unwrap();
        let id = self.put_fs_destination(name, &directory, prefix).await;
        std::fs::remove_dir(&directory).unwrap();
        id
    }

    async fn put_destination(&self, request: up::PutDestinationRequest) -> String {
        self.try_put_destination(request).await.unwrap()
    }

    async fn try_put_destination(
        &self,
        request: up::PutDestinationRequest,
    ) -> Result<String, Status> {
        DestinationsClient::new(self.channel("manager"))
            .put_destination(request)
            .await
            .map(|r| r.into_inner().destination_id)
    }

    async fn list_destinations(&self) -> Vec<up::Destination> {
        DestinationsClient::new(self.channel("manager"))
            .list_destinations(up::ListDestinationsRequest {
                tenant_id: TENANT.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .destinations
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

    /// FetchBackup: the plaintext and the closing SHA-256, or the stream's error.
    async fn fetch(&self, job_id: &str) -> Result<(Vec<u8>, Vec<u8>), Status> {
        let mut stream = self
            .jobs()
            .fetch_backup(up::FetchBackupRequest {
                job_id: job_id.into(),
            })
            .await?
            .into_inner();
        let (mut data, mut sha256) = (Vec::new(), Vec::new());
        while let Some(message) = stream.message().await? {
            assert_eq!(crc32fast::hash(&message.data), message.crc32);
            data.extend_from_slice(&message.data);
            if !message.sha256.is_empty() {
                sha256 = message.sha256;
            }
        }
        Ok((data, sha256))
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
/// header: FAILED_PRECONDITION (never ALREADY_EXISTS, which reads as stored) naming the file name, the other recording and its
/// job, and what to do. The stream is still open when the answer comes, so
/// no byte was taken; no job, no backup or staging file is left, and the
/// delivered recording is untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_recording_with_the_same_file_name_is_refused_before_any_byte() {
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
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
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
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
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

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
    let target = rig.fs_root().join("delivered");
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
/// destination's prefix changed from "rec" to "rec//" (the same key
/// prefix once normalised) the name is still taken; under "other" it is free.
/// The checksum sidecar counts too: "a.mp4.sha256" would overwrite the
/// sidecar of "a.mp4", and "b.mp4"'s sidecar would overwrite "b.mp4.sha256".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_are_compared_as_object_keys() {
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "rec").await;
    let first = rig
        .upload(&destination, "rec-1", "x.mp4", &bytes(1000, 1))
        .await
        .unwrap();

    let same = rig.put_fs_destination("local", &target, "rec//").await;
    assert_eq!(same, destination);
    let status = rig
        .upload(&destination, "rec-2", "x.mp4", &bytes(1000, 2))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
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
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert_names(&status, &["sidecar", "rec-4"]);
    rig.upload(&destination, "rec-6", "b.mp4.sha256", &bytes(1000, 6))
        .await
        .unwrap();
    let status = rig
        .upload(&destination, "rec-7", "b.mp4", &bytes(1000, 7))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
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
    let good = rig.fs_root().join("good");
    std::fs::create_dir_all(&good).unwrap();
    let taken = rig.put_fs_destination("good", &good, "").await;
    let broken = rig.put_gone_fs_destination("broken", "").await;
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

    let free_dir = rig.fs_root().join("free");
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
/// gets FAILED_PRECONDITION from the check in the transaction that inserts, and
/// its bytes are removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_uploads_with_the_same_name_do_not_both_pass() {
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
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
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
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
    let good = rig.fs_root().join("good");
    std::fs::create_dir_all(&good).unwrap();
    let destination = rig.put_fs_destination("d", &good, "a").await;
    let first_data = bytes(5000, 1);
    let first = rig
        .upload(&destination, "rec-1", "x.mp4", &first_data)
        .await
        .unwrap();
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;

    // Prefix "b" (key b/x.mp4 is free) on a directory that no longer exists:
    // the second recording is accepted and RETAINED.
    rig.put_gone_fs_destination("d", "b").await;
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
    // Usually one attempt; a server that answers 403 before reading the
    // streamed part body can cut the connection first (broken pipe, a
    // transient failure), and then the retry meets the 403. Either way every
    // upload created was aborted.
    let created = s3.requests_of("CreateMultipartUpload").len();
    let aborted = s3.requests_of("AbortMultipartUpload");
    assert!((1..=2).contains(&created), "{created} uploads created");
    assert_eq!(aborted.len(), created);
    for abort in &aborted {
        assert!(!s3.upload_in_progress(abort.query_param("uploadId").unwrap()));
    }
    assert_eq!(
        rig.stored_job(&reply.job_id).await.multipart_upload_id,
        None
    );

    let elsewhere = rig.fs_root().join("elsewhere");
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
    // Two recordings, each one attempt (a third upload when a 403 before the
    // body was read cut the connection and the retry started afresh).
    let created = s3.requests_of("CreateMultipartUpload");
    assert!((2..=4).contains(&created.len()), "{}", created.len());
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
    let taken_dir = rig.fs_root().join("taken");
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

    let elsewhere = rig.fs_root().join("elsewhere");
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
    let target = rig.fs_root().join("delivered");
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

/// Backups are encrypted at rest, and the vault's outage only delays a
/// delivery: while DataKeys is down every attempt fails as transient
/// (RETRYING, then RETAINED once the budget is spent), never as corrupt.
/// Then each backup is tampered with on disk (a header byte, the first,
/// middle and last segment, cut short, two segments swapped): ResendJob's
/// attempt marks the job backup-corrupt and RETAINED and writes nothing at
/// the destination, and FetchBackup answers DATA_LOSS. The untouched
/// recording is delivered and fetched byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tampered_backups_are_never_delivered_and_fetch_is_data_loss() {
    use std::sync::atomic::Ordering;
    const SEG: usize = 64 * 1024;
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "").await;
    rig.data_keys.down.store(true, Ordering::SeqCst);

    let data = bytes(3 * SEG + 100, 9);
    let header_len = |path: &Path| {
        let b = std::fs::read(path).unwrap();
        let tenant = u32::from_be_bytes(b[108..112].try_into().unwrap()) as usize;
        let at = 112 + tenant;
        at + 4 + u32::from_be_bytes(b[at..at + 4].try_into().unwrap()) as usize
    };
    type Edit = fn(&mut Vec<u8>, usize);
    let cases: [(&str, Edit); 7] = [
        ("wrapped key byte", |b, _| b[70] ^= 1),
        ("first segment", |b, h| b[h + 10] ^= 1),
        ("middle segment", |b, h| b[h + (SEG + 16) + 5] ^= 1),
        ("last segment", |b, _| {
            let n = b.len();
            b[n - 20] ^= 1
        }),
        ("cut short", |b, h| b.truncate(h + 2 * (SEG + 16))),
        ("segments swapped", |b, h| {
            let (one, two) = (h + SEG + 16, h + 2 * (SEG + 16));
            let first = b[one..two].to_vec();
            let second = b[two..two + SEG + 16].to_vec();
            b[one..two].copy_from_slice(&second);
            b[two..two + SEG + 16].copy_from_slice(&first);
        }),
        ("untouched", |_, _| {}),
    ];
    let mut jobs = Vec::new();
    for (i, (name, _)) in cases.iter().enumerate() {
        let reply = rig
            .upload(
                &destination,
                &format!("rec-{i}"),
                &format!("call-{i}.mp4"),
                &data,
            )
            .await
            .unwrap_or_else(|s| panic!("{name}: ingest with the vault down: {s:?}"));
        jobs.push(reply.job_id);
    }
    for (job_id, (name, _)) in jobs.iter().zip(&cases) {
        let job = rig.wait_state(job_id, up::JobState::Retained).await;
        assert!(
            !job.backup_corrupt,
            "{name}: a vault outage is not corruption"
        );
        assert!(
            job.last_error
                .contains("gave up after retrying for 1 s since"),
            "{name}: {job:?}"
        );
        assert!(
            job.last_error.contains("did not unwrap") && job.last_error.contains("Unavailable"),
            "{name}: {job:?}"
        );
        let path = rig.stored_job(job_id).await.backup_path;
        let stored = std::fs::read(&path).unwrap();
        assert!(stored.starts_with(b"RVBK"));
        assert!(
            !stored.windows(64).any(|w| w == &data[SEG..SEG + 64]),
            "{name}: plaintext at rest"
        );
    }
    assert!(rig.data_keys.unwraps.load(Ordering::SeqCst) >= 2 * cases.len());
    rig.data_keys.down.store(false, Ordering::SeqCst);

    for (i, (job_id, (name, edit))) in jobs.iter().zip(&cases).enumerate() {
        let path = rig.stored_job(job_id).await.backup_path;
        let mut stored = std::fs::read(&path).unwrap();
        edit(&mut stored, header_len(&path));
        std::fs::write(&path, &stored).unwrap();
        rig.jobs()
            .resend_job(up::ResendJobRequest {
                job_id: job_id.clone(),
                destination_id: String::new(),
            })
            .await
            .unwrap();
        let delivered = target.join(format!("call-{i}.mp4"));
        if *name == "untouched" {
            rig.wait_state(job_id, up::JobState::Delivered).await;
            assert!(
                std::fs::read(&delivered).unwrap() == data,
                "{name}: delivered bytes"
            );
            continue;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        let job = loop {
            let job = rig.job(job_id).await;
            if job.backup_corrupt && job.state == up::JobState::Retained as i32 {
                break job;
            }
            assert!(tokio::time::Instant::now() < deadline, "{name}: {job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(job.last_error.contains("backup corrupt"), "{name}: {job:?}");
        assert!(!delivered.exists(), "{name}: something was delivered");
        assert!(path.exists(), "{name}: a corrupt backup is kept");
        let status = rig.fetch(job_id).await.unwrap_err();
        assert_eq!(status.code(), Code::DataLoss, "{name}: {status:?}");
    }
    // Nothing but the untouched recording (and its sidecar) reached the destination.
    assert_eq!(files_under(&target).len(), 2, "{:?}", files_under(&target));
}

/// FetchBackup decrypts while streaming: the bytes and SHA-256 ingested,
/// for sizes around the segment boundaries and across several MiB; with the
/// vault down it is UNAVAILABLE (nothing marked); a segment that does not
/// authenticate in the middle of the stream ends it with DATA_LOSS after
/// the good bytes, and marks the job backup-corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_backup_decrypts_and_stops_at_a_bad_segment() {
    use std::sync::atomic::Ordering;
    const SEG: usize = 64 * 1024;
    let rig = Rig::start().await;
    // A destination whose directory is gone, so jobs stay RETAINED with their backups.
    let destination = rig.put_gone_fs_destination("broken", "").await;
    for (i, len) in [0, 1, SEG, SEG + 1, 5 * MIB + 3].into_iter().enumerate() {
        let data = bytes(len, i as u8);
        let job = rig
            .upload(
                &destination,
                &format!("rec-{i}"),
                &format!("f-{i}.mp4"),
                &data,
            )
            .await
            .unwrap();
        let (got, sha) = rig.fetch(&job.job_id).await.unwrap();
        assert!(got == data, "{len} bytes fetched differ");
        assert_eq!(sha, sha2::Sha256::digest(&data).to_vec());
    }
    let data = bytes(40 * SEG, 77);
    let job = rig
        .upload(&destination, "rec-bad", "bad.mp4", &data)
        .await
        .unwrap();
    rig.data_keys.down.store(true, Ordering::SeqCst);
    let status = rig.fetch(&job.job_id).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    rig.data_keys.down.store(false, Ordering::SeqCst);
    assert!(!rig.job(&job.job_id).await.backup_corrupt);

    let path = rig.stored_job(&job.job_id).await.backup_path;
    let mut stored = std::fs::read(&path).unwrap();
    let n = stored.len();
    stored[n / 2] ^= 0x80;
    std::fs::write(&path, &stored).unwrap();
    let mut stream = rig
        .jobs()
        .fetch_backup(up::FetchBackupRequest {
            job_id: job.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let status = loop {
        match stream.message().await {
            Ok(Some(m)) => got.extend_from_slice(&m.data),
            Ok(None) => panic!("the stream ended cleanly after {} bytes", got.len()),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        got.len() < data.len() / 2 + SEG,
        "stopped at the bad segment"
    );
    assert!(
        got == data[..got.len()],
        "what came before is the recording"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !rig.job(&job.job_id).await.backup_corrupt {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never marked corrupt"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one call answered: `Ok`, or the code and message.
type Answer = Result<(), (Code, String)>;

fn answer<T>(r: Result<T, Status>) -> Answer {
    r.map(|_| ())
        .map_err(|s| (s.code(), s.message().to_owned()))
}

/// One Upload as `identity` for `tenant` to `destination_id`.
async fn upload_as(
    rig: &Rig,
    identity: &str,
    tenant: &str,
    destination_id: &str,
    recording_id: &str,
) -> Answer {
    let data = bytes(4096, 7);
    let mut first = header(destination_id, recording_id, &format!("{recording_id}.bin"));
    if let Some(Part::Header(h)) = &mut first.part {
        h.tenant_id = tenant.into();
    }
    let messages = vec![first, chunk(&data), trailer(&data)];
    answer(
        RecordingsClient::new(rig.channel(identity))
            .upload(tokio_stream::iter(messages))
            .await,
    )
}

/// Every uploader RPC that concerns one tenant, as `identity`, against
/// `tenant`'s job and destination: what each answered, by RPC name.
async fn calls_as(
    rig: &Rig,
    identity: &str,
    tenant: &str,
    job_id: &str,
    destination_id: &str,
    round: usize,
) -> Vec<(&'static str, Answer)> {
    let ch = rig.channel(identity);
    let mut jobs = JobsClient::new(ch.clone());
    let mut dests = DestinationsClient::new(ch);
    let job = || up::GetJobRequest {
        job_id: job_id.into(),
    };
    let mut out = Vec::new();
    out.push((
        "Upload",
        upload_as(
            rig,
            identity,
            tenant,
            destination_id,
            &format!("m-{identity}-{tenant}-{round}"),
        )
        .await,
    ));
    out.push((
        "PutDestination",
        answer(
            dests
                .put_destination(up::PutDestinationRequest {
                    tenant_id: tenant.into(),
                    name: format!("extra-{identity}"),
                    provider: "s3".into(),
                    endpoint: "http://127.0.0.1:9".into(),
                    bucket: "b".into(),
                    credential_id: "cred-unknown".into(),
                    ..Default::default()
                })
                .await,
        ),
    ));
    out.push((
        "ListDestinations",
        answer(
            dests
                .list_destinations(up::ListDestinationsRequest {
                    tenant_id: tenant.into(),
                })
                .await,
        ),
    ));
    out.push((
        "VerifyDestination",
        answer(
            dests
                .verify_destination(up::VerifyDestinationRequest {
                    destination_id: destination_id.into(),
                })
                .await,
        ),
    ));
    out.push(("GetJob", answer(jobs.get_job(job()).await)));
    out.push(("GetJobHistory", answer(jobs.get_job_history(job()).await)));
    out.push((
        "ListJobs",
        answer(
            jobs.list_jobs(up::ListJobsRequest {
                tenant_id: tenant.into(),
                ..Default::default()
            })
            .await,
        ),
    ));
    let watched = match jobs
        .watch_job(up::WatchJobRequest {
            job_id: job_id.into(),
        })
        .await
    {
        Ok(stream) => answer(stream.into_inner().message().await),
        Err(s) => answer::<()>(Err(s)),
    };
    out.push(("WatchJob", watched));
    let fetched = match jobs
        .fetch_backup(up::FetchBackupRequest {
            job_id: job_id.into(),
        })
        .await
    {
        Ok(stream) => answer(stream.into_inner().message().await),
        Err(s) => answer::<()>(Err(s)),
    };
    out.push(("FetchBackup", fetched));
    let resent = answer(
        jobs.resend_job(up::ResendJobRequest {
            job_id: job_id.into(),
            ..Default::default()
        })
        .await,
    );
    // A resend that passed authorization may still meet an attempt in
    // flight (FAILED_PRECONDITION): that is "allowed" here.
    let resent = match resent {
        Err((Code::FailedPrecondition, _)) => Ok(()),
        other => other,
    };
    out.push(("ResendJob", resent));
    let throwaway = rig
        .put_destination(up::PutDestinationRequest {
            tenant_id: tenant.into(),
            name: format!("throwaway-{identity}-{round}"),
            provider: "s3".into(),
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "b".into(),
            credential_id: "cred-unknown".into(),
            ..Default::default()
        })
        .await;
    out.push((
        "DeleteDestination",
        answer(
            dests
                .delete_destination(up::DeleteDestinationRequest {
                    destination_id: throwaway,
                })
                .await,
        ),
    ));
    out
}

/// The role × tenant × RPC matrix: a recorder ingests only for its tenants;
/// a manager sees and changes only its tenants' destinations, jobs and
/// backups; naming another tenant is PERMISSION_DENIED, naming another
/// tenant's job or destination is NOT_FOUND exactly as an id that does not
/// exist; identities without the role are PERMISSION_DENIED everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_scoped_roles_matrix() {
    let rig = Rig::start().await;
    // One destination and one retained job (its backup kept) per tenant: the
    // credential is unknown to the vault, so every attempt fails permanently.
    let mut setup = HashMap::new();
    for tenant in ["acme", "demo"] {
        let destination_id = rig
            .put_destination(up::PutDestinationRequest {
                tenant_id: tenant.into(),
                name: "main".into(),
                provider: "s3".into(),
                endpoint: "http://127.0.0.1:9".into(),
                bucket: "b".into(),
                credential_id: "cred-unknown".into(),
                ..Default::default()
            })
            .await;
        upload_as(
            &rig,
            "recorder",
            tenant,
            &destination_id,
            &format!("r-{tenant}"),
        )
        .await
        .unwrap();
        let job_id = rig
            .shared
            .jobs
            .list(JobFilter {
                tenant_id: Some(recvault_uploader::jobs::TenantId::parse(tenant).unwrap()),
                ..Default::default()
            })
            .await
            .unwrap()[0]
            .job_id
            .to_string();
        rig.wait_state(&job_id, up::JobState::Retained).await;
        setup.insert(tenant, (job_id, destination_id));
    }

    let manager_rpcs = [
        "PutDestination",
        "ListDestinations",
        "VerifyDestination",
        "GetJob",
        "GetJobHistory",
        "ListJobs",
        "WatchJob",
        "FetchBackup",
        "ResendJob",
        "DeleteDestination",
    ];
    // RPCs that name the tenant themselves (PERMISSION_DENIED when not
    // held) rather than an id of the tenant's (NOT_FOUND).
    let names_tenant = ["Upload", "PutDestination", "ListDestinations", "ListJobs"];
    let mut round = 0;
    for identity in [
        "manager",
        "manager-demo",
        "recorder",
        "recorder-demo",
        "auditor",
        "nobody",
    ] {
        for tenant in ["acme", "demo"] {
            round += 1;
            let (job_id, destination_id) = &setup[tenant];
            for (rpc, got) in calls_as(&rig, identity, tenant, job_id, destination_id, round).await
            {
                let role_holder = match rpc {
                    "Upload" => identity.starts_with("recorder"),
                    _ => identity.starts_with("manager"),
                };
                let scoped_out = identity.ends_with("-demo") && tenant != "demo";
                let expected = if !role_holder || (scoped_out && names_tenant.contains(&rpc)) {
                    Some(Code::PermissionDenied)
                } else if scoped_out {
                    Some(Code::NotFound)
                } else {
                    None
                };
                match (expected, &got) {
                    (None, Ok(())) => {}
                    (Some(code), Err((got_code, _))) if *got_code == code => {}
                    _ => panic!(
                        "{identity} calling {rpc} for tenant {tenant}: expected {expected:?}, got {got:?}"
                    ),
                }
                assert!(
                    manager_rpcs.contains(&rpc) || rpc == "Upload",
                    "unknown rpc {rpc}"
                );
            }
        }
    }

    // Every call of the matrix is audited, allowed or denied: exactly one
    // event per call (these identities make no other calls), with the
    // tenant and ids it concerned, and the chain verifies.
    let events = rig
        .shared
        .audit
        .query(&recvault_audit::AuditFilter::default(), 0, 10_000)
        .await
        .unwrap();
    for identity in ["manager-demo", "recorder-demo", "auditor", "nobody"] {
        let id = devcerts::spiffe_id(identity);
        for rpc in manager_rpcs.iter().chain(["Upload"].iter()) {
            let mine: Vec<_> = events
                .iter()
                .filter(|e| {
                    e.record.identity == id && e.record.operation.ends_with(&format!("/{rpc}"))
                })
                .collect();
            assert_eq!(mine.len(), 2, "{identity} {rpc}: {mine:?}");
        }
    }
    let demo = devcerts::spiffe_id("manager-demo");
    let (acme_job_id, _) = &setup["acme"];
    let hidden_get = events
        .iter()
        .find(|e| {
            e.record.identity == demo
                && e.record.operation == "recvault.uploader.v1.Jobs/GetJob"
                && e.record.job_id == *acme_job_id
        })
        .expect("the refused GetJob is audited");
    assert_eq!(hidden_get.record.outcome, recvault_audit::Outcome::Denied);
    assert_eq!(hidden_get.record.code, "NOT_FOUND");
    assert_eq!(hidden_get.record.tenant_id, "acme");
    assert!(!hidden_get.record.cert_fingerprint.is_empty());
    assert!(!hidden_get.record.request_id.is_empty());
    let allowed_fetch = events
        .iter()
        .find(|e| {
            e.record.identity == demo
                && e.record.operation == "recvault.uploader.v1.Jobs/FetchBackup"
                && e.record.tenant_id == "demo"
        })
        .expect("the allowed FetchBackup is audited");
    assert_eq!(
        allowed_fetch.record.outcome,
        recvault_audit::Outcome::Allowed
    );
    assert!(!allowed_fetch.record.recording_id.is_empty());
    assert!(rig.shared.audit.verify().await.ok);

    // Another tenant's job answers exactly like a job that does not exist.
    let mut demo_jobs = JobsClient::new(rig.channel("manager-demo"));
    let (acme_job, acme_destination) = &setup["acme"];
    let hidden = demo_jobs
        .get_job(up::GetJobRequest {
            job_id: acme_job.clone(),
        })
        .await
        .unwrap_err();
    let missing_id = JobId::new_random().to_string();
    let missing = demo_jobs
        .get_job(up::GetJobRequest {
            job_id: missing_id.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), missing.code());
    assert_eq!(
        hidden.message().replace(acme_job.as_str(), "ID"),
        missing.message().replace(missing_id.as_str(), "ID")
    );
    let mut demo_dests = DestinationsClient::new(rig.channel("manager-demo"));
    let hidden = demo_dests
        .verify_destination(up::VerifyDestinationRequest {
            destination_id: acme_destination.clone(),
        })
        .await
        .unwrap_err();
    let missing = demo_dests
        .verify_destination(up::VerifyDestinationRequest {
            destination_id: "no-such-destination".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(hidden.code(), missing.code());
    assert_eq!(
        hidden.message().replace(acme_destination.as_str(), "ID"),
        missing.message().replace("no-such-destination", "ID")
    );

    // Listing without a tenant shows a scoped manager only its tenants.
    let listed = demo_jobs
        .list_jobs(up::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(!listed.is_empty());
    assert!(listed.iter().all(|j| j.tenant_id == "demo"), "{listed:?}");
    let all = rig
        .jobs()
        .list_jobs(up::ListJobsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(all.iter().any(|j| j.tenant_id == "acme"));
    assert!(all.iter().any(|j| j.tenant_id == "demo"));
    // The acme destination is still there: manager-demo could not delete it.
    assert!(
        rig.shared
            .destinations
            .get_async(acme_destination)
            .await
            .unwrap()
            .is_some()
    );
}

/// An edit of the policy file takes effect without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_file_changes_apply_without_a_restart() {
    let rig = Rig::start().await;
    let mut nobody = DestinationsClient::new(rig.channel("nobody"));
    let list = || up::ListDestinationsRequest {
        tenant_id: "acme".into(),
    };
    assert_eq!(
        nobody.list_destinations(list()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    let policy = rig.dir.path().join("policy.toml");
    let mut text = std::fs::read_to_string(&policy).unwrap();
    text.push_str(&format!(
        "\n[[grant]]\nidentity = \"{}\"\nroles = [\"manager\"]\ntenants = [\"acme\"]\n",
        devcerts::spiffe_id("nobody")
    ));
    // Another mtime than the first write, whatever the file system's resolution.
    std::thread::sleep(Duration::from_millis(1100));
    std::fs::write(&policy, text).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match nobody.list_destinations(list()).await {
            Ok(_) => break,
            Err(s) if s.code() == Code::PermissionDenied => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "the policy edit was not picked up"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(s) => panic!("{s:?}"),
        }
    }
}

/// Local-directory destinations only where the operator allows
/// (`[destinations].fs_allowed_roots`, here the rig's directory). Outside
/// the roots, through a symlink out of them, a missing directory, a prefix
/// that climbs: INVALID_ARGUMENT naming the setting or field, and nothing is
/// stored. A destination whose directory is later swapped for a symlink out
/// of the root fails permanently: the recording is RETAINED with its backup,
/// and nothing is written outside; VerifyDestination fails at "bucket".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_destinations_only_inside_the_allowed_roots() {
    let rig = Rig::start().await;
    let outside = tempfile::tempdir().unwrap();
    let fs = |name: &str, bucket: &Path, prefix: &str| up::PutDestinationRequest {
        tenant_id: TENANT.into(),
        name: name.into(),
        provider: "fs".into(),
        bucket: bucket.display().to_string(),
        prefix: prefix.into(),
        ..Default::default()
    };

    let status = rig
        .try_put_destination(fs("out", outside.path(), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_names(
        &status,
        &[
            &format!("bucket {:?}", outside.path().display().to_string()),
            "not inside an allowed root",
            "[destinations].fs_allowed_roots in the uploader config",
            &rig.fs_root().display().to_string(),
        ],
    );
    let etc = rig
        .try_put_destination(fs("etc", Path::new("/etc"), ""))
        .await
        .unwrap_err();
    assert_eq!(etc.code(), Code::InvalidArgument, "{etc:?}");
    assert_names(
        &etc,
        &["bucket \"/etc\"", "[destinations].fs_allowed_roots"],
    );

    // A symlink inside the root that points out of it.
    let link = rig.fs_root().join("link-out");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    let status = rig
        .try_put_destination(fs("link", &link, ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_names(
        &status,
        &["it resolves to", "[destinations].fs_allowed_roots"],
    );
    // `..` in the directory that leaves the root.
    let climb = rig.fs_root().join("..");
    let status = rig.try_put_destination(fs("climb", &climb, "")).await;
    assert_eq!(status.unwrap_err().code(), Code::InvalidArgument);
    // A directory that does not exist, a relative one.
    let status = rig
        .try_put_destination(fs("missing", &rig.fs_root().join("missing"), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_names(&status, &["does not exist"]);
    let status = rig
        .try_put_destination(fs("relative", Path::new("relative/dir"), ""))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_names(&status, &["absolute"]);
    // Prefixes that climb, for fs and for S3 alike.
    let inside = rig.fs_root().join("inside");
    std::fs::create_dir_all(&inside).unwrap();
    for prefix in ["../up", "a/../../up", "/abs", "a\u{1}b", "a/./b"] {
        let status = rig
            .try_put_destination(fs("prefix", &inside, prefix))
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{prefix:?}: {status:?}"
        );
        assert_names(&status, &["prefix"]);
        let status = rig
            .try_put_destination(up::PutDestinationRequest {
                tenant_id: TENANT.into(),
                name: "s3".into(),
                provider: "s3".into(),
                endpoint: "http://127.0.0.1:9".into(),
                bucket: "media".into(),
                prefix: prefix.into(),
                credential_id: "cred".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{prefix:?}: {status:?}"
        );
        assert_names(&status, &["prefix"]);
    }
    assert!(rig.list_destinations().await.is_empty());

    // Inside the root: delivered.
    let destination = rig.put_fs_destination("inside", &inside, "calls").await;
    let data = bytes(4000, 7);
    let first = rig
        .upload(&destination, "rec-1", "first.mp4", &data)
        .await
        .unwrap();
    rig.wait_state(&first.job_id, up::JobState::Delivered).await;
    assert_eq!(std::fs::read(inside.join("calls/first.mp4")).unwrap(), data);

    // The directory is swapped for a symlink out of the root.
    std::fs::remove_dir_all(&inside).unwrap();
    std::os::unix::fs::symlink(outside.path(), &inside).unwrap();
    let verify = DestinationsClient::new(rig.channel("manager"))
        .verify_destination(up::VerifyDestinationRequest {
            destination_id: destination.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!verify.ok, "{verify:?}");
    assert_eq!(verify.failed_step, "bucket", "{verify:?}");
    assert!(
        verify.message.contains("[destinations].fs_allowed_roots"),
        "{verify:?}"
    );
    let second = rig
        .upload(&destination, "rec-2", "second.mp4", &data)
        .await
        .unwrap();
    let job = rig.wait_state(&second.job_id, up::JobState::Retained).await;
    assert_eq!(job.attempts, 1, "permanent: not retried: {job:?}");
    assert!(
        job.last_error.contains("not inside an allowed root")
            && job.last_error.contains("[destinations].fs_allowed_roots"),
        "{job:?}"
    );
    assert!(
        files_under(&rig.backup_dir())
            .iter()
            .any(|p| p.to_string_lossy().contains(&second.job_id)),
        "the backup is kept"
    );
    assert!(
        files_under(outside.path()).is_empty(),
        "nothing written outside: {:?}",
        files_under(outside.path())
    );
    // Only the one destination that was allowed was ever stored.
    let stored = rig.list_destinations().await;
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert_eq!(stored[0].destination_id, destination);
}

/// A header `file_name` that could climb out of the prefix, or carries a
/// control character, is refused at the header (INVALID_ARGUMENT naming
/// `file_name`) while the stream is still open: no byte taken, no job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_names_that_could_climb_out_are_refused_at_the_header() {
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "calls").await;
    for name in [
        "../authorized_keys",
        "..",
        "a/../../b",
        "/etc/passwd",
        "a\\b",
        "call\u{1}.mp4",
        "nul\0.mp4",
        "del\u{7f}",
    ] {
        let (tx, rx) = mpsc::channel(4);
        tx.send(header(&destination, "rec-1", name)).await.unwrap();
        let mut client = rig.recorder();
        let call = client.upload(tokio_stream::wrappers::ReceiverStream::new(rx));
        let status = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("refused without waiting for the stream")
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name:?}: {status:?}");
        assert_names(&status, &["file_name"]);
        drop(tx);
    }
    assert_eq!(rig.job_count().await, 0);
    assert!(files_under(&rig.backup_dir()).is_empty());
    assert!(files_under(&target).is_empty());
}

/// FetchBackup is fail closed: when its audit event cannot be made durable,
/// the call fails UNAVAILABLE and no byte of the recording leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_backup_sends_nothing_when_the_audit_log_fails() {
    let rig = Rig::start().await;
    let destination_id = rig
        .put_destination(up::PutDestinationRequest {
            tenant_id: TENANT.into(),
            name: "unreachable".into(),
            provider: "s3".into(),
            endpoint: "http://127.0.0.1:9".into(),
            bucket: "b".into(),
            credential_id: "cred-unknown".into(),
            ..Default::default()
        })
        .await;
    let data = bytes(300_000, 3);
    let job_id = rig
        .upload(&destination_id, "fail-closed", "fail-closed.bin", &data)
        .await
        .unwrap()
        .job_id;
    rig.wait_state(&job_id, up::JobState::Retained).await;
    rig.shared.audit.fail_writes(true);
    let answer = rig
        .jobs()
        .fetch_backup(up::FetchBackupRequest {
            job_id: job_id.clone(),
        })
        .await;
    let status = match answer {
        Err(status) => status,
        Ok(stream) => {
            let first = stream.into_inner().message().await;
            let sent = first.map(|m| m.map(|r| r.data.len()));
            panic!("bytes left although the audit failed: {sent:?}");
        }
    };
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    rig.shared.audit.fail_writes(false);
    // With the log back, the same call streams the recording.
    let mut stream = rig
        .jobs()
        .fetch_backup(up::FetchBackupRequest { job_id })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        got.extend_from_slice(&m.data);
    }
    assert_eq!(got, data);
}

/// A message over the size cap (a chunk past `max_chunk_bytes` plus the
/// framing allowance) is refused by the decoder: RESOURCE_EXHAUSTED, as
/// gRPC's status table says, and nothing is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_the_size_cap_is_resource_exhausted() {
    let rig = Rig::start().await;
    let target = rig.fs_root().join("delivered");
    std::fs::create_dir_all(&target).unwrap();
    let destination = rig.put_fs_destination("local", &target, "calls").await;
    let data = bytes(5 * 1024 * 1024, 9);
    let messages = vec![
        header(&destination, "rec-big", "big.mp4"),
        chunk(&data),
        trailer(&data),
    ];
    let status = tokio::time::timeout(
        Duration::from_secs(30),
        rig.recorder().upload(tokio_stream::iter(messages)),
    )
    .await
    .expect("answered")
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(rig.job_count().await, 0);
    assert!(files_under(&rig.backup_dir()).is_empty());
}
