//! The `recvault` command line for people: run the main job (`dev`), put a
//! credential from a file or stdin (never from argv), send a recording with a
//! progress bar and a final verified line, follow the audit log, verify a
//! downloaded file. `bin/recvault.rs` only calls [`main`].

use std::{
    io::{Read, Write},
    path::PathBuf,
    process::ExitCode,
    time::Instant,
};

use clap::{Parser, Subcommand, ValueEnum};
use recvault_proto::{
    uploader::v1 as up,
    vault::v1::{self as va, audit_client::AuditClient},
};
use recvault_runtime::secret::SecretBytes;

use crate::{
    client::{self, Endpoints},
    dev,
};

#[derive(Debug, Parser)]
#[command(name = "recvault", version, about = "recvault client and dev runner")]
pub struct Cli {
    /// Directory with ca.crt and <identity>.crt/.key.
    #[arg(
        long,
        global = true,
        default_value = ".dev/certs",
        env = "RECVAULT_CERTS"
    )]
    certs: PathBuf,
    /// Vault address.
    #[arg(long, global = true, default_value = dev::VAULT_ADDR, env = "RECVAULT_VAULT")]
    vault: String,
    /// Uploader address.
    #[arg(long, global = true, default_value = dev::UPLOADER_ADDR, env = "RECVAULT_UPLOADER")]
    uploader: String,
    /// Pin the vault's sealing public key (standard base64, as
    /// Credentials/GetSealingKey returns it): secrets are sealed only to it.
    #[arg(long, global = true, env = "RECVAULT_SEALING_KEY")]
    sealing_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The main job: vault + uploader on embedded defaults under .dev/, a demo delivery, then serve until Ctrl-C.
    Dev {
        #[arg(long, default_value = ".dev")]
        dir: PathBuf,
        /// Where the vault listens.
        #[arg(long, default_value = dev::VAULT_ADDR)]
        vault_listen: String,
        /// Where the uploader listens.
        #[arg(long, default_value = dev::UPLOADER_ADDR)]
        uploader_listen: String,
    },
    /// Credentials in the vault (as the manager identity).
    Credential {
        #[command(subcommand)]
        command: CredentialCommand,
    },
    /// Send a recording to the uploader (as the recorder) and wait until it is delivered and verified.
    Send {
        file: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        destination: String,
        /// Defaults to the file name.
        #[arg(long)]
        recording_id: Option<String>,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        /// Return once the recording is stored, without waiting for delivery.
        #[arg(long)]
        no_wait: bool,
    },
    /// Audit log (as the auditor).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check a downloaded recording against its SHA-256 (hex, or FILE.sha256).
    Verify {
        file: PathBuf,
        #[arg(long)]
        sha256: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialCommand {
    /// Store a credential; the secret is read from --secret-file (or `-` for stdin), never from the command line.
    Put {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        kind: Kind,
        /// File holding the secret (JSON per kind), or `-` for stdin.
        #[arg(long)]
        secret_file: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Kind {
    S3,
    Gcs,
    Azure,
    Generic,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print events as they are committed (JSON lines), starting after --after (default: now).
    Tail {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: u64,
    },
    /// Ask the vault to verify the hash chain.
    Verify,
}

/// Parses arguments and runs; errors are one line on stderr.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = recvault_runtime::hardening::disable_core_dumps() {
        eprintln!("recvault: warning: cannot disable core dumps: {e}");
    }
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("recvault: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    let endpoints = Endpoints {
        vault: cli.vault,
        uploader: cli.uploader,
        certs: cli.certs,
    };
    if let Command::Dev {
        dir,
        vault_listen,
        uploader_listen,
    } = &cli.command
    {
        let addrs = dev::Addrs {
            vault: vault_listen.clone(),
            uploader: uploader_listen.clone(),
        };
        dev::run(dir, &addrs)?;
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async {
        match cli.command {
            Command::Dev { .. } => Ok(ExitCode::SUCCESS),
            Command::Credential {
                command:
                    CredentialCommand::Put {
                        tenant,
                        name,
                        kind,
                        secret_file,
                    },
            } => {
                let secret = read_secret(&secret_file)?;
                let kind = match kind {
                    Kind::S3 => va::CredentialKind::S3,
                    Kind::Gcs => va::CredentialKind::Gcs,
                    Kind::Azure => va::CredentialKind::Azure,
                    Kind::Generic => va::CredentialKind::Generic,
                };
                let pinned = cli
                    .sealing_key
                    .as_deref()
                    .map(|b64| {
                        use base64::Engine as _;
                        base64::engine::general_purpose::STANDARD
                            .decode(b64.trim())
                            .ok()
                            .filter(|k| k.len() == 32)
                            .ok_or_else(|| {
                                "--sealing-key must be the standard base64 of a 32-byte X25519 public key".to_owned()
                            })
                    })
                    .transpose()?;
                let channel = endpoints.channel(&endpoints.vault, "manager")?;
                let reply = client::put_credential(
                    channel,
                    &tenant,
                    &name,
                    kind,
                    secret,
                    pinned.as_deref(),
                )
                .await?;
                println!(
                    "credential_id {} version {}",
                    reply.credential_id, reply.version
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Send {
                file,
                tenant,
                destination,
                recording_id,
                content_type,
                no_wait,
            } => {
                send(
                    &endpoints,
                    file,
                    tenant,
                    destination,
                    recording_id,
                    content_type,
                    no_wait,
                )
                .await
            }
            Command::Audit {
                command: AuditCommand::Tail { tenant, after },
            } => {
                let channel = endpoints.channel(&endpoints.vault, "auditor")?;
                let mut stream = AuditClient::new(channel)
                    .tail_events(va::TailEventsRequest {
                        filter: Some(va::AuditFilter {
                            tenant_id: tenant.unwrap_or_default(),
                            ..Default::default()
                        }),
                        after_sequence: after,
                    })
                    .await
                    .map_err(|s| client::status_text(&s))?
                    .into_inner();
                while let Some(e) = stream
                    .message()
                    .await
                    .map_err(|s| client::status_text(&s))?
                {
                    let line = serde_json::json!({
                        "sequence": e.sequence,
                        "time": e.time.map(|t| t.seconds),
                        "identity": e.identity,
                        "operation": e.operation,
                        "tenant_id": e.tenant_id,
                        "credential_id": e.credential_id,
                        "lease_id": e.lease_id,
                        "outcome": e.outcome,
                        "code": e.code,
                        "request_id": e.request_id,
                        "detail": e.detail,
                    });
                    println!("{line}");
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::Audit {
                command: AuditCommand::Verify,
            } => {
                let channel = endpoints.channel(&endpoints.vault, "auditor")?;
                let r = AuditClient::new(channel)
                    .verify_chain(va::VerifyChainRequest {})
                    .await
                    .map_err(|s| client::status_text(&s))?
                    .into_inner();
                if r.ok {
                    println!("audit chain intact: {} events checked", r.events_checked);
                    Ok(ExitCode::SUCCESS)
                } else {
                    println!(
                        "audit chain BROKEN at sequence {}: {}",
                        r.first_broken_sequence, r.reason
                    );
                    Ok(ExitCode::from(1))
                }
            }
            Command::Verify { file, sha256 } => verify(file, sha256).await,
        }
    })
}

/// Reads a secret from a file or stdin into locked memory.
fn read_secret(path: &std::path::Path) -> Result<SecretBytes, String> {
    let mut bytes = Vec::new();
    if path.as_os_str() == "-" {
        std::io::stdin()
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read stdin: {e}"))?;
    } else {
        std::fs::File::open(path)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    }
    // A trailing newline from an editor or `echo` is not part of the secret.
    while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
        bytes.pop();
    }
    Ok(SecretBytes::new(bytes))
}

async fn send(
    endpoints: &Endpoints,
    file: PathBuf,
    tenant: String,
    destination: String,
    recording_id: Option<String>,
    content_type: String,
    no_wait: bool,
) -> Result<ExitCode, String> {
    let file_name = file
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} has no usable file name", file.display()))?
        .to_owned();
    let (sha256, size) = client::sha256_file(&file).await?;
    let header = up::UploadHeader {
        tenant_id: tenant,
        recording_id: recording_id.unwrap_or_else(|| file_name.clone()),
        file_name,
        content_type,
        destination_id: destination,
    };
    let request_id = format!("cli-{}", uuid::Uuid::new_v4().simple());
    let started = Instant::now();
    let recorder = endpoints.channel(&endpoints.uploader, "recorder")?;
    let reply = client::send_recording(recorder, header, &file, &request_id, move |sent| {
        eprint!("{}", client::progress_line(sent, size, started));
        let _ = std::io::stderr().flush();
    })
    .await;
    eprintln!();
    let reply = reply?;
    if reply.sha256 != sha256 {
        return Err("the uploader stored a different SHA-256 than this file's".into());
    }
    println!(
        "stored  job {} ({size} bytes, sha256 {}){}",
        reply.job_id,
        hex::encode(sha256),
        if reply.duplicate {
            " [already ingested]"
        } else {
            ""
        }
    );
    if no_wait {
        return Ok(ExitCode::SUCCESS);
    }
    let manager = endpoints.channel(&endpoints.uploader, "manager")?;
    let mut last = -1;
    let job = client::watch_until_settled(manager, &reply.job_id, |job| {
        if job.state != last {
            last = job.state;
            eprintln!("  {}", client::state_name(job.state));
        }
    })
    .await?;
    if job.state == up::JobState::Delivered as i32 {
        println!(
            "verified delivered to {} ({}), sha256 {}",
            job.location,
            job.verified_by,
            hex::encode(&job.sha256)
        );
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "NOT delivered: job {} is {}: {}",
            job.job_id,
            client::state_name(job.state),
            job.last_error
        );
        Ok(ExitCode::from(1))
    }
}

async fn verify(file: PathBuf, sha256: Option<String>) -> Result<ExitCode, String> {
    let expected = match sha256 {
        Some(h) => h.trim().to_ascii_lowercase(),
        None => {
            let mut sidecar = file.clone().into_os_string();
            sidecar.push(".sha256");
            let text = std::fs::read_to_string(&sidecar).map_err(|e| {
                format!(
                    "cannot read {}: {e}; pass --sha256 HEX",
                    PathBuf::from(&sidecar).display()
                )
            })?;
            text.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        }
    };
    let (got, size) = client::sha256_file(&file).await?;
    let got = hex::encode(got);
    if got == expected {
        println!("{}: OK (sha256 {got}, {size} bytes)", file.display());
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{}: FAILED (sha256 {got}, expected {expected})",
            file.display()
        );
        Ok(ExitCode::from(1))
    }
}
