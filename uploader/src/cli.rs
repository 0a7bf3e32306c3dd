//! The `uploaderd` command line: `serve`, `verify`, `init-audit-key` and
//! `audit verify|export` (the vault's offline audit tools, on the uploader's log).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use recvault_audit::{AuditKey, offline};
use recvault_runtime::{logging, tls};

use crate::{config::UploaderConfig, server};

#[derive(Debug, Parser)]
#[command(
    name = "uploaderd",
    version,
    about = "recvault uploader: verified delivery of recordings"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the uploader API over mTLS and deliver recordings.
    Serve {
        /// TOML config file (see deploy/config/uploader.example.toml).
        #[arg(long, env = "RECVAULT_UPLOADER_CONFIG")]
        config: PathBuf,
        #[arg(long, value_enum)]
        log_format: Option<logging::LogFormat>,
    },
    /// Create the audit key file: 32 random bytes, mode 0600. Refuses to
    /// overwrite an existing file (its events could no longer be verified).
    InitAuditKey {
        /// Where to write it; point the config's audit_key_file at it.
        #[arg(long)]
        file: PathBuf,
    },
    /// Audit log tools (offline, read-only; need the audit key file).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check a downloaded recording against its SHA-256 (hex, or the `<file>.sha256` sidecar).
    Verify {
        file: PathBuf,
        /// Expected SHA-256 as 64 hex characters; default: read FILE.sha256.
        #[arg(long)]
        sha256: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; exit status 1 and the first broken sequence if it is not intact.
    Verify {
        #[arg(long, env = "RECVAULT_UPLOADER_CONFIG")]
        config: PathBuf,
    },
    /// Write events as JSON lines (for SIEMs) to stdout.
    Export {
        #[arg(long, env = "RECVAULT_UPLOADER_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        filter: offline::ExportArgs,
    },
}

/// Parses arguments and runs.
pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("uploaderd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Serve { config, log_format } => {
            let config = UploaderConfig::load(&config).map_err(|e| e.to_string())?;
            logging::init(log_format.unwrap_or(config.log_format));
            tls::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            runtime
                .block_on(server::run(config, recvault_runtime::shutdown::signal()))
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { file, sha256 } => verify(&file, sha256.as_deref()),
        Command::InitAuditKey { file } => {
            AuditKey::generate_file(&file).map_err(|e| e.to_string())?;
            println!(
                "wrote audit key {} (mode 0600); set audit_key_file = \"{}\" in the uploader config",
                file.display(),
                std::path::absolute(&file)
                    .unwrap_or_else(|_| file.clone())
                    .display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => {
            let config = UploaderConfig::load(&config).map_err(|e| e.to_string())?;
            let key = AuditKey::load_file(&config.audit_key_file)
                .map_err(|e| format!("audit_key_file: {e}"))?;
            offline::verify(
                crate::server::audit_storage(&config).map_err(|e| e.to_string())?,
                &key,
                "uploader",
                &mut std::io::stdout().lock(),
            )
        }
        Command::Audit {
            command: AuditCommand::Export { config, filter },
        } => {
            let config = UploaderConfig::load(&config).map_err(|e| e.to_string())?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            offline::export(
                crate::server::audit_storage(&config).map_err(|e| e.to_string())?,
                &filter,
                &mut out,
            )
            .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `uploaderd verify`: exit 0 and "OK" when the file matches, 1 otherwise.
pub fn verify(file: &std::path::Path, sha256: Option<&str>) -> Result<ExitCode, String> {
    let expected = match sha256 {
        Some(hex) => hex.trim().to_ascii_lowercase(),
        None => {
            let mut sidecar = file.as_os_str().to_owned();
            sidecar.push(".sha256");
            let text = std::fs::read_to_string(&sidecar).map_err(|e| {
                format!(
                    "cannot read {}: {e}; pass --sha256 HEX instead",
                    PathBuf::from(&sidecar).display()
                )
            })?;
            text.split_whitespace()
                .next()
                .ok_or_else(|| "the sidecar is empty".to_owned())?
                .to_ascii_lowercase()
        }
    };
    if expected.len() != 64 || !expected.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("expected SHA-256 must be 64 hex characters".into());
    }
    let digest = crate::digest::hash_file(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let (actual, size) = (digest.sha256.to_hex(), digest.size);
    if actual == expected {
        println!("{}: OK (sha256 {actual}, {size} bytes)", file.display());
        Ok(ExitCode::SUCCESS)
    } else {
        println!(
            "{}: FAILED (sha256 {actual}, expected {expected})",
            file.display()
        );
        Ok(ExitCode::from(1))
    }
}
