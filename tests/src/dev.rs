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
    uploader::v1::{self as up, destinations_client::DestinationsClient, jobs_client::JobsClient},
    vault::v1::{self as va, audit_client::AuditClient},
};
use recvault_runtime::{devcerts, secret::SecretBytes};
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
    let c = |n: &str| certs.join(n).display().to_string();
    format!(
        "# Written by `recvault dev`; fields are documented in deploy/config/uploader.example.toml.\n\
         listen = \"{}\"\n\
         metrics_listen = \"{}\"\n\
         database = \"{}\"\n\
         backup_dir = \"{}\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         [vault]\nendpoint = \"{}\"\n\n\
         [vault.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         [access]\nrecorder = [\"{}\"]\nmanager = [\"{}\"]\n\n\
         [delivery]\nretry_base_ms = 500\nretry_max_secs = 10\n",
        addrs.uploader,
        metrics_addr(&addrs.uploader, UPLOADER_ADDR, "127.0.0.1:9444"),
        up.join("uploader.db").display(),
        up.join("backups").display(),
        c("uploader.crt"),
        c("uploader.key"),
        c("ca.crt"),
        addrs.vault,
        c("uploader.crt"),
        c("uploader.key"),
        c("ca.crt"),
        devcerts::spiffe_id("recorder"),
        devcerts::spiffe_id("manager"),
    )
}

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
        .args(["init", "--listen", &addrs.vault, "--dir"])
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
    let uploader_toml = dir.join("uploader/uploader.toml");
    fs::write(&uploader_toml, uploader_config(dir, addrs)).map_err(|e| e.to_string())?;
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
    runtime.block_on(async {
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
    print_recipes(dir, addrs);
    println!(
        "ready: vault {}, uploader {}; press Ctrl-C to stop",
        addrs.vault, addrs.uploader
    );
    runtime.block_on(recvault_runtime::shutdown::signal());
    drop(children);
    Ok(())
}

async fn demo(dir: &Path, endpoints: &Endpoints) -> Result<(), String> {
    let manager_vault = endpoints.channel(&endpoints.vault, "manager")?;
    let manager_up = endpoints.channel(&endpoints.uploader, "manager")?;
    let recorder = endpoints.channel(&endpoints.uploader, "recorder")?;
    let auditor = endpoints.channel(&endpoints.vault, "auditor")?;

    // 1. A demo credential (kept for the grpcurl recipes; fs delivery needs none).
    let secret = SecretBytes::from_slice(br#"{"access_key_id":"AKIADEMODEMODEMO","secret_access_key":"demo-only-not-a-real-secret"}"#);
    let put = client::put_credential(
        manager_vault,
        DEMO_TENANT,
        "demo-s3",
        va::CredentialKind::S3,
        secret,
    )
    .await?;
    println!(
        "credential  {} (tenant {DEMO_TENANT}, version {})",
        put.credential_id, put.version
    );

    // 2. A local-directory destination under .dev/delivered.
    let delivered_dir = absolute(&dir.join("delivered"));
    let destination = DestinationsClient::new(manager_up.clone())
        .put_destination(up::PutDestinationRequest {
            tenant_id: DEMO_TENANT.into(),
            name: "local".into(),
            provider: "fs".into(),
            bucket: delivered_dir.display().to_string(),
            prefix: "recordings".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| client::status_text(&s))?
        .into_inner();
    println!(
        "destination {} (fs: {})",
        destination.destination_id,
        delivered_dir.display()
    );

    // 3. A sample recording through ingest.
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

    // 4. Until DELIVERED.
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

    // 5. Check the delivered file against its sidecar, like a customer would.
    let delivered = delivered_dir.join("recordings").join(&file_name);
    let sidecar = fs::read_to_string(
        delivered_dir
            .join("recordings")
            .join(format!("{file_name}.sha256")),
    )
    .map_err(|e| format!("cannot read the sidecar: {e}"))?;
    let (got, _) = client::sha256_file(&delivered).await?;
    let expected = sidecar
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned();
    if hex::encode(got) != expected || expected != hex::encode(sha256) {
        return Err(format!(
            "delivered file {} does not match its sidecar",
            delivered.display()
        ));
    }
    println!(
        "delivered   {} verified ({}): sha256 matches {}.sha256",
        delivered.display(),
        job.verified_by,
        file_name
    );

    // 6. The job's history and the vault's audit events for this request.
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
            "  {:>10} {:<10} {}",
            e.time.map(|t| t.seconds).unwrap_or(0),
            client::state_name(e.state),
            e.message
        );
    }
    let mut events = AuditClient::new(auditor)
        .query_events(va::QueryEventsRequest {
            filter: Some(va::AuditFilter {
                tenant_id: DEMO_TENANT.into(),
                ..Default::default()
            }),
            after_sequence: 0,
            limit: 0,
        })
        .await
        .map_err(|s| client::status_text(&s))?
        .into_inner();
    println!("vault audit events for tenant {DEMO_TENANT} (newest 5):");
    let mut all = Vec::new();
    while let Some(e) = events
        .message()
        .await
        .map_err(|s| client::status_text(&s))?
    {
        all.push(e);
    }
    for e in all.iter().rev().take(5).rev() {
        println!(
            "  #{:<5} {:<45} {:<8} {:<34} request {}",
            e.sequence, e.operation, e.outcome, e.identity, e.request_id
        );
    }
    Ok(())
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
