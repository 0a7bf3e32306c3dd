//! `recvault dev`: the main job on embedded defaults, in one command. Sets up
//! `.dev/` on the first run (master key, dev certificates, configs), starts the
//! real `vaultd` and `uploaderd` as separate processes (only the vault process
//! ever holds the master key), then proves the whole path: a demo credential,
//! a local-directory destination, a sample recording streamed through ingest,
//! delivered, verified against its sidecar, with the job's history and the
//! vault's audit events for it. Then it keeps serving until Ctrl-C.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use recvault_proto::{
    uploader::v1::{
        self as up, audit_client::AuditClient as UploaderAuditClient,
        destinations_client::DestinationsClient, jobs_client::JobsClient,
    },
    vault::v1::{self as va, audit_client::AuditClient},
};
use recvault_runtime::secret::SecretBytes;
use tonic_health_probe::wait_serving;

use crate::client::{self, Endpoints};

/// Ports of the main job (fixed so the README's grpcurl recipes work as written).
pub const VAULT_ADDR: &str = "127.0.0.1:7443";
pub const UPLOADER_ADDR: &str = "127.0.0.1:7444";
const DEMO_TENANT: &str = "demo";
/// Size of the generated sample recording.
const SAMPLE_BYTES: usize = 8 * 1024 * 1024;

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// The uploader config the dev runner writes (every field is documented in
/// deploy/config/uploader.example.toml).
fn uploader_config(dir: &Path, addrs: &Addrs) -> String {
    let certs = absolute(&dir.join("certs"));
    let up = absolute(&dir.join("uploader"));
    let delivered = absolute(&dir.join("delivered"));
    let c = |n: &str| certs.join(n).display().to_string();
    format!(
        "# Written by `recvault dev`; fields are documented in deploy/config/uploader.example.toml.\n\
         listen = \"{}\"\n\
         metrics_listen = \"{}\"\n\
         database = \"{}\"\n\
         backup_dir = \"{}\"\n\
         policy_file = \"{}\"\n\
         audit_database = \"{}\"\n\
         audit_key_file = \"{}\"\n\n\
         [backup]\nwrapping_key_file = \"{}\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         [vault]\nendpoint = \"{}\"\n\n\
         [vault.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         # The demo's local-directory destination; fs destinations elsewhere are refused.\n\
         [destinations]\nfs_allowed_roots = [\"{}\"]\n\n\
         [delivery]\nretry_base_ms = 500\nretry_max_secs = 10\n",
        addrs.uploader,
        metrics_addr(&addrs.uploader, UPLOADER_ADDR, "127.0.0.1:9444"),
        up.join("uploader.db").display(),
        up.join("backups").display(),
        up.join("policy.toml").display(),
        up.join("audit.db").display(),
        up.join(AUDIT_KEY).display(),
        up.join("backup-wrap.pub").display(),
        c("uploader.crt"),
        c("uploader.key"),
        c("ca.crt"),
        addrs.vault,
        c("uploader.crt"),
        c("uploader.key"),
        c("ca.crt"),
        delivered.display(),
    )
}

/// The uploader's audit key, under `.dev/uploader/`.
const AUDIT_KEY: &str = "audit.key";

/// Children are killed when the runner exits, however it exits.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (name, child) in &mut self.0 {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("stopped {name}");
        }
    }
}

fn spawn(name: &str, bin: &Path, args: &[&str], log: &Path) -> Result<Child, String> {
    let file =
        fs::File::create(log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
    let err = file.try_clone().map_err(|e| e.to_string())?;
    Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("cannot start {name} ({}): {e}", bin.display()))
}

/// Writes a deterministic pseudo-random sample recording (not compressible,
/// so the checksums mean something).
fn write_sample(path: &Path) -> Result<(), String> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut data = Vec::with_capacity(SAMPLE_BYTES);
    while data.len() < SAMPLE_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        data.extend_from_slice(&state.to_le_bytes());
    }
    fs::write(path, data).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

