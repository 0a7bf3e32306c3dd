//! The uploader as it runs in production: the real `uploaderd` and `vaultd`
//! binaries over real mTLS (dev certificates from `vaultd init`), delivering
//! to a real S3 server (s3s-fs, in this process, on `127.0.0.1:0` with SigV4).
//! Clients are the generated tonic clients. Every wait has a deadline and
//! prints both daemons' logs when it runs out.
//!
//! Scenarios: verified delivery (single PUT and multipart) with a sidecar that
//! `sha256sum -c` accepts; corrupt intake refused without a trace; a wrong S3
//! secret retained and delivered after the credential is fixed; the vault down
//! and back (ingest needs no vault: backups are encrypted to its wrapping
//! key); SIGKILL mid-multipart and restart; no S3 secret in any log; the
//! break-glass script decrypting backups with the master key alone; and
//! local-directory destinations only inside `[destinations].fs_allowed_roots`.

#![allow(clippy::unwrap_used)]

use std::{
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    process::Command,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use recvault_proto::{
    uploader::v1::{
        self as up, destinations_client::DestinationsClient, jobs_client::JobsClient,
        recordings_client::RecordingsClient, upload_request::Part,
    },
    vault::v1::{self as vt},
};
use recvault_runtime::{devcerts, tls};
use recvault_tests::{Daemon, binary, served_addr};
use sha2::{Digest as _, Sha256};
use tonic::{Code, transport::Channel};

const MIB: usize = 1024 * 1024;
const TENANT: &str = "acme";
const BUCKET: &str = "media";
const PREFIX: &str = "recordings/e2e";
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

// ---------------------------------------------------------------------------
// An in-process S3 server: s3s-fs on a temporary directory, SigV4 with one key.
// ---------------------------------------------------------------------------

/// One authenticated request as the S3 server saw it.
#[derive(Debug, Clone)]
struct SeenRequest {
    operation: String,
    path: String,
    crc32: Option<String>,
    checksum_type: Option<String>,
}

struct S3 {
    endpoint: String,
    access_key: String,
    secret_key: String,
    root: tempfile::TempDir,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    /// `None` while stopped (an outage).
    server: Option<recvault_tests::s3::S3Server>,
}

struct Recorder {
    seen: Arc<Mutex<Vec<SeenRequest>>>,
}

// `S3Access` is an `#[async_trait]` trait; this is the signature the macro
// generates, written out so no async-trait dependency is needed.
impl s3s::access::S3Access for Recorder {
    fn check<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        cx: &'life1 mut s3s::access::S3AccessContext<'life2>,
    ) -> Pin<Box<dyn Future<Output = s3s::S3Result<()>> + Send + 'async_trait>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        let authenticated = cx.credentials().is_some();
        let header = |name: &str| {
            cx.headers()
                .get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let request = SeenRequest {
            operation: cx.s3_op().name().to_owned(),
            path: cx.uri().path().to_owned(),
            crc32: header("x-amz-checksum-crc32"),
            checksum_type: header("x-amz-checksum-type"),
        };
        self.seen.lock().unwrap().push(request);
        Box::pin(async move {
            if authenticated {
                Ok(())
            } else {
                Err(s3s::s3_error!(AccessDenied))
            }
        })
    }
}

/// Distinct enough to search logs for, different in every run.
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let mut x = (nanos as u64) ^ (u64::from(std::process::id()) << 32);
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    x ^= COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 48;
    format!("{prefix}{:016x}", splitmix(&mut x))
}

impl S3 {
    async fn start() -> Self {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(root.path().join(BUCKET)).unwrap();
        let access_key = unique("AKIAE2E").to_uppercase();
        // 40 characters, as a real AWS secret access key (and the memory
        // test's marker): distinct in every run.
        let secret_key = format!("{}{}", unique("S3cr3t-e2e-"), &unique("")[..13]);
        let seen = Arc::new(Mutex::new(Vec::new()));
        let server = recvault_tests::s3::serve(
            root.path(),
            "127.0.0.1:0".parse().unwrap(),
            &access_key,
            &secret_key,
            Some(Recorder { seen: seen.clone() }),
        )
        .await
        .unwrap();
        Self {
            endpoint: server.endpoint.clone(),
            access_key,
            secret_key,
            root,
            seen,
            server: Some(server),
        }
    }

    /// An outage: the port refuses connections and open ones are closed.
    fn stop(&mut self) {
        drop(self.server.take().expect("S3 running"));
    }

    /// Back on the same address, with the same bytes and key pair.
    async fn restart(&mut self) {
        let addr = self.endpoint.trim_start_matches("http://").parse().unwrap();
        let server = recvault_tests::s3::serve(
            self.root.path(),
            addr,
            &self.access_key,
            &self.secret_key,
            Some(Recorder {
                seen: self.seen.clone(),
            }),
        )
        .await
        .unwrap();
        assert_eq!(server.endpoint, self.endpoint);
        self.server = Some(server);
    }

    /// Where s3s-fs keeps the bytes of `BUCKET/PREFIX/name`.
    fn object_path(&self, name: &str) -> PathBuf {
        self.root.path().join(BUCKET).join(PREFIX).join(name)
    }

    fn credential_json(&self, secret: &str) -> String {
        format!(
            r#"{{"access_key_id":"{}","secret_access_key":"{secret}"}}"#,
            self.access_key
        )
    }

