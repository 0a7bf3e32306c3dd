//! The `vaultd` command line: `serve`, `init`, `wrapping-key`, `audit verify|export`, `dev-certs`.
//! `main.rs` only hardens the process and calls [`main`].

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};
use recvault_runtime::{devcerts, logging, tls};

use recvault_audit::offline;

use crate::{
    config::VaultConfig,
    datakeys::{self, WrappingKey},
    keyring::MasterKey,
    server,
};

#[derive(Debug, Parser)]
#[command(
    name = "vaultd",
    version,
    about = "recvault vault: holds the master key, leases credentials over mTLS, audits every access"
)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the vault API over mTLS.
    Serve {
        /// TOML config file (see deploy/config/vault.example.toml).
        #[arg(long, env = "RECVAULT_VAULT_CONFIG")]
        config: PathBuf,
        /// Log format (overrides the config file).
        #[arg(long, value_enum)]
        log_format: Option<logging::LogFormat>,
    },
    /// Create a master key (mode 0600), a policy and a config in DIR. Refuses to
    /// overwrite an existing key.
    Init {
        /// Data directory for master.key, vault.toml, policy.toml and the databases.
        #[arg(long, default_value = ".dev/vault")]
        dir: PathBuf,
        /// Directory of TLS files (ca.crt, vault.crt, vault.key); dev certificates
        /// are generated there if it has none.
        #[arg(long, default_value = ".dev/certs")]
        certs: PathBuf,
        /// Address the generated config listens on.
        #[arg(long, default_value = "127.0.0.1:7443")]
        listen: SocketAddr,
        /// Write `[secrets] allow_plaintext = true`: the vault also accepts and
        /// returns secrets in clear, for grpcurl debugging. Development only.
        #[arg(long)]
        allow_plaintext_secrets: bool,
    },
    /// Write the backup wrapping public key file that uploaderd reads (TOML:
    /// key_version and the base64 X25519 public key), derived from the master key.
    WrappingKey {
        #[arg(long, env = "RECVAULT_VAULT_CONFIG")]
        config: PathBuf,
        /// Where to write it (atomically, mode 0644); without it, printed to stdout.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Audit log tools (offline; need the master key file).
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Create a dev CA and certificates for every recvault identity (not for production).
    DevCerts {
        #[arg(long, default_value = ".dev/certs")]
        dir: PathBuf,
        /// Replace existing certificates.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Verify the hash chain; exit status 1 and the first broken sequence if it is not intact.
    Verify {
        #[arg(long, env = "RECVAULT_VAULT_CONFIG")]
        config: PathBuf,
    },
    /// Write events as JSON lines (for SIEMs) to stdout.
    Export {
        #[arg(long, env = "RECVAULT_VAULT_CONFIG")]
        config: PathBuf,
        #[command(flatten)]
        filter: offline::ExportArgs,
    },
}

/// Parses arguments and runs. Errors are printed as one line each.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("vaultd: {message}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode, String> {
    match cli.command {
        Command::Serve { config, log_format } => {
            let config = VaultConfig::load(&config).map_err(|e| e.to_string())?;
            logging::init(log_format.unwrap_or(config.log_format));
            tls::install_crypto_provider();
            let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
            runtime
                .block_on(server::run(config, recvault_runtime::shutdown::signal()))
                .map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init {
            dir,
            certs,
            listen,
            allow_plaintext_secrets,
        } => {
            let path = init(&dir, &certs, listen, allow_plaintext_secrets)?;
            println!("wrote {}", path.display());
            println!("wrote {}", dir.join(WRAPPING_KEY_FILE).display());
            Ok(ExitCode::SUCCESS)
        }
        Command::WrappingKey { config, out } => {
            let config = VaultConfig::load(&config).map_err(|e| e.to_string())?;
            let key = wrapping_key(&config.master_key_file)?;
            match out {
                Some(path) => {
                    datakeys::write_public_key_file(&path, &key)?;
                    eprintln!("wrote {}", path.display());
                }
                None => print!("{}", key.public_key_file()),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::DevCerts { dir, force } => {
            tls::install_crypto_provider();
            if force {
                devcerts::generate(&dir, &devcerts::IDENTITIES).map_err(|e| e.to_string())?;
            } else {
                devcerts::ensure(&dir).map_err(|e| e.to_string())?;
            }
            println!("dev certificates in {}", dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => {
            let config = VaultConfig::load(&config).map_err(|e| e.to_string())?;
            let master = MasterKey::load(&config.master_key_file).map_err(|e| e.to_string())?;
            let key = server::audit_key(&master).map_err(|e| e.to_string())?;
            let storage = server::audit_storage(&config).map_err(|e| e.to_string())?;
            offline::verify(storage, &key, "vault", &mut std::io::stdout().lock())
        }
        Command::Audit {
            command: AuditCommand::Export { config, filter },
        } => {
            let config = VaultConfig::load(&config).map_err(|e| e.to_string())?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let storage = server::audit_storage(&config).map_err(|e| e.to_string())?;
            offline::export(storage, &filter, &mut out).map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Name of the wrapping public key file `init` writes beside the config.
pub const WRAPPING_KEY_FILE: &str = "wrapping-key.pub";

/// The backup wrapping key pair of the master key in `master_key_file`.
fn wrapping_key(master_key_file: &Path) -> Result<WrappingKey, String> {
    let master = MasterKey::load(master_key_file).map_err(|e| e.to_string())?;
    WrappingKey::derive(&master).map_err(|e| e.to_string())
}

/// Creates the master key, policy and config under `dir` (reusing what exists),
/// dev certificates under `certs` if there are none, and the wrapping public
/// key file beside the config. Returns the config path.
pub fn init(
    dir: &Path,
    certs: &Path,
    listen: SocketAddr,
    allow_plaintext_secrets: bool,
) -> Result<PathBuf, String> {
    tls::install_crypto_provider();
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    devcerts::ensure(certs).map_err(|e| e.to_string())?;
    let config = VaultConfig::for_data_dir(dir, certs, listen);
    if !config.master_key_file.exists() {
        MasterKey::generate(&config.master_key_file).map_err(|e| e.to_string())?;
    }
    if !config.policy_file.exists() {
        std::fs::write(&config.policy_file, crate::policy::dev_default_toml())
            .map_err(|e| format!("cannot write {}: {e}", config.policy_file.display()))?;
    }
    let path = dir.join("vault.toml");
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    let text = format!(
        "# Generated by `vaultd init`; every field is documented in deploy/config/vault.example.toml.\n\
         listen = \"{listen}\"\n\
         metrics_listen = \"{}\"\n\
         master_key_file = \"{}\"\n\
         database = \"{}\"\n\
         audit_database = \"{}\"\n\
         policy_file = \"{}\"\n\n\
         [tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n\n\
         [secrets]\n\
         # true: secrets may also cross gRPC in clear (grpcurl debugging); keep false in production.\n\
         allow_plaintext = {allow_plaintext_secrets}\n",
        config.metrics_listen,
        abs(&config.master_key_file).display(),
        abs(config.database.as_deref().unwrap_or(Path::new("vault.db"))).display(),
        abs(&config.audit_database).display(),
        abs(&config.policy_file).display(),
        abs(&config.tls.cert).display(),
        abs(&config.tls.key).display(),
        abs(&config.tls.ca).display(),
    );
    std::fs::write(&path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    datakeys::write_public_key_file(
        &dir.join(WRAPPING_KEY_FILE),
        &wrapping_key(&config.master_key_file)?,
    )?;
    Ok(path)
}