/// The default metrics port goes with the default API port; with any other
/// API port (tests, a second instance) the metrics port is picked by the OS.
fn metrics_addr(api: &str, default_api: &str, default_metrics: &'static str) -> &'static str {
    if api == default_api {
        default_metrics
    } else {
        "127.0.0.1:0"
    }
}

/// Where the two services listen.
#[derive(Debug, Clone)]
pub struct Addrs {
    pub vault: String,
    pub uploader: String,
}

/// Runs the main job. Returns when Ctrl-C (or SIGTERM) arrives.
pub fn run(dir: &Path, addrs: &Addrs) -> Result<(), String> {
    recvault_runtime::tls::install_crypto_provider();
    fs::create_dir_all(dir.join("uploader"))
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    fs::create_dir_all(dir.join("logs")).map_err(|e| e.to_string())?;
    fs::create_dir_all(dir.join("delivered")).map_err(|e| e.to_string())?;
    let vaultd = crate::binary("vaultd");
    let uploaderd = crate::binary("uploaderd");

    let first_run = !dir.join("vault/master.key").exists();
    let init = Command::new(&vaultd)
        // The main job keeps the clear secret fields on, so the README's
        // grpcurl recipes work; the CLI and the uploader seal regardless.
        .args([
            "init",
            "--allow-plaintext-secrets",
            "--listen",
            &addrs.vault,
            "--dir",
        ])
        .arg(dir.join("vault"))
        .arg("--certs")
        .arg(dir.join("certs"))
        .output()
        .map_err(|e| format!("cannot run vaultd init: {e}"))?;
    if !init.status.success() {
        return Err(format!(
            "vaultd init failed: {}",
            String::from_utf8_lossy(&init.stderr)
        ));
    }
    // The backup wrapping public key the uploader seals data keys to.
    let wrap = Command::new(&vaultd)
        .args(["wrapping-key", "--config"])
        .arg(dir.join("vault/vault.toml"))
        .arg("--out")
        .arg(dir.join("uploader/backup-wrap.pub"))
        .output()
        .map_err(|e| format!("cannot run vaultd wrapping-key: {e}"))?;
    if !wrap.status.success() {
        return Err(format!(
            "vaultd wrapping-key failed: {}",
            String::from_utf8_lossy(&wrap.stderr)
        ));
    }
    let audit_key = dir.join("uploader").join(AUDIT_KEY);
    if !audit_key.exists() {
        // The uploader's own chain key (it never sees the vault's master key),
        // made by the real binary: 32 random bytes, mode 0600.
        let made = Command::new(&uploaderd)
            .args(["init-audit-key", "--file"])
            .arg(&audit_key)
            .output()
            .map_err(|e| format!("cannot run uploaderd init-audit-key: {e}"))?;
        if !made.status.success() {
            return Err(format!(
                "uploaderd init-audit-key failed: {}",
                String::from_utf8_lossy(&made.stderr)
            ));
        }
    }
    let uploader_toml = dir.join("uploader/uploader.toml");
    fs::write(&uploader_toml, uploader_config(dir, addrs)).map_err(|e| e.to_string())?;
    let uploader_policy = dir.join("uploader/policy.toml");
    if !uploader_policy.exists() {
        fs::write(
            &uploader_policy,
            recvault_runtime::policy::dev_uploader_toml(),
        )
        .map_err(|e| format!("cannot write {}: {e}", uploader_policy.display()))?;
    }
    println!(
        "{} .dev at {} (certificates in {})",
        if first_run { "created" } else { "reusing" },
        absolute(dir).display(),
        absolute(&dir.join("certs")).display()
    );

    let vault_config = dir.join("vault/vault.toml").display().to_string();
    let uploader_config = uploader_toml.display().to_string();
    let mut children = Children(Vec::new());
    children.0.push((
        "vaultd".into(),
        spawn(
            "vaultd",
            &vaultd,
            &["serve", "--config", &vault_config],
            &dir.join("logs/vault.log"),
        )?,
    ));
    children.0.push((
        "uploaderd".into(),
        spawn(
            "uploaderd",
            &uploaderd,
            &["serve", "--config", &uploader_config],
            &dir.join("logs/uploader.log"),
        )?,
    ));

    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let endpoints = Endpoints {
        vault: addrs.vault.clone(),
        uploader: addrs.uploader.clone(),
        certs: dir.join("certs"),
    };
    let _s3 = runtime.block_on(async {
        for (addr, identity, log) in [
            (&addrs.vault, "auditor", "vault"),
            (&addrs.uploader, "manager", "uploader"),
        ] {
            wait_serving(endpoints.channel(addr, identity)?, Duration::from_secs(30))
                .await
                .map_err(|e| {
                    format!(
                        "{log} did not become ready: {e}; see {}",
                        dir.join(format!("logs/{log}.log")).display()
                    )
                })?;
        }
        println!(
            "vault    serving on {} (log: {})",
            addrs.vault,
            dir.join("logs/vault.log").display()
        );
        println!(
            "uploader serving on {} (log: {})",
            addrs.uploader,
            dir.join("logs/uploader.log").display()
        );
        demo(dir, &endpoints).await
    })?;
    // The demo's S3 server keeps serving (on this runtime) until Ctrl-C.
    print_recipes(dir, addrs);
    println!(
        "ready: vault {}, uploader {}; press Ctrl-C to stop",
        addrs.vault, addrs.uploader
    );
    runtime.block_on(recvault_runtime::shutdown::signal());
    drop(children);
    Ok(())
}

/// The customer's bucket of the demo, in the in-process S3 server.
const DEMO_BUCKET: &str = "demo-recordings";

/// An RFC 3339 time (UTC) for a protobuf timestamp.
fn rfc3339(t: Option<prost_types::Timestamp>) -> String {
    let t = t.unwrap_or_default();
    time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|d| {
            d.replace_nanosecond(u32::try_from(t.nanos).unwrap_or(0))
                .ok()
        })
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("{}s", t.seconds))
}