    fn requests(&self, operation: &str, name: &str) -> Vec<SeenRequest> {
        let path = format!("/{BUCKET}/{PREFIX}/{name}");
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.operation == operation && r.path == path)
            .cloned()
            .collect()
    }

    /// Multipart uploads s3s-fs still holds (`.upload-<id>.json`, `.upload_id-<id>.part-N`).
    fn open_multipart_files(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Recordings: pseudo-random bytes, streamed in CRC-checked chunks.
// ---------------------------------------------------------------------------

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn random_bytes(len: usize, seed: u64) -> Arc<Vec<u8>> {
    let mut state = seed;
    let mut data = Vec::with_capacity(len + 8);
    while data.len() < len {
        data.extend_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    data.truncate(len);
    Arc::new(data)
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tamper {
    None,
    /// Send this chunk with a CRC-32 that does not match its bytes.
    ChunkCrc(usize),
    /// Send a trailer SHA-256 that does not match the recording.
    TrailerSha256,
}

// ---------------------------------------------------------------------------
// The rig: vaultd + uploaderd (real binaries) + S3, in one temporary directory.
// ---------------------------------------------------------------------------

/// The `[delivery]` retry settings a rig's uploader runs with.
#[derive(Debug, Clone, Copy)]
enum Retries {
    /// Fast backoff (200 ms .. 1 s), transient failures retried for 60 s,
    /// failures that may be permanent this many times.
    Fast { doubtful: u32 },
    /// No retry setting in the config: what uploaderd ships with.
    Shipped,
}

#[derive(Debug, Clone)]
struct Settings {
    retries: Retries,
    multipart_threshold: usize,
    part_size: usize,
    part_concurrency: usize,
    /// Fixed vault port (so a restarted vault comes back on the same address).
    vault_port: Option<u16>,
    /// Replicas: the job store in PostgreSQL and the backup store in an S3
    /// bucket (another s3s-fs), so several uploaderd processes share both.
    replicas: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            retries: Retries::Fast { doubtful: 5 },
            multipart_threshold: 16 * MIB,
            part_size: 8 * MIB,
            part_concurrency: 4,
            vault_port: None,
            replicas: false,
        }
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    root: PathBuf,
    certs: PathBuf,
    settings: Settings,
    s3: S3,
    vault: Option<Daemon>,
    vault_addr: String,
    uploader: Option<Daemon>,
    uploader_addr: String,
    /// Output of daemons that were stopped or killed.
    past_logs: Vec<String>,
    /// With `replicas`: the shared job database and the backup bucket.
    shared: Option<(recvault_tests::postgres::Database, S3)>,
    /// With `replicas`: the second uploader and its address.
    uploader_b: Option<Daemon>,
    uploader_b_addr: String,
}

/// `uploaderd serve --config <config>`, once it says it is serving, and its address.
fn spawn_uploader(config: &Path, log: &str) -> (Daemon, String) {
    let mut cmd = Command::new(binary("uploaderd"));
    cmd.args(["serve", "--config"])
        .arg(config)
        .env("RUST_LOG", log);
    let mut daemon = Daemon::spawn(cmd);
    let line = tokio::task::block_in_place(|| {
        daemon.wait_for("uploader serving", Duration::from_secs(30))
    });
    let addr = served_addr(&line);
    (daemon, addr)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Rig {
    async fn new(settings: Settings) -> Self {
        tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let certs = root.join("certs");
        let out = Command::new(binary("vaultd"))
            .args(["init", "--listen", "127.0.0.1:0", "--dir"])
            .arg(root.join("vault"))
            .arg("--certs")
            .arg(&certs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vaultd init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // The vault's wrapping public key, which the uploader encrypts backups to.
        let out = Command::new(binary("vaultd"))
            .args(["wrapping-key", "--config"])
            .arg(root.join("vault/vault.toml"))
            .arg("--out")
            .arg(root.join("backup-wrap.pub"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "vaultd wrapping-key: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Build (if stale) before any daemon runs, so no start-up timeout pays for it.
        binary("uploaderd");
        let s3 = S3::start().await;
        let mut rig = Self {
            _dir: dir,
            root,
            certs,
            settings,
            s3,
            vault: None,
            vault_addr: String::new(),
            uploader: None,
            uploader_addr: String::new(),
            past_logs: Vec::new(),
            shared: None,
            uploader_b: None,
            uploader_b_addr: String::new(),
        };
        if rig.settings.replicas {
            let db = recvault_tests::postgres::Postgres::shared()
                .expect("PostgreSQL for the replica test")
                .database();
            rig.shared = Some((db, S3::start().await));
        }
        std::fs::create_dir_all(rig.fs_root()).unwrap();
        rig.start_vault();
        rig
    }

    fn backup_dir(&self) -> PathBuf {
        self.root.join("uploader/backups")
    }

    /// The one directory local-directory destinations may use (created by `new`).
    fn fs_root(&self) -> PathBuf {
        self.root.join("fs-allowed")
    }

    fn start_vault(&mut self) {
        let mut cmd = Command::new(binary("vaultd"));
        cmd.args(["serve", "--config"])
            .arg(self.root.join("vault/vault.toml"))
            .env("RUST_LOG", "debug");
        if let Some(port) = self.settings.vault_port {
            cmd.env("RECVAULT_VAULT_LISTEN", format!("127.0.0.1:{port}"));
        }
        let mut daemon = Daemon::spawn(cmd);
        let line = tokio::task::block_in_place(|| {
            daemon.wait_for("vault serving", Duration::from_secs(30))
        });
        self.vault_addr = served_addr(&line);
        if let Some(port) = self.settings.vault_port {
            assert_eq!(self.vault_addr, format!("127.0.0.1:{port}"));
        }
        self.vault = Some(daemon);
    }

    fn stop_vault(&mut self) {
        let mut daemon = self.vault.take().expect("vault running");
        tokio::task::block_in_place(|| daemon.stop());
        self.past_logs.push(daemon.output());
    }

    fn stop_uploader(&mut self) {
        let mut daemon = self.uploader.take().expect("uploader running");
        tokio::task::block_in_place(|| daemon.stop());
        self.past_logs.push(daemon.output());
    }

    fn write_uploader_config(&self) -> PathBuf {
        self.write_replica_config("replica-a", "uploader.toml")
    }

    /// The config of replica `instance` in `config_file` under the rig's root: with
    /// `replicas`, on the shared PostgreSQL job store and backup bucket;
    /// else the embedded defaults.
    fn write_replica_config(&self, instance: &str, config_file: &str) -> PathBuf {
        let s = &self.settings;
        let file = |name: &str| self.certs.join(name).display().to_string();
        let policy = self.root.join("uploader-policy.toml");
        std::fs::write(&policy, recvault_runtime::policy::dev_uploader_toml()).unwrap();
        let audit_key = self.root.join("uploader/audit.key");
        if !audit_key.exists() {
            // Made by the real binary, as an operator would.
            std::fs::create_dir_all(self.root.join("uploader")).unwrap();
            let made = Command::new(binary("uploaderd"))
                .args(["init-audit-key", "--file"])
                .arg(&audit_key)
                .output()
                .unwrap();
            assert!(made.status.success(), "{made:?}");
        }
        let text = format!(
            r#"listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
{store}
policy_file = "{policy}"
audit_key_file = "{audit_key}"

[backup]
wrapping_key_file = "{wrap}"

[tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[vault]
endpoint = "{vault}"
server_name = "localhost"
lease_ttl_secs = 60

[vault.tls]
cert = "{cert}"
key = "{key}"
ca = "{ca}"

[destinations]
fs_allowed_roots = ["{fs_root}"]

[delivery]
workers = 2
{retries}scrub_interval_secs = 0
multipart_threshold_bytes = {threshold}
part_size_bytes = {part}
part_concurrency = {concurrency}
"#,
            store = match &self.shared {
                None => format!(
                    "database = \"{}\"\nbackup_dir = \"{}\"",
                    self.root.join("uploader/uploader.db").display(),
                    self.backup_dir().display()
                ),
                Some((db, _)) => format!(
                    "database_url_file = \"{}\"\ninstance_id = \"{instance}\"",
                    db.url_file(&self.root).display()
                ),
            },
            wrap = self.root.join("backup-wrap.pub").display(),
            policy = policy.display(),
            fs_root = self.fs_root().display(),
            audit_key = audit_key.display(),
            cert = file("uploader.crt"),
            key = file("uploader.key"),
            ca = file("ca.crt"),
            vault = self.vault_addr,
            retries = match s.retries {
                Retries::Fast { doubtful } => format!(
                    "retry_window_secs = 60\nmax_doubtful_failures = {doubtful}\n\
                     retry_base_ms = 200\nretry_max_secs = 1\n"
                ),
                Retries::Shipped => String::new(),
            },
            threshold = s.multipart_threshold,
            part = s.part_size,
            concurrency = s.part_concurrency,
        );
        let text = match &self.shared {
            None => text,
            Some((_, bucket)) => {
                let credentials = self.root.join("backup-store.json");
                std::fs::write(&credentials, bucket.credential_json(&bucket.secret_key)).unwrap();
                std::fs::set_permissions(
                    &credentials,
                    std::os::unix::fs::PermissionsExt::from_mode(0o600),
                )
                .unwrap();
                format!(
                    "{text}claim_ttl_secs = 4\n\n[backup_store]\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
                     bucket = \"{BUCKET}\"\nprefix = \"backups\"\npath_style = true\n\
                     credentials_file = \"{}\"\n",
                    bucket.endpoint,
                    credentials.display()
                )
            }
        };
        let path = self.root.join(config_file);
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Starts the second replica (`replicas` only).
    fn start_uploader_b(&mut self) {
        let config = self.write_replica_config("replica-b", "uploader-replica-b.toml");
        let (daemon, addr) = spawn_uploader(&config, "info");
        (self.uploader_b, self.uploader_b_addr) = (Some(daemon), addr);
    }

    /// SIGKILL of the second replica.
    fn kill_uploader_b(&mut self) {
        let daemon = self.uploader_b.take().expect("replica-b running");
        self.kill(daemon);
    }

    fn start_uploader(&mut self) {
        let config = self.write_uploader_config();
        let (daemon, addr) = spawn_uploader(&config, "debug");
        (self.uploader, self.uploader_addr) = (Some(daemon), addr);
    }

    /// The uploader's metrics address, from its log line.
    fn uploader_metrics_addr(&self) -> String {
        let log = self.uploader.as_ref().expect("uploader running").output();
        log.split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
            .expect("uploaderd logs its metrics address")
            .to_owned()
    }

    /// The vault's metrics address, from its log line.
    fn vault_metrics_addr(&self) -> String {
        let log = self.vault.as_ref().expect("vault running").output();
        log.split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split("/metrics").next())
            .expect("vaultd logs its metrics address")
            .to_owned()
    }

    /// SIGKILL, as a crash would.
    fn kill_uploader(&mut self) {
        let daemon = self.uploader.take().expect("uploader running");
        self.kill(daemon);
    }

    fn kill(&mut self, mut daemon: Daemon) {
        daemon.kill();
        self.past_logs.push(daemon.output());
    }

    /// Everything every daemon printed so far.
    fn logs(&self) -> String {
        let mut all = self.past_logs.join("\n");
        for d in [&self.vault, &self.uploader].into_iter().flatten() {
            all.push('\n');
            all.push_str(&d.output());
        }
        all
    }

    /// Failure context: the tail of each daemon's output.
    fn context(&self) -> String {
        let mut out = String::new();
        for (name, d) in [
            ("vaultd", &self.vault),
            ("uploaderd", &self.uploader),
            ("uploaderd replica-b", &self.uploader_b),
        ] {
            if let Some(d) = d {
                out.push_str(&format!(
                    "\n----- {name} (last 80 lines) -----\n{}\n",
                    tail(&d.output(), 80)
                ));
            }
        }
        for (i, past) in self.past_logs.iter().enumerate() {
            out.push_str(&format!(
                "\n----- stopped daemon #{i} (last 40 lines) -----\n{}\n",
                tail(past, 40)
            ));
        }
        out
    }

    fn channel(&self, addr: &str, identity: &str) -> Channel {
        tls::channel(addr, "localhost", &devcerts::files(&self.certs, identity)).unwrap()
    }

    fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel(&self.uploader_addr, "manager"))
    }

    /// Stores (or re-versions) the tenant's S3 credential in the vault as the manager.
    /// Sealed to the vault's sealing key, as the recvault CLI sends it.
    async fn put_credential(&self, secret_access_key: &str) -> vt::PutCredentialResponse {
        recvault_tests::client::put_credential(
            self.channel(&self.vault_addr, "manager"),
            TENANT,
            "s3-media",
            vt::CredentialKind::S3,
            recvault_runtime::secret::SecretBytes::new(
                self.s3.credential_json(secret_access_key).into_bytes(),
            ),
            None,
        )
        .await
        .unwrap_or_else(|s| panic!("PutCredential: {s}{}", self.context()))
    }

    async fn put_destination(&self, credential_id: &str) -> String {
        DestinationsClient::new(self.channel(&self.uploader_addr, "manager"))
            .put_destination(up::PutDestinationRequest {
                tenant_id: TENANT.into(),
                name: "s3s-fs".into(),
                provider: "s3".into(),
                endpoint: self.s3.endpoint.clone(),
                region: "us-east-1".into(),
                bucket: BUCKET.into(),
                prefix: PREFIX.into(),
                path_style: true,
                credential_id: credential_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("PutDestination: {s:?}{}", self.context()))
            .into_inner()
            .destination_id
    }

    /// Streams `data` as one recording: header, chunks of `chunk` bytes each
    /// with its CRC-32, trailer with the SHA-256 (optionally tampered with).
    async fn upload(
        &self,
        destination_id: &str,
        recording_id: &str,
        file_name: &str,
        data: &Arc<Vec<u8>>,
        chunk: usize,
        tamper: Tamper,
    ) -> Result<up::UploadResponse, tonic::Status> {
        let addr = self.uploader_addr.clone();
        self.upload_at(
            &addr,
            destination_id,
            recording_id,
            file_name,
            data,
            chunk,
            tamper,
        )
        .await
    }

    /// [`Rig::upload`] to the uploader at `addr`.
    #[allow(clippy::too_many_arguments)]
    async fn upload_at(
        &self,
        addr: &str,
        destination_id: &str,
        recording_id: &str,
        file_name: &str,
        data: &Arc<Vec<u8>>,
        chunk: usize,
        tamper: Tamper,
    ) -> Result<up::UploadResponse, tonic::Status> {
        let mut digest = sha256(data);
        if tamper == Tamper::TrailerSha256 {
            digest[0] ^= 0xff;
        }
        let header = up::UploadRequest {
            part: Some(Part::Header(up::UploadHeader {
                tenant_id: TENANT.into(),
                recording_id: recording_id.into(),
                file_name: file_name.into(),
                content_type: "video/mp4".into(),
                destination_id: destination_id.into(),
            })),
        };
        let bytes = data.clone();
        let chunks = (0..data.len().div_ceil(chunk)).map(move |i| {
            let piece = &bytes[i * chunk..((i + 1) * chunk).min(bytes.len())];
            let mut crc32 = crc32fast::hash(piece);
            if tamper == Tamper::ChunkCrc(i) {
                crc32 ^= 0x0000_0001;
            }
            up::UploadRequest {
                part: Some(Part::Chunk(up::Chunk {
                    data: piece.to_vec(),
                    crc32,
                })),
            }
        });
        let trailer = up::UploadRequest {
            part: Some(Part::Trailer(up::UploadTrailer {
                sha256: digest.to_vec(),
            })),
        };
        let messages = std::iter::once(header)
            .chain(chunks)
            .chain(std::iter::once(trailer));
        let mut client = RecordingsClient::new(self.channel(addr, "recorder"));
        let call = client.upload(tokio_stream::iter(messages));
        tokio::time::timeout(Duration::from_secs(60), call)
            .await
            .unwrap_or_else(|_| panic!("Upload did not answer in 60 s{}", self.context()))
            .map(tonic::Response::into_inner)
    }

    async fn get_job(&self, job_id: &str) -> up::Job {
        self.jobs()
            .get_job(up::GetJobRequest {
                job_id: job_id.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("GetJob: {s:?}{}", self.context()))
            .into_inner()
    }

    /// Polls GetJob until `done` holds, or fails with the job and the logs.
    async fn wait_job(
        &self,
        job_id: &str,
        what: &str,
        timeout: Duration,
        done: impl Fn(&up::Job) -> bool,
    ) -> up::Job {
        let deadline = Instant::now() + timeout;
        loop {
            let job = self.get_job(job_id).await;
            if done(&job) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {job_id} did not reach {what} within {timeout:?}; it is {:?} after {} attempts, last_error {:?}{}",
                state(&job),
                job.attempts,
                job.last_error,
                self.context()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn wait_state(&self, job_id: &str, want: up::JobState, timeout: Duration) -> up::Job {
        self.wait_job(job_id, want.as_str_name(), timeout, |j| state(j) == want)
            .await
    }

    async fn all_jobs(&self) -> Vec<up::Job> {
        self.jobs()
            .list_jobs(up::ListJobsRequest::default())
            .await
            .unwrap_or_else(|s| panic!("ListJobs: {s:?}{}", self.context()))
            .into_inner()
            .jobs
    }

    /// Files (not directories) under the backup store.
    fn backup_files(&self) -> Vec<PathBuf> {
        walk(&self.backup_dir())
    }

    async fn wait_backup_empty(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.backup_files().is_empty() {
            assert!(
                Instant::now() < deadline,
                "backup files left after delivery: {:?}{}",
                self.backup_files(),
                self.context()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The S3 secret (and its base64 forms) never appear in any daemon's output.
    fn assert_secret_not_logged(&self, secrets: &[&str]) {
        let logs = self.logs();
        assert!(
            logs.contains("uploader serving") && logs.contains("vault serving"),
            "expected captured logs"
        );
        assert!(
            logs.contains("DEBUG"),
            "the daemons should log at debug level"
        );
        for secret in secrets {
            let needles = [
                secret.to_string(),
                B64.encode(secret),
                B64.encode(self.s3.credential_json(secret)),
            ];
            for needle in &needles {
                assert!(
                    !logs.contains(needle.as_str()),
                    "the S3 secret (or its base64) appears in the daemons' logs"
                );
            }
        }
    }
}

fn state(job: &up::Job) -> up::JobState {
    up::JobState::try_from(job.state).unwrap_or(up::JobState::Unspecified)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return files;
    };
    for entry in entries {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

/// Copies the delivered object and its sidecar out of the bucket into a fresh
/// directory and runs the real `sha256sum -c` and `uploaderd verify` there.
fn check_download(rig: &Rig, name: &str, data: &[u8]) {
    let object = rig.s3.object_path(name);
    let stored = std::fs::read(&object)
        .unwrap_or_else(|e| panic!("{} missing: {e}{}", object.display(), rig.context()));
    assert!(stored == data, "object {name} is not byte-identical");
    let download = tempfile::tempdir().unwrap();
    std::fs::copy(&object, download.path().join(name)).unwrap();
    let sidecar = format!("{name}.sha256");
    std::fs::copy(rig.s3.object_path(&sidecar), download.path().join(&sidecar)).unwrap();
    let text = std::fs::read_to_string(download.path().join(&sidecar)).unwrap();
    assert_eq!(text, format!("{}  {name}\n", hex(&sha256(data))));

    let out = Command::new("sha256sum")
        .arg("-c")
        .arg(&sidecar)
        .current_dir(download.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("{name}: OK")),
        "sha256sum -c: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = Command::new(binary("uploaderd"))
        .arg("verify")
        .arg(download.path().join(name))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("OK"),
        "uploaderd verify: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // And it notices a changed byte.
    let mut bad = data.to_vec();
    bad[data.len() / 2] ^= 1;
    std::fs::write(download.path().join(name), bad).unwrap();
    let out = Command::new(binary("uploaderd"))
        .arg("verify")
        .arg(download.path().join(name))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "uploaderd verify must fail on a changed file: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn crc_header(data: &[u8]) -> String {
    B64.encode(crc32fast::hash(data).to_be_bytes())
}

// ---------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------

/// 1 (+6): a 3 MiB recording goes up as one PUT with its CRC-32, is verified
/// by the provider's checksum, arrives byte-identical with a sidecar that
/// `sha256sum -c` accepts, and its backup is deleted; a 40 MiB one goes
/// multipart with the FULL_OBJECT CRC-32 and is verified by reading it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recording_is_delivered_byte_identical_verified_and_backup_deleted() {
    let mut rig = Rig::new(Settings::default()).await;
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;

    // Small: single PUT.
    let small = random_bytes(3 * MIB, 1);
    let name = "call-0001.mp4";
    let reply = rig
        .upload(
            &destination,
            "rec-0001",
            name,
            &small,
            256 * 1024,
            Tamper::None,
        )
        .await
        .unwrap_or_else(|s| panic!("Upload: {s:?}{}", rig.context()));
    assert!(!reply.duplicate);
    assert_eq!(reply.size, small.len() as u64);
    assert_eq!(reply.sha256, sha256(&small));

    // Follow it with WatchJob until it settles.
    let mut watch = rig
        .jobs()
        .watch_job(up::WatchJobRequest {
            job_id: reply.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(60), async {
        let mut last = None;
        while let Some(job) = watch.message().await.unwrap() {
            seen.push(state(&job));
            last = Some(job);
        }
        last
    })
    .await
    .unwrap_or_else(|_| panic!("WatchJob did not settle; saw {seen:?}{}", rig.context()))
    .expect("WatchJob sent nothing");
    assert_eq!(
        state(&last),
        up::JobState::Delivered,
        "{last:?}{}",
        rig.context()
    );
    assert_eq!(last.verified_by, "provider-checksum", "{last:?}");
    assert_eq!(last.location, format!("s3://{BUCKET}/{PREFIX}/{name}"));
    let job = rig.get_job(&reply.job_id).await;
    assert_eq!(state(&job), up::JobState::Delivered);
    assert_eq!(job.sha256, sha256(&small));
    assert!(job.last_error.is_empty(), "{job:?}");

    // The PUT carried our CRC-32 as a plain header.
    let puts = rig.s3.requests("PutObject", name);
    assert!(!puts.is_empty(), "no PutObject for {name}");
    for put in &puts {
        assert_eq!(put.crc32.as_deref(), Some(crc_header(&small).as_str()));
    }
    check_download(&rig, name, &small);
    rig.wait_backup_empty().await;

    // Large: multipart, read back.
    let large = random_bytes(40 * MIB, 2);
    let name = "call-0002.mp4";
    let reply = rig
        .upload(&destination, "rec-0002", name, &large, MIB, Tamper::None)
        .await
        .unwrap_or_else(|s| panic!("Upload: {s:?}{}", rig.context()));
    let job = rig
        .wait_state(
            &reply.job_id,
            up::JobState::Delivered,
            Duration::from_secs(90),
        )
        .await;
    assert_eq!(job.verified_by, "read-back", "{job:?}");
    assert_eq!(job.size, large.len() as u64);
    assert!(
        rig.s3.requests("PutObject", name).is_empty(),
        "40 MiB must go multipart"
    );
    let parts = rig.s3.requests("UploadPart", name);
    assert_eq!(parts.len(), 5, "40 MiB in 8 MiB parts");
    assert!(
        parts.iter().all(|p| p.crc32.is_some()),
        "each part has a CRC-32"
    );
    let complete = rig.s3.requests("CompleteMultipartUpload", name);
    assert_eq!(complete.len(), 1);
    assert_eq!(
        complete[0].crc32.as_deref(),
        Some(crc_header(&large).as_str()),
        "the whole-object CRC-32 on complete"
    );
    assert_eq!(complete[0].checksum_type.as_deref(), Some("FULL_OBJECT"));
    assert!(rig.s3.open_multipart_files().is_empty());
    check_download(&rig, name, &large);
    rig.wait_backup_empty().await;

    let listed = rig
        .jobs()
        .list_jobs(up::ListJobsRequest {
            tenant_id: TENANT.into(),
            state: up::JobState::Delivered.into(),
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.jobs.len(), 2);

    // 6: the S3 secret never reached a log line (RUST_LOG=debug on both daemons).
    let secret = rig.s3.secret_key.clone();
    rig.assert_secret_not_logged(&[&secret]);
}

/// 2: a chunk with a wrong CRC-32 and a wrong trailer SHA-256 are refused
/// with DATA_LOSS, leaving no job and no file; the same recording sent twice
/// gives the same job, marked duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_intake_is_refused_without_a_trace_and_replays_are_idempotent() {
    let mut rig = Rig::new(Settings::default()).await;
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;
    let data = random_bytes(3 * MIB, 3);

    let err = rig
        .upload(
            &destination,
            "rec-bad-crc",
            "bad.mp4",
            &data,
            256 * 1024,
            Tamper::ChunkCrc(5),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("CRC-32"), "{}", err.message());
    assert!(err.message().contains("chunk 5"), "{}", err.message());
    assert!(
        rig.all_jobs().await.is_empty(),
        "a refused recording made a job"
    );
    assert!(
        rig.backup_files().is_empty(),
        "files left in the backup store: {:?}",
        rig.backup_files()
    );

    let err = rig
        .upload(
            &destination,
            "rec-bad-sha",
            "bad.mp4",
            &data,
            256 * 1024,
            Tamper::TrailerSha256,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DataLoss, "{err:?}");
    assert!(err.message().contains("SHA-256"), "{}", err.message());
    assert!(
        rig.all_jobs().await.is_empty(),
        "a refused recording made a job"
    );
    assert!(
        rig.backup_files().is_empty(),
        "files left in the backup store: {:?}",
        rig.backup_files()
    );
    assert!(rig.s3.requests("PutObject", "bad.mp4").is_empty());

    // The same recording id twice: one job.
    let first = rig
        .upload(
            &destination,
            "rec-twice",
            "twice.mp4",
            &data,
            256 * 1024,
            Tamper::None,
        )
        .await
        .unwrap();
    let second = rig
        .upload(
            &destination,
            "rec-twice",
            "twice.mp4",
            &data,
            512 * 1024,
            Tamper::None,
        )
        .await
        .unwrap();
    assert!(!first.duplicate);
    assert!(second.duplicate, "{second:?}");
    assert_eq!(first.job_id, second.job_id);
    assert_eq!(first.sha256, second.sha256);
    let jobs = rig.all_jobs().await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    rig.wait_state(
        &first.job_id,
        up::JobState::Delivered,
        Duration::from_secs(60),
    )
    .await;
    rig.wait_backup_empty().await;
    // Delivered once.
    assert_eq!(rig.s3.requests("PutObject", "twice.mp4").len(), 1);
    let secret = rig.s3.secret_key.clone();
    rig.assert_secret_not_logged(&[&secret]);
}

/// Local-directory destinations with the real `uploaderd`: one outside
/// `[destinations].fs_allowed_roots` and one through a symlink out of the
/// root are refused (INVALID_ARGUMENT naming the setting), a file name with
/// `..` is refused at the header; no destination, job, backup or file is
/// left anywhere. One inside the root delivers, and only there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_destinations_outside_the_allowed_roots_and_climbing_names_are_refused() {
    let mut rig = Rig::new(Settings::default()).await;
    rig.start_uploader();
    let outside = tempfile::tempdir().unwrap();
    let destinations = || DestinationsClient::new(rig.channel(&rig.uploader_addr, "manager"));
    let fs = |name: &str, bucket: &Path| up::PutDestinationRequest {
        tenant_id: TENANT.into(),
        name: name.into(),
        provider: "fs".into(),
        bucket: bucket.display().to_string(),
        prefix: "calls".into(),
        ..Default::default()
    };

    let link = rig.fs_root().join("link");
    std::os::unix::fs::symlink(outside.path(), &link).unwrap();
    for (name, bucket) in [("outside", outside.path()), ("symlink", link.as_path())] {
        let status = destinations()
            .put_destination(fs(name, bucket))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{name}: {status:?}");
        for part in [
            "not inside an allowed root",
            "[destinations].fs_allowed_roots in the uploader config",
            &rig.fs_root().display().to_string(),
        ] {
            assert!(
                status.message().contains(part),
                "{name}: {}",
                status.message()
            );
        }
    }
    let listed = destinations()
        .list_destinations(up::ListDestinationsRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .destinations;
    assert!(listed.is_empty(), "{listed:?}");

    let inside = rig.fs_root().join("acme");
    std::fs::create_dir_all(&inside).unwrap();
    let destination = destinations()
        .put_destination(fs("inside", &inside))
        .await
        .unwrap_or_else(|s| panic!("PutDestination: {s:?}{}", rig.context()))
        .into_inner()
        .destination_id;
    let data = random_bytes(64 * 1024, 21);
    let err = rig
        .upload(
            &destination,
            "rec-climb",
            "../../authorized_keys",
            &data,
            16 * 1024,
            Tamper::None,
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("file_name"), "{}", err.message());
    assert!(
        rig.all_jobs().await.is_empty(),
        "a refused recording made a job"
    );
    assert!(rig.backup_files().is_empty(), "{:?}", rig.backup_files());
    assert!(
        walk(&rig.fs_root()).is_empty(),
        "{:?}",
        walk(&rig.fs_root())
    );
    assert!(walk(outside.path()).is_empty());
    assert!(!rig.root.join("authorized_keys").exists());

    // Inside the root: delivered there, and nowhere else.
    let ok = rig
        .upload(
            &destination,
            "rec-ok",
            "call.mp4",
            &data,
            16 * 1024,
            Tamper::None,
        )
        .await
        .unwrap();
    rig.wait_state(&ok.job_id, up::JobState::Delivered, Duration::from_secs(60))
        .await;
    assert_eq!(std::fs::read(inside.join("calls/call.mp4")).unwrap(), *data);
    let mut delivered = walk(&inside);
    delivered.sort();
    assert_eq!(
        delivered,
        [
            inside.join("calls/call.mp4"),
            inside.join("calls/call.mp4.sha256")
        ]
    );
    assert!(walk(outside.path()).is_empty());
}

/// Tenant scoping with the real binaries: `manager-demo` holds only the
/// tenant `demo`. Every call it makes about an `acme` job or destination is
/// answered NOT_FOUND, worded exactly as for an id that does not exist (so the
/// answer does not tell whether the id exists); calls that name `acme`
/// themselves are PERMISSION_DENIED. Nothing is changed or returned, every
/// refusal is an audit event with the caller's identity, fingerprint, tenant
/// and job, and the chain verifies online and offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_jobs_and_destinations_are_not_found_and_audited() {
    let mut rig = Rig::new(Settings {
        retries: Retries::Fast { doubtful: 1 },
        ..Settings::default()
    })
    .await;
    rig.start_uploader();
    // An acme job whose backup is kept: the credential is unknown to the vault.
    let destination = rig.put_destination("cred-unknown").await;
    let data = random_bytes(64 * 1024, 31);
    let job_id = rig
        .upload(
            &destination,
            "rec-acme",
            "acme.mp4",
            &data,
            16 * 1024,
            Tamper::None,
        )
        .await
        .unwrap_or_else(|s| panic!("Upload: {s:?}{}", rig.context()))
        .job_id;
    rig.wait_state(&job_id, up::JobState::Retained, Duration::from_secs(60))
        .await;
    let history_before = rig
        .jobs()
        .get_job_history(up::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();

    let demo = rig.channel(&rig.uploader_addr, "manager-demo");
    let mut jobs = JobsClient::new(demo.clone());
    let mut destinations = DestinationsClient::new(demo);
    let missing = "00000000-0000-4000-8000-000000000000";
    // The answer about acme's id, and about an id that does not exist.
    let get = |id: &str| up::GetJobRequest { job_id: id.into() };
    let refused = [
        jobs.get_job(get(&job_id)).await.map(drop),
        jobs.get_job_history(up::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .map(drop),
        jobs.resend_job(up::ResendJobRequest {
            job_id: job_id.clone(),
            destination_id: String::new(),
        })
        .await
        .map(drop),
        match jobs
            .fetch_backup(up::FetchBackupRequest {
                job_id: job_id.clone(),
            })
            .await
        {
            // A stream that opened must fail before its first byte.
            Ok(stream) => {
                let mut stream = stream.into_inner();
                match stream.message().await {
                    Ok(Some(m)) => panic!("FetchBackup sent {} bytes of acme's", m.data.len()),
                    Ok(None) => Ok(()),
                    Err(s) => Err(s),
                }
            }
            Err(s) => Err(s),
        },
        match jobs
            .watch_job(up::WatchJobRequest {
                job_id: job_id.clone(),
            })
            .await
        {
            Ok(stream) => stream.into_inner().message().await.map(drop),
            Err(s) => Err(s),
        },
    ];
    for (i, answer) in refused.into_iter().enumerate() {
        let status = answer.expect_err("manager-demo reached an acme job");
        assert_eq!(status.code(), Code::NotFound, "call #{i}: {status:?}");
        assert!(status.message().contains(&job_id), "{status:?}");
    }
    let absent = jobs.get_job(get(missing)).await.unwrap_err();
    let hidden = jobs.get_job(get(&job_id)).await.unwrap_err();
    assert_eq!(absent.code(), hidden.code());
    assert_eq!(
        absent.message().replace(missing, "ID"),
        hidden.message().replace(&job_id, "ID"),
        "the refusal must read as for an id that does not exist"
    );
    let status = destinations
        .delete_destination(up::DeleteDestinationRequest {
            destination_id: destination.clone(),
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    for status in [
        jobs.list_jobs(up::ListJobsRequest {
            tenant_id: TENANT.into(),
            ..Default::default()
        })
        .await
        .unwrap_err(),
        destinations
            .list_destinations(up::ListDestinationsRequest {
                tenant_id: TENANT.into(),
            })
            .await
            .unwrap_err(),
    ] {
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        assert!(status.message().contains(TENANT), "{status:?}");
    }
    // Its own tenant works, and shows nothing of acme's; unscoped ListJobs
    // lists only the tenants it holds.
    let own = jobs
        .list_jobs(up::ListJobsRequest {
            tenant_id: "demo".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(own.is_empty(), "{own:?}");
    let unscoped = jobs
        .list_jobs(up::ListJobsRequest::default())
        .await
        .map(|r| r.into_inner().jobs);
    if let Ok(listed) = &unscoped {
        assert!(listed.iter().all(|j| j.tenant_id == "demo"), "{listed:?}");
    }

    // Nothing changed: acme's job, history, destination and backup as before.
    let job = rig.get_job(&job_id).await;
    assert_eq!(state(&job), up::JobState::Retained);
    let history_after = rig
        .jobs()
        .get_job_history(up::GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history_before, history_after);
    assert_eq!(rig.backup_files().len(), 1);
    let listed = DestinationsClient::new(rig.channel(&rig.uploader_addr, "manager"))
        .list_destinations(up::ListDestinationsRequest {
            tenant_id: TENANT.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .destinations;
    assert_eq!(listed.len(), 1);

    // Every refusal is audited as denied, with who, what and which job.
    let mut audit = up::audit_client::AuditClient::new(rig.channel(&rig.uploader_addr, "auditor"));
    let mut stream = audit
        .query_events(vt::QueryEventsRequest {
            filter: Some(vt::AuditFilter {
                identity: devcerts::spiffe_id("manager-demo"),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut events = Vec::new();
    while let Some(e) = stream.message().await.unwrap() {
        events.push(e);
    }
    for method in [
        "GetJob",
        "GetJobHistory",
        "ResendJob",
        "FetchBackup",
        "WatchJob",
        "DeleteDestination",
        "ListJobs",
        "ListDestinations",
    ] {
        let found: Vec<_> = events
            .iter()
            .filter(|e| e.operation.ends_with(&format!("/{method}")) && e.tenant_id == TENANT)
            .collect();
        assert!(!found.is_empty(), "no acme event for {method}: {events:#?}");
        for e in found {
            assert_eq!(e.outcome, "denied", "{e:?}");
            assert!(
                !e.request_id.is_empty() && e.cert_fingerprint.len() == 64,
                "{e:?}"
            );
            if method.ends_with("Job") || method == "GetJobHistory" || method == "FetchBackup" {
                assert_eq!(e.job_id, job_id, "{e:?}");
                assert_eq!(e.code, "NOT_FOUND", "{e:?}");
            }
        }
    }
    let verified = audit
        .verify_chain(vt::VerifyChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "{verified:?}");
    rig.stop_uploader();
    let out = Command::new(binary("uploaderd"))
        .args(["audit", "verify", "--config"])
        .arg(rig.root.join("uploader.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "uploaderd audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// 3 (+6): a wrong S3 secret in the vault is a permanent auth error: the job
/// is RETAINED with the reason and its backup can be fetched back; after a new
/// credential version with the right secret, ResendJob delivers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_is_retained_with_backup_then_resend_after_fix_delivers() {
    let mut rig = Rig::new(Settings::default()).await;
    let wrong = unique("Wr0ng-e2e-secret-");
    let first = rig.put_credential(&wrong).await;
    assert_eq!(first.version, 1);
    rig.start_uploader();
    let destination = rig.put_destination(&first.credential_id).await;

    let data = random_bytes(2 * MIB + 12345, 4);
    let name = "call-denied.mp4";
    let reply = rig
        .upload(
            &destination,
            "rec-denied",
            name,
            &data,
            256 * 1024,
            Tamper::None,
        )
        .await
        .unwrap();
    let job = rig
        .wait_state(
            &reply.job_id,
            up::JobState::Retained,
            Duration::from_secs(60),
        )
        .await;
    eprintln!("RETAINED: {}", job.last_error);
    let reason = job.last_error.to_lowercase();
    assert!(
        reason.contains("signaturedoesnotmatch")
            || reason.contains("access")
            || reason.contains("auth"),
        "the reason should name the auth failure: {}",
        job.last_error
    );
    // A permanent error is not retried, even when the server refused the
    // signature before reading the streamed body and the client saw a broken
    // pipe instead of the 403 (the uploader then asks without a body).
    assert_eq!(job.attempts, 1, "a permanent error is not retried: {job:?}");
    assert_eq!(rig.backup_files().len(), 1, "the backup is kept");
    assert!(!rig.s3.object_path(name).exists());

    // FetchBackup streams it back with its SHA-256.
    let mut stream = rig
        .jobs()
        .fetch_backup(up::FetchBackupRequest {
            job_id: reply.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut fetched = Vec::new();
    let mut digest = Vec::new();
    while let Some(m) = stream.message().await.unwrap() {
        if !m.data.is_empty() {
            assert_eq!(crc32fast::hash(&m.data), m.crc32);
        }
        fetched.extend_from_slice(&m.data);
        if !m.sha256.is_empty() {
            digest = m.sha256;
        }
    }
    assert!(fetched == *data, "FetchBackup returned other bytes");
    assert_eq!(digest, sha256(&data));

    // Fix the credential: same tenant and name → same id, next version.
    let fixed = rig.put_credential(&rig.s3.secret_key.clone()).await;
    assert_eq!(fixed.credential_id, first.credential_id);
    assert_eq!(fixed.version, 2);
    let resent = rig
        .jobs()
        .resend_job(up::ResendJobRequest {
            job_id: reply.job_id.clone(),
            destination_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resent.job_id, reply.job_id);
    let job = rig
        .wait_state(
            &reply.job_id,
            up::JobState::Delivered,
            Duration::from_secs(60),
        )
        .await;
    assert!(job.last_error.is_empty(), "{job:?}");
    check_download(&rig, name, &data);
    rig.wait_backup_empty().await;

    // 6: neither the wrong nor the right secret reached a log line.
    let secret = rig.s3.secret_key.clone();
    rig.assert_secret_not_logged(&[&wrong, &secret]);
}

/// 4: with the vault down, attempts fail as transient and the job is
/// RETRYING with a reason that names the vault; once the vault is back on the
/// same address the job is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vault_down_means_retrying_and_delivery_once_it_returns() {
    let mut rig = Rig::new(Settings {
        vault_port: Some(free_port()),
        ..Settings::default()
    })
    .await;
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;
    rig.stop_vault();

    let data = random_bytes(MIB + 7, 5);
    let name = "call-vault-down.mp4";
    let reply = rig
        .upload(
            &destination,
            "rec-vault-down",
            name,
            &data,
            256 * 1024,
            Tamper::None,
        )
        .await
        .unwrap();
    let job = rig
        .wait_job(
            &reply.job_id,
            "RETRYING because of the vault",
            Duration::from_secs(30),
            |j| state(j) == up::JobState::Retrying && j.last_error.to_lowercase().contains("vault"),
        )
        .await;
    eprintln!("RETRYING while the vault is down: {}", job.last_error);
    assert!(!rig.s3.object_path(name).exists());
    // Ingest needed no vault: the backup is encrypted to its wrapping key.
    let backup = std::fs::read(&rig.backup_files()[0]).unwrap();
    assert!(backup.starts_with(b"RVBK"), "encrypted backup header");
    assert!(
        !backup.windows(64).any(|w| w == &data[4096..4160]),
        "plaintext in the backup store"
    );
    // A few attempts fail while the vault stays down; none of them gives up.
    rig.wait_job(
        &reply.job_id,
        "a second failed attempt",
        Duration::from_secs(30),
        |j| j.attempts > job.attempts && state(j) == up::JobState::Retrying,
    )
    .await;
    assert_eq!(rig.backup_files().len(), 1, "the backup is kept");

    rig.start_vault();
    let job = rig
        .wait_state(
            &reply.job_id,
            up::JobState::Delivered,
            Duration::from_secs(60),
        )
        .await;
    assert!(job.attempts >= 2, "{job:?}");
    check_download(&rig, name, &data);
    rig.wait_backup_empty().await;
    let secret = rig.s3.secret_key.clone();
    rig.assert_secret_not_logged(&[&secret]);
}

/// What is down for a minute in [`an_outage_of_a_minute_delivers_everything`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outage {
    Vault,
    S3,
}

/// With the retry settings uploaderd ships with (no retry line in its
/// config), the vault or the S3 server down for 60 s while 10 recordings are
/// due: none is RETAINED during or after the outage, all are DELIVERED
/// byte-identical once it ends, and both audit chains verify.
async fn an_outage_of_a_minute_delivers_everything(outage: Outage) {
    const OUTAGE: Duration = Duration::from_secs(60);
    let mut rig = Rig::new(Settings {
        retries: Retries::Shipped,
        vault_port: Some(free_port()),
        ..Settings::default()
    })
    .await;
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;
    match outage {
        Outage::Vault => rig.stop_vault(),
        Outage::S3 => rig.s3.stop(),
    }
    let down = Instant::now();
    let mut recordings = Vec::new();
    for i in 0..10u64 {
        let data = random_bytes(64 * 1024 + i as usize, 100 + i);
        let name = format!("outage-{i}.mp4");
        let job_id = rig
            .upload(
                &destination,
                &format!("rec-outage-{i}"),
                &name,
                &data,
                16 * 1024,
                Tamper::None,
            )
            .await
            .unwrap_or_else(|s| panic!("Upload during the outage: {s:?}{}", rig.context()))
            .job_id;
        recordings.push((job_id, name, data));
    }
    // During the outage: attempts fail and are scheduled again, never given up.
    let mut max_attempts = 0;
    while down.elapsed() < OUTAGE {
        for job in rig.all_jobs().await {
            assert_ne!(
                state(&job),
                up::JobState::Retained,
                "RETAINED during a {outage:?} outage of {:?}: {job:?}{}",
                down.elapsed(),
                rig.context()
            );
            assert_ne!(state(&job), up::JobState::Delivered, "{job:?}");
            max_attempts = max_attempts.max(job.attempts);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let job = rig.get_job(&recordings[0].0).await;
    eprintln!(
        "{outage:?} down {:?}: up to {max_attempts} attempts per job; job 0 is {:?}, next attempt {:?}: {}",
        down.elapsed(),
        state(&job),
        job.next_attempt_at,
        job.last_error
    );
    assert!(
        max_attempts >= 2,
        "attempts should have failed during the outage"
    );
    assert!(
        job.next_attempt_at.is_some(),
        "a waiting job shows when it tries next: {job:?}"
    );
    match outage {
        Outage::Vault => rig.start_vault(),
        Outage::S3 => rig.s3.restart().await,
    }
    let back = Instant::now();
    // The backoff ceiling after a minute of failures is about 64 s (full jitter).
    for (job_id, name, data) in &recordings {
        let job = rig
            .wait_job(job_id, "DELIVERED", Duration::from_secs(330), |j| {
                assert_ne!(state(j), up::JobState::Retained, "{j:?}");
                state(j) == up::JobState::Delivered
            })
            .await;
        assert!(job.last_error.is_empty(), "{job:?}");
        check_download(&rig, name, data);
    }
    eprintln!(
        "{outage:?}: all 10 delivered {:?} after it returned",
        back.elapsed()
    );
    rig.wait_backup_empty().await;
    let history = rig
        .jobs()
        .get_job_history(up::GetJobRequest {
            job_id: recordings[0].0.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        history
            .events
            .iter()
            .any(|e| e.message.contains("(transient), retrying at")),
        "the history says why and when: {history:?}"
    );
    let metrics = recvault_tests::http_get(&rig.uploader_metrics_addr(), "/metrics");
    assert!(
        metrics.contains("recvault_uploader_retries_total{class=\"transient\"}"),
        "{metrics}"
    );
    let verified = up::audit_client::AuditClient::new(rig.channel(&rig.uploader_addr, "auditor"))
        .verify_chain(vt::VerifyChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "uploader chain: {verified:?}");
    let verified = vt::audit_client::AuditClient::new(rig.channel(&rig.vault_addr, "auditor"))
        .verify_chain(vt::VerifyChainRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(verified.ok, "vault chain: {verified:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_vault_down_for_a_minute_with_shipped_retries_delivers_everything() {
    an_outage_of_a_minute_delivers_everything(Outage::Vault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_s3_server_down_for_a_minute_with_shipped_retries_delivers_everything() {
    an_outage_of_a_minute_delivers_everything(Outage::S3).await;
}

/// 5: uploaderd is SIGKILLed while a multipart upload is in progress; on
/// restart with the same database and backup store the job resumes and is
/// delivered once, byte-identical, with no multipart upload left open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_multipart_upload_then_restart_delivers_once() {
    let mut rig = Rig::new(Settings {
        multipart_threshold: 8 * MIB,
        part_size: 5 * MIB,
        part_concurrency: 1,
        ..Settings::default()
    })
    .await;
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;

    let data = random_bytes(60 * MIB, 6);
    let name = "call-sigkill.mp4";
    let mut watch_client = rig.jobs();
    let reply = rig
        .upload(&destination, "rec-sigkill", name, &data, MIB, Tamper::None)
        .await
        .unwrap();
    let mut watch = watch_client
        .watch_job(up::WatchJobRequest {
            job_id: reply.job_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    // Kill once at least one part is up and the upload is far from done.
    let progress = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(job) = watch.message().await.unwrap() {
            if state(&job) == up::JobState::Uploading && job.bytes_sent > 0 {
                return Some(job.bytes_sent);
            }
            if state(&job) != up::JobState::Uploading && state(&job) != up::JobState::Stored {
                return None;
            }
        }
        None
    })
    .await
    .unwrap_or_else(|_| panic!("no upload progress within 60 s{}", rig.context()));
    let sent = progress.unwrap_or_else(|| {
        panic!(
            "the job left UPLOADING before any progress was seen{}",
            rig.context()
        )
    });
    rig.kill_uploader();
    assert!(
        sent < data.len() as u64,
        "killed after {sent} of {} bytes",
        data.len()
    );
    assert!(
        rig.s3.requests("CompleteMultipartUpload", name).is_empty(),
        "the upload completed before the kill; nothing was tested{}",
        rig.context()
    );
    assert!(
        !rig.s3.object_path(name).exists(),
        "object exists before the restart"
    );
    assert_eq!(rig.backup_files().len(), 1, "the backup survives the kill");
    let creates_before = rig.s3.requests("CreateMultipartUpload", name).len();

    rig.start_uploader();
    let job = rig
        .wait_state(
            &reply.job_id,
            up::JobState::Delivered,
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(job.verified_by, "read-back", "{job:?}");
    assert!(job.attempts >= 2, "{job:?}");
    check_download(&rig, name, &data);
    rig.wait_backup_empty().await;

    let complete = rig.s3.requests("CompleteMultipartUpload", name);
    assert_eq!(complete.len(), 1, "delivered exactly once");
    // Resuming the upload or aborting it and starting afresh are both fine;
    // leaving one open is not.
    let resumed = rig.s3.requests("CreateMultipartUpload", name).len() == creates_before;
    eprintln!("after the restart the multipart upload was resumed: {resumed}");
    let open = rig.s3.open_multipart_files();
    assert!(open.is_empty(), "multipart uploads left open: {open:?}");
    assert_eq!(rig.all_jobs().await.len(), 1);
    let secret = rig.s3.secret_key.clone();
    rig.assert_secret_not_logged(&[&secret]);
}

/// 6. Break-glass: recordings ingested by the real uploaderd while the vault
/// is stopped are decrypted by `deploy/recovery/recover_backup.py` with the
/// master key file alone (Python `pyhpke` and `cryptography`, an independent
/// implementation), byte-identical, for sizes around the segment boundaries;
/// a tampered backup makes it fail with exit status 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn break_glass_script_recovers_backups_with_the_master_key_alone() {
    let python = recvault_tests::python_recovery_tools();
    let mut rig = Rig::new(Settings::default()).await;
    rig.stop_vault();
    rig.start_uploader();
    let destination = rig.put_destination("cred-unused").await;
    let script = recvault_tests::workspace_root().join("deploy/recovery/recover_backup.py");
    let master_key = rig.root.join("vault/master.key");
    let recover = |backup: &Path, sha: Option<&str>| {
        let mut cmd = Command::new("python3");
        cmd.arg(&script).arg("--master-key").arg(&master_key);
        if let Some(sha) = sha {
            cmd.args(["--sha256", sha]);
        }
        cmd.arg(backup).env("PYTHONPATH", &python).output().unwrap()
    };
    for (i, len) in [0, 1, 64 * 1024, 64 * 1024 + 1, 3 * MIB + 11]
        .into_iter()
        .enumerate()
    {
        let data = random_bytes(len, 40 + i as u64);
        let reply = rig
            .upload(
                &destination,
                &format!("rec-glass-{i}"),
                &format!("glass-{i}.mp4"),
                &data,
                256 * 1024,
                Tamper::None,
            )
            .await
            .unwrap_or_else(|s| panic!("ingest with the vault stopped: {s:?}{}", rig.context()));
        let backup = rig
            .backup_files()
            .into_iter()
            .find(|p| p.ends_with(&reply.job_id))
            .unwrap_or_else(|| panic!("no backup for job {}", reply.job_id));
        let out = recover(&backup, Some(&hex(&sha256(&data))));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "recover_backup.py failed for {len} bytes:\n{stderr}"
        );
        assert!(
            out.stdout == *data,
            "{len} bytes recovered differ:\n{stderr}"
        );
        assert!(stderr.contains(&hex(&sha256(&data))), "{stderr}");

        if len > 64 * 1024 {
            let mut tampered = std::fs::read(&backup).unwrap();
            let n = tampered.len();
            tampered[n - 100] ^= 0x01;
            let copy = rig.root.join(format!("tampered-{i}"));
            std::fs::write(&copy, &tampered).unwrap();
            let out = recover(&copy, None);
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(1), "{stderr}");
            assert!(stderr.contains("does not authenticate"), "{stderr}");
        }
    }
    // A wrong master key opens nothing.
    let wrong = rig.root.join("wrong.key");
    std::fs::write(&wrong, format!("{}\n", "ab".repeat(32))).unwrap();
    let backup = rig.backup_files()[0].clone();
    let out = Command::new("python3")
        .arg(&script)
        .arg("--master-key")
        .arg(&wrong)
        .arg(&backup)
        .env("PYTHONPATH", &python)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("does not open"), "{stderr}");
    assert!(out.stdout.is_empty());
}

/// The value of an unlabelled metric in a Prometheus text exposition.
fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// 9: secrets purged from memory. The S3 secret (a unique 40-character
/// marker) is put sealed, three recordings are delivered through it (two
/// single PUTs, one multipart), and once the vault counts no active lease the
/// memory of both real processes is read through `/proc/PID/mem`, 5 s and
/// 25 s later: no copy of the marker, raw or base64 at any alignment, in
/// either. Needs root; skipped with the reason elsewhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_copy_of_the_credential_stays_in_either_process_after_release() {
    if let Some(why) = recvault_tests::memscan::unavailable() {
        println!("skipped: {why}");
        return;
    }
    let mut rig = Rig::new(Settings::default()).await;
    let marker = rig.s3.secret_key.clone();
    assert_eq!(marker.len(), 40, "{marker}");
    let credential = rig.put_credential(&marker).await;
    rig.start_uploader();
    let destination = rig.put_destination(&credential.credential_id).await;
    for (i, size) in [3 * MIB, 2 * MIB, 20 * MIB].into_iter().enumerate() {
        let data = random_bytes(size, 900 + i as u64);
        let reply = rig
            .upload(
                &destination,
                &format!("rec-mem-{i}"),
                &format!("mem-{i}.mp4"),
                &data,
                MIB,
                Tamper::None,
            )
            .await
            .unwrap_or_else(|s| panic!("Upload: {s:?}{}", rig.context()));
        rig.wait_state(
            &reply.job_id,
            up::JobState::Delivered,
            Duration::from_secs(90),
        )
        .await;
    }
    // Every lease released (the uploader releases after each attempt).
    let vault_metrics = rig.vault_metrics_addr();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = recvault_tests::http_get(&vault_metrics, "/metrics");
        let granted = text
            .lines()
            .find_map(|l| {
                l.strip_prefix("recvault_vault_leases_total{outcome=\"granted\"} ")?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        let active = metric_value(&text, "recvault_vault_leases_active").unwrap_or(-1.0);
        if granted >= 3.0 && active == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leases granted {granted}, active {active}{}",
            rig.context()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let released = Instant::now();

    let needles = recvault_tests::memscan::needles(&marker);
    let pids = [
        ("vaultd", rig.vault.as_ref().unwrap().pid()),
        ("uploaderd", rig.uploader.as_ref().unwrap().pid()),
    ];
    let mut found = Vec::new();
    for after in [5u64, 25] {
        tokio::time::sleep_until((released + Duration::from_secs(after)).into()).await;
        for (name, pid) in pids {
            let (hits, scanned) = recvault_tests::memscan::scan(pid, &needles)
                .unwrap_or_else(|e| panic!("reading {name}'s memory: {e}"));
            println!(
                "{name} (pid {pid}) {after} s after the last release: {} copies of the marker in {} MiB read",
                hits.len(),
                scanned / MIB as u64
            );
            assert!(
                scanned > MIB as u64,
                "{name}: only {scanned} bytes readable"
            );
            for hit in hits {
                found.push(format!(
                    "{name} +{after}s: {} at {:#x} in {}",
                    hit.form, hit.address, hit.mapping
                ));
            }
        }
    }
    assert!(
        found.is_empty(),
        "copies of the credential's secret left in memory:\n{}",
        found.join("\n")
    );
}

/// Two uploaderd replicas on one PostgreSQL job store and one object-store
/// backup bucket. Recordings (1–24 MiB, single PUT and multipart) go to
/// either replica at random while replica-b is SIGKILLed three times and
/// restarted (a recorder whose Upload failed sends it again to the other
/// replica). At the end every recording is DELIVERED once, byte-identical at
/// the destination, every backup object is gone, no multipart upload is
/// open at either server, and the histories say which replica did what
/// (both delivered some; a killed replica's claims were taken over).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_share_the_work_through_kills_and_deliver_each_recording_once() {
    if recvault_tests::postgres::Postgres::shared().is_none() {
        return;
    }
    let mut rig = Rig::new(Settings {
        replicas: true,
        multipart_threshold: 8 * MIB,
        part_size: 5 * MIB,
        ..Settings::default()
    })
    .await;
    rig.start_uploader();
    rig.start_uploader_b();
    let credential = rig.put_credential(&rig.s3.secret_key.clone()).await;
    let destination = rig.put_destination(&credential.credential_id).await;

    const N: usize = 40;
    let mut seed = 0x5eed_u64;
    let mut sent: Vec<(String, Arc<Vec<u8>>, String)> = Vec::new();
    let mut kills = 0;
    for i in 0..N {
        let size = MIB + (splitmix(&mut seed) as usize % (23 * MIB));
        let data = random_bytes(size, i as u64);
        let name = format!("replica-{i:03}.mp4");
        let to_b = splitmix(&mut seed).is_multiple_of(2) && rig.uploader_b.is_some();
        let addr = if to_b {
            rig.uploader_b_addr.clone()
        } else {
            rig.uploader_addr.clone()
        };
        let recording = format!("rec-{i}");
        let reply = match rig
            .upload_at(
                &addr,
                &destination,
                &recording,
                &name,
                &data,
                MIB,
                Tamper::None,
            )
            .await
        {
            Ok(reply) => reply,
            // That replica was killed under the call: send it to the other.
            Err(_) => {
                let other = rig.uploader_addr.clone();
                rig.upload_at(
                    &other,
                    &destination,
                    &recording,
                    &name,
                    &data,
                    MIB,
                    Tamper::None,
                )
                .await
                .unwrap_or_else(|s| panic!("Upload {i}: {s:?}{}", rig.context()))
            }
        };
        sent.push((name, data, reply.job_id));
        // Kill replica-b three times while it holds work, then bring it back.
        if i % 12 == 8 && kills < 3 {
            tokio::time::sleep(Duration::from_millis(300)).await;
            rig.kill_uploader_b();
            kills += 1;
            tokio::time::sleep(Duration::from_secs(1)).await;
            rig.start_uploader_b();
        }
    }
    assert_eq!(kills, 3);

    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    for (name, data, job_id) in &sent {
        let job = loop {
            let job = rig.get_job(job_id).await;
            if state(&job) == up::JobState::Delivered || std::time::Instant::now() > deadline {
                break job;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        assert_eq!(
            state(&job),
            up::JobState::Delivered,
            "{name}: {job:?}{}",
            rig.context()
        );
        check_download(&rig, name, data);
    }
    // Backups deleted (a moment after DELIVERED), nothing open anywhere.
    let (_, bucket) = rig.shared.as_ref().unwrap();
    let backups = bucket.root.path().join(BUCKET).join("backups");
    let gone = || walk(&backups).into_iter().filter(|p| p.is_file()).count();
    for _ in 0..50 {
        if gone() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(gone(), 0, "backup objects left: {:?}", walk(&backups));
    assert!(
        bucket.open_multipart_files().is_empty(),
        "{:?}",
        bucket.open_multipart_files()
    );
    assert!(
        rig.s3.open_multipart_files().is_empty(),
        "{:?}",
        rig.s3.open_multipart_files()
    );

    // Who did what: both replicas delivered, every history names a replica.
    let mut delivered_by = std::collections::BTreeMap::<String, usize>::new();
    let mut takeovers = 0;
    for (_, _, job_id) in &sent {
        let history = rig
            .jobs()
            .get_job_history(up::GetJobRequest {
                job_id: job_id.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .events;
        assert!(
            history.iter().all(|e| e.replica.starts_with("replica-")),
            "{history:?}"
        );
        let delivered = history
            .iter()
            .filter(|e| e.message.starts_with("delivered to"))
            .collect::<Vec<_>>();
        assert_eq!(delivered.len(), 1, "delivered exactly once: {history:?}");
        *delivered_by
            .entry(delivered[0].replica.clone())
            .or_default() += 1;
        takeovers += history
            .iter()
            .filter(|e| e.message.contains("expired") || e.message.contains("stopped while"))
            .count();
    }
    eprintln!(
        "deliveries per replica: {delivered_by:?}; attempts taken over or recovered: {takeovers}"
    );
    assert_eq!(
        delivered_by.len(),
        2,
        "both replicas delivered: {delivered_by:?}"
    );
}