/// What the demo prints of an encrypted backup's header (it holds nothing
/// secret: the wrapped data key opens only in the vault). Layout: the
/// uploader README's "Backup format".
fn describe_backup_header(path: &Path) -> Result<String, String> {
    use std::io::Read as _;
    let mut head = vec![0u8; 1024];
    let mut file = fs::File::open(path).map_err(|e| e.to_string())?;
    let n = file.read(&mut head).map_err(|e| e.to_string())?;
    head.truncate(n);
    let u32_at = |at: usize| {
        head.get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    };
    if head.get(..4) != Some(b"RVBK".as_slice()) {
        return Err("no RVBK magic: the backup is not encrypted".into());
    }
    let (Some(key_version), Some(segment), Some(t)) = (u32_at(13), u32_at(17), u32_at(108)) else {
        return Err("header cut short".into());
    };
    let t = t as usize;
    let tenant = head
        .get(112..112 + t)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let r = u32_at(112 + t).unwrap_or(0) as usize;
    let recording = head
        .get(116 + t..116 + t + r)
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or_default();
    let hex_of = |range: std::ops::Range<usize>| hex::encode(head.get(range).unwrap_or_default());
    Ok(format!(
        "RVBK v{} AES-256-GCM segments of {segment} bytes (STREAM), data key wrapped with HPKE \
         X25519/HKDF-SHA256/AES-256-GCM to vault key version {key_version}; enc {}…, wrapped key {}…, \
         bound to tenant {tenant:?} recording {recording:?}; header {} bytes",
        head[4],
        &hex_of(28..60)[..16],
        &hex_of(60..108)[..16],
        116 + t + r
    ))
}

/// The whole path once: the customer's bucket (s3s-fs in this process), a
/// credential for it in the vault, a destination, a recording ingested
/// (its backup encrypted at rest), delivered with the credential leased,
/// used and released, verified like a customer would; then the job's
/// history and both services' audit events for it. Returns the S3 server,
/// which serves until the runner stops.
async fn demo(dir: &Path, endpoints: &Endpoints) -> Result<crate::s3::S3Server, String> {
    let manager_vault = endpoints.channel(&endpoints.vault, "manager")?;
    let manager_up = endpoints.channel(&endpoints.uploader, "manager")?;
    let recorder = endpoints.channel(&endpoints.uploader, "recorder")?;
    let auditor = endpoints.channel(&endpoints.vault, "auditor")?;

    // 1. The customer's bucket: a fresh key pair each run, known only to
    //    this process and, sealed, to the vault.
    let s3_root = absolute(&dir.join("s3"));
    fs::create_dir_all(s3_root.join(DEMO_BUCKET))
        .map_err(|e| format!("cannot create {}: {e}", s3_root.display()))?;
    let access_key = format!(
        "AKIADEMO{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12].to_uppercase()
    );
    let mut secret_key = uuid::Uuid::new_v4().simple().to_string();
    secret_key.push_str(&uuid::Uuid::new_v4().simple().to_string());
    let s3 = crate::s3::serve(
        &s3_root,
        "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        &access_key,
        &secret_key,
        None::<crate::s3::AuthenticatedOnly>,
    )
    .await
    .map_err(|e| format!("cannot start the demo S3 server: {e}"))?;
    println!(
        "s3          {} (s3s-fs in this process, bucket {DEMO_BUCKET} at {})",
        s3.endpoint,
        s3_root.join(DEMO_BUCKET).display()
    );

    // 2. Its credential in the vault (write-only from here on).
    let mut json = Vec::with_capacity(128);
    json.extend_from_slice(br#"{"access_key_id":""#);
    json.extend_from_slice(access_key.as_bytes());
    json.extend_from_slice(br#"","secret_access_key":""#);
    json.extend_from_slice(secret_key.as_bytes());
    json.extend_from_slice(br#""}"#);
    drop(secret_key);
    let put = client::put_credential(
        manager_vault,
        DEMO_TENANT,
        "demo-s3",
        va::CredentialKind::S3,
        SecretBytes::new(json),
        None,
    )
    .await?;
    println!(
        "credential  {} (tenant {DEMO_TENANT}, version {})",
        put.credential_id, put.version
    );

    // 3. The destination: that bucket, with that credential.
    let destination = DestinationsClient::new(manager_up.clone())
        .put_destination(up::PutDestinationRequest {
            tenant_id: DEMO_TENANT.into(),
            name: "demo-s3".into(),
            provider: "s3".into(),
            endpoint: s3.endpoint.clone(),
            region: "us-east-1".into(),
            bucket: DEMO_BUCKET.into(),
            prefix: "recordings".into(),
            path_style: true,
            credential_id: put.credential_id.clone(),
        })
        .await
        .map_err(|s| client::status_text(&s))?
        .into_inner();
    println!(
        "destination {} (s3: {}/{DEMO_BUCKET}/recordings)",
        destination.destination_id, s3.endpoint
    );

    // 4. A sample recording through ingest.
    let sample = dir.join("sample-recording.bin");
    if !sample.exists() {
        write_sample(&sample)?;
    }
    let (sha256, size) = client::sha256_file(&sample).await?;
    let stamp = time_stamp();
    let recording_id = format!("demo-{stamp}");
    let file_name = format!("call-{stamp}.bin");
    let request_id = format!("dev-{}", uuid::Uuid::new_v4().simple());
    let header = up::UploadHeader {
        tenant_id: DEMO_TENANT.into(),
        recording_id: recording_id.clone(),
        file_name: file_name.clone(),
        content_type: "application/octet-stream".into(),
        destination_id: destination.destination_id.clone(),
    };
    let reply = client::send_recording(recorder, header, &sample, &request_id, |_| {}).await?;
    if reply.sha256 != sha256 {
        return Err("the uploader stored a different SHA-256 than the file's".into());
    }
    println!(
        "ingested    recording {recording_id}: job {} ({size} bytes, sha256 {})",
        reply.job_id,
        hex::encode(sha256)
    );
    // The backup, encrypted at rest, until the delivery is verified.
    let backup = absolute(&dir.join("uploader/backups/objects"))
        .join(DEMO_TENANT)
        .join(&reply.job_id);
    match describe_backup_header(&backup) {
        Ok(text) => println!("backup      {}: {text}", backup.display()),
        Err(_) if !backup.exists() => {
            println!("backup      (already delivered and deleted)")
        }
        Err(e) => return Err(format!("backup {}: {e}", backup.display())),
    }

    // 5. Until DELIVERED.
    let job = tokio::time::timeout(
        Duration::from_secs(120),
        client::watch_until_settled(manager_up.clone(), &reply.job_id, {
            let mut last = -1;
            move |job| {
                if job.state != last {
                    last = job.state;
                    println!("  job state {}", client::state_name(job.state));
                }
            }
        }),
    )
    .await
    .map_err(|_| "the job did not settle within 120 s; see .dev/logs/uploader.log".to_owned())??;
    if job.state != up::JobState::Delivered as i32 {
        return Err(format!(
            "job ended {}: {}",
            client::state_name(job.state),
            job.last_error
        ));
    }

    // 6. Check the delivered object against its sidecar, like a customer
    //    would (s3s-fs keeps objects as files: <root>/<bucket>/<key>).
    let delivered_dir = s3_root.join(DEMO_BUCKET).join("recordings");
    let delivered = delivered_dir.join(&file_name);
    let sidecar = fs::read_to_string(delivered_dir.join(format!("{file_name}.sha256")))
        .map_err(|e| format!("cannot read the sidecar: {e}"))?;
    let (got, _) = client::sha256_file(&delivered).await?;
    let expected = sidecar
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if hex::encode(got) != expected || expected != hex::encode(sha256) {
        return Err(format!(
            "delivered object {} does not match its sidecar",
            delivered.display()
        ));
    }
    println!(
        "delivered   {} ({}) verified ({}): sha256 matches {file_name}.sha256; backup deleted: {}",
        job.location,
        delivered.display(),
        job.verified_by,
        !backup.exists()
    );

    // 7. The job's history.
    let history = JobsClient::new(manager_up)
        .get_job_history(up::GetJobRequest {
            job_id: reply.job_id.clone(),
        })
        .await
        .map_err(|s| client::status_text(&s))?
        .into_inner();
    println!("job history:");
    for e in history.events {
        println!(
            "  {} {:<10} {}",
            rfc3339(e.time),
            client::state_name(e.state),
            e.message
        );
    }

    // 8. What the vault audited for this recording's request id: the data
    //    key unwrapped for the attempt, the credential leased and released.
    let vault_events = collect(
        AuditClient::new(auditor)
            .query_events(va::QueryEventsRequest {
                filter: Some(va::AuditFilter {
                    request_id: request_id.clone(),
                    ..Default::default()
                }),
                after_sequence: 0,
                limit: 0,
            })
            .await
            .map_err(|s| client::status_text(&s))?
            .into_inner(),
    )
    .await?;
    println!("vault audit events for request {request_id}:");
    for e in &vault_events {
        println!(
            "  #{:<5} {} {:<40} {:<8} {:<34} lease {} {}",
            e.sequence,
            rfc3339(e.time),
            e.operation,
            e.outcome,
            e.identity,
            if e.lease_id.is_empty() {
                "-"
            } else {
                &e.lease_id
            },
            e.detail
        );
    }
    for needed in ["UnwrapDataKey", "AcquireLease", "ReleaseLease"] {
        if !vault_events
            .iter()
            .any(|e| e.operation.ends_with(needed) && e.outcome == "allowed")
        {
            return Err(format!(
                "the vault audited no allowed {needed} for request {request_id}"
            ));
        }
    }

    // 9. What the uploader audited for this recording, and its chain.
    let uploader_auditor = endpoints.channel(&endpoints.uploader, "auditor")?;
    let uploader_events = collect(
        UploaderAuditClient::new(uploader_auditor.clone())
            .query_events(va::QueryEventsRequest {
                filter: Some(va::AuditFilter {
                    job_id: reply.job_id.clone(),
                    ..Default::default()
                }),
                after_sequence: 0,
                limit: 0,
            })
            .await
            .map_err(|s| client::status_text(&s))?
            .into_inner(),
    )
    .await?;
    println!("uploader audit events for job {}:", reply.job_id);
    for e in &uploader_events {
        println!(
            "  #{:<5} {} {:<44} {:<8} {:<34} {}",
            e.sequence,
            rfc3339(e.time),
            e.operation,
            e.outcome,
            e.identity,
            e.detail
        );
    }
    let chain = UploaderAuditClient::new(uploader_auditor)
        .verify_chain(va::VerifyChainRequest {})
        .await
        .map_err(|s| client::status_text(&s))?
        .into_inner();
    if !chain.ok {
        return Err(format!(
            "the uploader's audit chain is broken at sequence {}: {}",
            chain.first_broken_sequence, chain.reason
        ));
    }
    println!(
        "uploader audit chain intact ({} events checked)",
        chain.events_checked
    );
    Ok(s3)
}

/// Every event of an audit stream.
async fn collect(
    mut events: tonic::Streaming<va::AuditEvent>,
) -> Result<Vec<va::AuditEvent>, String> {
    let mut all = Vec::new();
    while let Some(e) = events
        .message()
        .await
        .map_err(|s| client::status_text(&s))?
    {
        all.push(e);
    }
    Ok(all)
}

fn time_stamp() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}{:03}", now.as_secs(), now.subsec_millis())
}

fn print_recipes(dir: &Path, addrs: &Addrs) {
    let certs = dir.join("certs");
    let c = certs.display();
    let (vault, uploader) = (&addrs.vault, &addrs.uploader);
    println!("\nexplore with grpcurl (see README.md \"grpcurl recipes\"):");
    println!(
        "  grpcurl -cacert {c}/ca.crt -cert {c}/auditor.crt -key {c}/auditor.key {vault} list"
    );
    println!(
        "  grpcurl -cacert {c}/ca.crt -cert {c}/manager.crt -key {c}/manager.key -d '{{\"tenant_id\":\"demo\"}}' {uploader} recvault.uploader.v1.Jobs/ListJobs"
    );
    println!(
        "  grpcurl -cacert {c}/ca.crt -cert {c}/auditor.crt -key {c}/auditor.key {vault} recvault.vault.v1.Audit/VerifyChain\n"
    );
}

/// Waiting for a service to answer its gRPC health check.
mod tonic_health_probe {
    use std::time::{Duration, Instant};

    use tonic::transport::Channel;

    /// Polls `grpc.health.v1.Health/Check` until SERVING or `timeout`.
    pub async fn wait_serving(channel: Channel, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel.clone());
            match client
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
            {
                Ok(r)
                    if r.get_ref().status
                        == tonic_health::pb::health_check_response::ServingStatus::Serving
                            as i32 =>
                {
                    return Ok(());
                }
                Ok(r) => last = format!("status {}", r.get_ref().status),
                Err(s) => last = s.message().to_owned(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(last)
    }
}
