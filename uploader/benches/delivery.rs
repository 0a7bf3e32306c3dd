//! Delivery benchmark (not a test; issue 3): recvault's S3 delivery path
//! (`Destination::deliver`: multipart, CRC-32 per part, FULL_OBJECT CRC-32 on
//! complete, read-back verify where the server keeps no checksum) against
//! `rclone copyto` of the same file to the same local S3 server, in the same
//! run, alternating; the peak RSS of each client process alone; the same for a
//! larger file (peak RSS must not grow with the file); and the intake hash
//! (`digest::hash_file`, SHA-256 + CRC-32 in one pass) against
//! `openssl dgst -sha256` on the same file. Then the same delivery reading
//! the recording from its encrypted backup, in a local directory and in the
//! object store (`[backup_store]`, another s3s-fs process), alternating:
//! throughput and peak RSS of each, for both file sizes.
//!
//! ```text
//! cargo bench -p recvault-uploader --bench delivery
//! deploy/bench/upload-vs-rclone.sh     # the same, installing rclone first if missing
//! ```
//!
//! Environment (all optional): `BENCH_SIZE_MIB` (1024), `BENCH_RUNS` (3 pairs;
//! 0: intake hash only),
//! `BENCH_BIG_MIB` (4096; 0 skips), `BENCH_BIG_RUNS` (2), `BENCH_HASH_RUNS` (3),
//! `BENCH_DIR` (`target/tmp/bench-upload`), `BENCH_PART_MIB`,
//! `BENCH_CONCURRENCY` and `BENCH_READ_BACK_STREAMS` (default: uploaderd's
//! defaults, 8 MiB parts × 4, 16 read-back streams).
//!
//! One binary, three roles chosen by the first argument: none (or cargo's
//! `--bench`) runs the benchmark; `__serve ROOT` hosts s3s-fs 0.14.1 on
//! 127.0.0.1 (its own process, so the client's RSS is its own; it prints each
//! request's operation and arrival time, which tells where the upload ends and
//! the read-back starts); `__client …` runs one `Destination::deliver` and
//! prints its timings and `VmHWM`. Each client process is reaped with
//! `wait4`, whose `ru_maxrss` is that process's peak RSS alone.

use std::error::Error;
use std::future::Future;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use recvault_runtime::secret::SecretBytes;
use recvault_uploader::backup::wrapping::{WrappingKey, suite};
use recvault_uploader::backup::{BackupStore, EncryptedSource, S3Tuning};
use recvault_uploader::config::BackupStoreSettings;
use recvault_uploader::credential::S3Credential;
use recvault_uploader::destination::{
    DeliveryHooks, Destination, DestinationConfig, FileSource, ObjectInfo, Provider, S3Options,
    Source,
};
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{RecordingId, TenantId};
use rustls::crypto::hpke::{EncapsulatedSecret, HpkePrivateKey};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

const MIB: u64 = 1024 * 1024;
const BUCKET: &str = "bench";
const ACCESS_KEY: &str = "AKIABENCHRECVAULT";
const SECRET_KEY: &str = "bench-secret-key-not-a-real-one";

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("__serve") => serve(&args[1..]),
        Some("__client") => client(&args[1..]),
        _ => orchestrate(),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("delivery bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------- server role

/// Logs each authenticated request as `EV <operation> <unix ns>` on stdout.
struct EventLog;

// `S3Access` is an `#[async_trait]` trait; this is the signature the macro
// generates (as in tests/support/s3.rs), so no async-trait dependency.
impl s3s::access::S3Access for EventLog {
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
        println!("EV {} {}", cx.s3_op().name(), now_ns());
        let authenticated = cx.credentials().is_some();
        Box::pin(async move {
            if authenticated {
                Ok(())
            } else {
                Err(s3s::s3_error!(AccessDenied))
            }
        })
    }
}

/// s3s-fs on 127.0.0.1:0 over `root`, as the `s3s-fs` binary serves it
/// (hyper-util auto builder on a default multi-thread runtime, SigV4 auth).
fn serve(args: &[String]) -> Res<()> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use hyper_util::server::conn::auto::Builder as ConnBuilder;

    let root = PathBuf::from(args.first().ok_or("__serve ROOT")?);
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async move {
        let fs = s3s_fs::FileSystem::new(&root).map_err(|e| format!("s3s-fs: {e:?}"))?;
        let service = {
            let mut b = s3s::service::S3ServiceBuilder::new(fs);
            b.set_auth(s3s::auth::SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.set_access(EventLog);
            b.build()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("PORT {}", listener.local_addr()?.port());
        let builder = ConnBuilder::new(TokioExecutor::new());
        loop {
            let Ok((socket, _)) = listener.accept().await else {
                continue;
            };
            let builder = builder.clone();
            let service = service.clone();
            tokio::spawn(async move {
                let _ = builder
                    .serve_connection(TokioIo::new(socket), service)
                    .await;
            });
        }
    })
}

// ---------------------------------------------------------------- client role

/// `__client ENDPOINT FILE NAME SHA256HEX CRC32 SIZE`: one delivery, as the
/// worker makes it (uploaderd's default transfer settings unless overridden).
fn client(args: &[String]) -> Res<()> {
    let (args, backup) = match args {
        [head @ .., kind, location, store, key_file] if args.len() == 10 => {
            (head, Some((kind, location, store, key_file)))
        }
        _ => (args, None),
    };
    let [endpoint, file, name, sha_hex, crc, size] = args else {
        return Err("__client ENDPOINT FILE NAME SHA256HEX CRC32 SIZE \
                    [local|s3 LOCATION BACKUP_DIR|BACKUP_ENDPOINT WRAP_KEY_FILE]"
            .into());
    };
    let mut sha256 = [0u8; 32];
    hex::decode_to_slice(sha_hex, &mut sha256)?;
    let object = ObjectInfo {
        name: name.clone(),
        size: size.parse()?,
        sha256,
        crc32: crc.parse()?,
        content_type: "application/octet-stream".into(),
    };
    let config = DestinationConfig {
        provider: Provider::S3,
        endpoint: endpoint.clone(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: String::new(),
        path_style: true,
    };
    let defaults = S3Options::default();
    let options = S3Options {
        part_size: env_u64("BENCH_PART_MIB", defaults.part_size / MIB) * MIB,
        concurrency: usize::try_from(env_u64("BENCH_CONCURRENCY", defaults.concurrency as u64))?,
        read_back_streams: usize::try_from(env_u64(
            "BENCH_READ_BACK_STREAMS",
            defaults.read_back_streams as u64,
        ))?,
        ..defaults
    };
    let secret = bench_credential();

    let runtime = tokio::runtime::Runtime::new()?;
    // An S3 destination: no local directory is allowed.
    let destination = Destination::with_options(
        &config,
        Some(secret.as_bytes()),
        options,
        &Default::default(),
    )?;
    let start_ns = now_ns();
    // The recording is read through a `Source`, as the worker reads a backup:
    // the plaintext file, or the encrypted backup in a local directory or in
    // the object store (opened here, its data key unwrapped as the vault does).
    let delivery = runtime.block_on(async {
        let source: Arc<dyn Source> = match backup {
            None => Arc::new(FileSource::open(file).await?),
            Some((kind, location, store, key_file)) => {
                Arc::new(open_backup(kind, Path::new(location), store, Path::new(key_file)).await?)
            }
        };
        Res::Ok(
            destination
                .deliver(source, &object, &DeliveryHooks::default())
                .await?,
        )
    })?;
    let end_ns = now_ns();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    println!(
        "{}",
        serde_json::json!({
            "start_ns": start_ns.to_string(),
            "end_ns": end_ns.to_string(),
            "verified_by": delivery.verified_by.as_str(),
            "vm_hwm_kib": field("VmHWM:"),
        })
    );
    Ok(())
}

/// The backup store a client reads from: `local` (a directory) or `s3`
/// (the object store at `store`, bucket [`BUCKET`], prefix `backups`).
async fn backup_store(kind: &str, store: &str, wrapping: WrappingKey) -> Res<BackupStore> {
    Ok(match kind {
        "local" => BackupStore::open(store, wrapping)?,
        "s3" => {
            let credential = S3Credential::from_json(bench_credential().as_bytes())?;
            BackupStore::open_s3_with(
                &backup_settings(store),
                &credential,
                wrapping,
                S3Tuning::default(),
            )
            .await?
        }
        other => return Err(format!("unknown backup store kind {other}").into()),
    })
}

fn backup_settings(endpoint: &str) -> BackupStoreSettings {
    BackupStoreSettings {
        endpoint: endpoint.to_owned(),
        region: "us-east-1".into(),
        bucket: BUCKET.into(),
        prefix: "backups".into(),
        path_style: true,
        credentials_file: PathBuf::new(),
        stale_upload_secs: 24 * 3600,
    }
}

fn bench_credential() -> String {
    serde_json::json!({
        "access_key_id": ACCESS_KEY,
        "secret_access_key": SECRET_KEY,
    })
    .to_string()
}

/// Opens the encrypted backup at `location`, unwrapping its data key with
/// the private key in `key_file` as the vault would.
async fn open_backup(
    kind: &str,
    location: &Path,
    store: &str,
    key_file: &Path,
) -> Res<EncryptedSource> {
    let private = HpkePrivateKey::from(std::fs::read(key_file)?);
    let (public, _) = suite().generate_key_pair()?;
    let placeholder = WrappingKey::new(1, public.0.as_slice().try_into()?);
    let store = backup_store(kind, store, placeholder).await?;
    let header = store
        .read_header(location)
        .await?
        .ok_or("the backup has no RVBK header")?;
    let key = suite().open(
        &EncapsulatedSecret(header.enc.to_vec()),
        recvault_runtime::datakey::WRAP_INFO,
        &header.binding(),
        &header.wrapped_key,
        &private,
    )?;
    Ok(store
        .open_encrypted(location, header, SecretBytes::new(key))
        .await?)
}

// ---------------------------------------------------------- orchestrator role

/// A child process reaped with `wait4`: wall time, peak RSS and CPU of that
/// process alone.
struct Measured {
    status: ExitStatus,
    wall: Duration,
    max_rss_kib: u64,
    cpu: Duration,
    stdout: String,
    stderr: String,
}

/// Waits for `child` with `wait4(2)`, which returns the resource usage of
/// that one child (`ru_maxrss`: its peak resident set, in KiB on Linux).
/// `std::process::Child` has no way to get it, hence the one unsafe call.
#[allow(unsafe_code)]
fn wait4(child: &Child) -> Res<(ExitStatus, libc::rusage)> {
    use std::os::unix::process::ExitStatusExt as _;
    let pid = libc::pid_t::try_from(child.id())?;
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is plain old data, for which all-zero bytes are valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: pointers to live locals; `pid` is our own child, not yet reaped.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if r == pid {
            return Ok((ExitStatus::from_raw(status), usage));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e.into());
        }
    }
}

fn run_measured(mut command: Command) -> Res<Measured> {
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let start = Instant::now();
    let mut child = command.spawn()?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut stderr = child.stderr.take().ok_or("no stderr")?;
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut out = String::new();
    stdout.read_to_string(&mut out)?;
    let (status, usage) = wait4(&child)?;
    let wall = start.elapsed();
    let tv = |t: libc::timeval| {
        Duration::from_secs(u64::try_from(t.tv_sec).unwrap_or(0))
            + Duration::from_micros(u64::try_from(t.tv_usec).unwrap_or(0))
    };
    Ok(Measured {
        status,
        wall,
        max_rss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        stdout: out,
        stderr: err_reader.join().unwrap_or_default(),
    })
}

/// The s3s-fs server process for one run, on a fresh directory.
struct Server {
    child: Child,
    endpoint: String,
    root: PathBuf,
    events: Arc<Mutex<Vec<(String, u128)>>>,
}

impl Server {
    fn start(root: PathBuf) -> Res<Self> {
        std::fs::create_dir_all(root.join(BUCKET))?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("__serve")
            .arg(&root)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().ok_or("no stdout")?).lines();
        let port = loop {
            let Some(line) = lines.next() else {
                return Err("the S3 server exited before listening".into());
            };
            if let Some(p) = line?.strip_prefix("PORT ") {
                break p.trim().parse::<u16>()?;
            }
        };
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&events);
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                let mut it = line.split_whitespace();
                if let (Some("EV"), Some(op), Some(ns)) = (it.next(), it.next(), it.next())
                    && let Ok(ns) = ns.parse::<u128>()
                    && let Ok(mut v) = sink.lock()
                {
                    v.push((op.to_owned(), ns));
                }
            }
        });
        Ok(Self {
            child,
            endpoint: format!("http://127.0.0.1:{port}"),
            root,
            events,
        })
    }

    fn object_len(&self, key: &str) -> Option<u64> {
        std::fs::metadata(self.root.join(BUCKET).join(key))
            .ok()
            .map(|m| m.len())
    }

    /// Arrival time of the first `op` request.
    fn first(&self, op: &str) -> Option<u128> {
        self.events
            .lock()
            .ok()?
            .iter()
            .find(|(o, _)| o == op)
            .map(|(_, t)| *t)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.root);
        // Deleted files' dirty pages are dropped; flush anything else so the
        // next run does not pay for this one's writeback.
        let _ = Command::new("sync").status();
    }
}

/// The intake figures a file needs: SHA-256, CRC-32, size (recvault's own hash).
struct FileInfo {
    path: PathBuf,
    size: u64,
    sha256: [u8; 32],
    crc32: u32,
}

#[derive(Default)]
struct Run {
    wall: f64,
    upload_only: Option<f64>,
    rss_mib: f64,
    hwm_mib: Option<f64>,
    cpu: f64,
    verified_by: Option<String>,
}

fn mib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / MIB as f64 / secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn run_ours(dir: &Path, file: &FileInfo, tag: &str) -> Res<Run> {
    run_ours_from(dir, file, tag, &[])
}

/// [`run_ours`] reading the recording from `source` (none: the plaintext
/// file; else the client's backup arguments).
fn run_ours_from(dir: &Path, file: &FileInfo, tag: &str, source: &[String]) -> Res<Run> {
    let server = Server::start(dir.join(format!("s3-{tag}")))?;
    let key = format!("ours-{tag}.bin");
    let mut command = Command::new(std::env::current_exe()?);
    command
        .arg("__client")
        .arg(&server.endpoint)
        .arg(&file.path)
        .args([
            key.as_str(),
            &hex::encode(file.sha256),
            &file.crc32.to_string(),
            &file.size.to_string(),
        ])
        .args(source);
    let m = run_measured(command)?;
    if !m.status.success() {
        return Err(format!("our client failed ({}): {}", m.status, m.stderr.trim()).into());
    }
    if server.object_len(&key) != Some(file.size) {
        return Err(format!("our upload of {key} is missing or has the wrong size").into());
    }
    let out: serde_json::Value = serde_json::from_str(m.stdout.trim())?;
    let ns =
        |k: &str| -> Res<u128> { Ok(out[k].as_str().ok_or("client output")?.parse::<u128>()?) };
    let (start, end) = (ns("start_ns")?, ns("end_ns")?);
    let wall = m.wall.as_secs_f64();
    // Everything after the read-back's GetObject arrived is verification
    // (read-back, then the sidecar PUT and its HEAD: milliseconds).
    let upload_only = server
        .first("GetObject")
        .filter(|&t| t > start && t < end)
        .map(|t| wall - (end - t) as f64 / 1e9);
    Ok(Run {
        wall,
        upload_only,
        rss_mib: m.max_rss_kib as f64 / 1024.0,
        hwm_mib: out["vm_hwm_kib"].as_u64().map(|k| k as f64 / 1024.0),
        cpu: m.cpu.as_secs_f64(),
        verified_by: out["verified_by"].as_str().map(str::to_owned),
    })
}

fn run_rclone(dir: &Path, file: &FileInfo, tag: &str) -> Res<Run> {
    let server = Server::start(dir.join(format!("s3-{tag}")))?;
    let key = format!("rclone-{tag}.bin");
    let mut command = Command::new("rclone");
    command
        .env_remove("AWS_CA_BUNDLE")
        .env("RCLONE_CONFIG", dir.join("rclone.conf"))
        .env("RCLONE_CONFIG_S3T_TYPE", "s3")
        .env("RCLONE_CONFIG_S3T_PROVIDER", "Other")
        .env("RCLONE_CONFIG_S3T_ENDPOINT", &server.endpoint)
        .env("RCLONE_CONFIG_S3T_ACCESS_KEY_ID", ACCESS_KEY)
        .env("RCLONE_CONFIG_S3T_SECRET_ACCESS_KEY", SECRET_KEY)
        .env("RCLONE_CONFIG_S3T_REGION", "us-east-1")
        .env("RCLONE_CONFIG_S3T_FORCE_PATH_STYLE", "true")
        .arg("copyto")
        .arg(&file.path)
        .arg(format!("s3t:{BUCKET}/{key}"));
    let m = run_measured(command)?;
    if !m.status.success() {
        return Err(format!("rclone failed ({}): {}", m.status, m.stderr.trim()).into());
    }
    if server.object_len(&key) != Some(file.size) {
        return Err(format!("rclone's upload of {key} is missing or has the wrong size").into());
    }
    Ok(Run {
        wall: m.wall.as_secs_f64(),
        rss_mib: m.max_rss_kib as f64 / 1024.0,
        cpu: m.cpu.as_secs_f64(),
        ..Run::default()
    })
}

/// Writes `size` random bytes (from /dev/urandom) to `path`.
fn make_random_file(path: &Path, size: u64) -> Res<()> {
    let mut src = std::fs::File::open("/dev/urandom")?.take(size);
    let mut dst = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let n = std::io::copy(&mut src, &mut dst)?;
    dst.flush()?;
    if n != size {
        return Err("short random file".into());
    }
    Ok(())
}

fn hash_with_recvault(runtime: &tokio::runtime::Runtime, path: &Path) -> Res<(f64, FileInfo)> {
    let start = Instant::now();
    let d = runtime.block_on(recvault_uploader::digest::hash_file_async(path))?;
    let (sha256, crc32, size) = (*d.sha256.as_bytes(), d.crc32, d.size);
    let secs = start.elapsed().as_secs_f64();
    Ok((
        secs,
        FileInfo {
            path: path.to_owned(),
            size,
            sha256,
            crc32,
        },
    ))
}

fn hash_with_openssl(path: &Path) -> Res<(f64, String)> {
    let start = Instant::now();
    let out = Command::new("openssl")
        .args(["dgst", "-sha256", "-r"])
        .arg(path)
        .output()?;
    let secs = start.elapsed().as_secs_f64();
    if !out.status.success() {
        return Err(format!("openssl failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let text = String::from_utf8(out.stdout)?;
    Ok((
        secs,
        text.split_whitespace()
            .next()
            .unwrap_or_default()
            .to_owned(),
    ))
}

fn describe_run(who: &str, size: u64, r: &Run) {
    let mut line = format!(
        "  {who:<7} {:6.2} s  {:7.1} MiB/s  peak RSS {:5.1} MiB  CPU {:5.2} s",
        r.wall,
        mib_s(size, r.wall),
        r.rss_mib,
        r.cpu
    );
    if let Some(u) = r.upload_only {
        line.push_str(&format!(
            "  (upload only {u:.2} s, {:.1} MiB/s; verified by {})",
            mib_s(size, u),
            r.verified_by.as_deref().unwrap_or("?")
        ));
    }
    if let Some(h) = r.hwm_mib {
        line.push_str(&format!("  VmHWM {h:.1} MiB"));
    }
    println!("{line}");
}

/// One file's encrypted backups: in a local directory, and in the object
/// store (an s3s-fs process of its own, bucket [`BUCKET`], prefix `backups`).
struct Backups {
    local_dir: PathBuf,
    local: PathBuf,
    /// Kept running while the clients read from it.
    s3_server: Server,
    s3: PathBuf,
    key_file: PathBuf,
}

/// Ingests `file` into both backup stores (as `ingest` does: 4 MiB chunks
/// through `BackupWriter`), printing the intake rate of each.
fn make_backups(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    file: &FileInfo,
    tag: &str,
) -> Res<Backups> {
    let (public, private) = suite().generate_key_pair()?;
    let wrapping = WrappingKey::new(1, public.0.as_slice().try_into()?);
    let key_file = dir.join(format!("wrap-{tag}.key"));
    std::fs::write(&key_file, private.secret_bytes())?;
    let s3_server = Server::start(dir.join(format!("s3-backups-{tag}")))?;
    let local_dir = dir.join(format!("backups-{tag}"));
    let mut locations = Vec::new();
    for (kind, at) in [
        ("local", local_dir.to_string_lossy().into_owned()),
        ("s3", s3_server.endpoint.clone()),
    ] {
        let store = runtime.block_on(backup_store(kind, &at, wrapping.clone()))?;
        let start = Instant::now();
        let mut writer = store.begin(&TenantId::parse("bench")?, &RecordingId::parse(tag)?)?;
        let mut input = std::fs::File::open(&file.path)?;
        let mut chunk = vec![0u8; 4 * MIB as usize];
        loop {
            let n = input.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            writer.write_chunk(&chunk[..n])?;
        }
        let sha = Sha256Digest::from_slice(&file.sha256).ok_or("sha256")?;
        let stored = writer.finish(sha)?;
        let secs = start.elapsed().as_secs_f64();
        println!(
            "  ingest into the {kind:<5} backup: {secs:6.2} s  {:7.1} MiB/s",
            mib_s(file.size, secs)
        );
        locations.push(stored.path);
    }
    let s3 = locations.pop().ok_or("no s3 backup")?;
    let local = locations.pop().ok_or("no local backup")?;
    Ok(Backups {
        local_dir,
        local,
        s3_server,
        s3,
        key_file,
    })
}

/// Delivers `file` from its encrypted backups, local directory and object
/// store alternating, `runs` times each; prints each run and the medians.
fn deliver_from_backups(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    file: &FileInfo,
    runs: u64,
    tag: &str,
) -> Res<(f64, f64)> {
    println!(
        "\nDelivery of {} MiB from the encrypted backup (decrypting; the object store read by ranged GETs), alternating:",
        file.size / MIB
    );
    let backups = make_backups(dir, runtime, file, tag)?;
    let text = |p: &Path| p.to_string_lossy().into_owned();
    let (mut local, mut s3) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let args = [
            "local".to_owned(),
            text(&backups.local),
            text(&backups.local_dir),
            text(&backups.key_file),
        ];
        let r = run_ours_from(dir, file, &format!("{tag}-dir{i}"), &args)?;
        describe_run("dir-bk", file.size, &r);
        local.push(r);
        let args = [
            "s3".to_owned(),
            text(&backups.s3),
            backups.s3_server.endpoint.clone(),
            text(&backups.key_file),
        ];
        let r = run_ours_from(dir, file, &format!("{tag}-s3{i}"), &args)?;
        describe_run("s3-bk", file.size, &r);
        s3.push(r);
    }
    let med = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    println!("| backup store | wall s | MiB/s | peak RSS MiB | CPU s |");
    println!("|---|---|---|---|---|");
    for (name, v) in [("local directory", &local), ("object store (s3s-fs)", &s3)] {
        let wall = med(v, |r| r.wall);
        println!(
            "| {name} | {wall:.2} | {:.1} | {:.1} | {:.2} |",
            mib_s(file.size, wall),
            med(v, |r| r.rss_mib),
            med(v, |r| r.cpu)
        );
    }
    Ok((med(&local, |r| r.rss_mib), med(&s3, |r| r.rss_mib)))
}

fn orchestrate() -> Res<()> {
    let size = env_u64("BENCH_SIZE_MIB", 1024) * MIB;
    let runs = env_u64("BENCH_RUNS", 3);
    let big = env_u64("BENCH_BIG_MIB", 4096) * MIB;
    let big_runs = env_u64("BENCH_BIG_RUNS", 2).max(1);
    let hash_runs = env_u64("BENCH_HASH_RUNS", 3).max(1);
    let dir = std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-upload"));
    let rclone = Command::new("rclone")
        .arg("version")
        .stdout(Stdio::piped())
        .output()
        .map_err(|e| format!("rclone is needed (apt-get install -y rclone): {e}"))?;
    let rclone_version = String::from_utf8_lossy(&rclone.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let defaults = S3Options::default();
    println!(
        "recvault delivery benchmark: {} MiB file, {runs} alternating pairs; server s3s-fs 0.14.1 \
         (own process, 127.0.0.1); ours: part {} MiB x {}, {} read-back streams \
         (BENCH_PART_MIB/BENCH_CONCURRENCY/BENCH_READ_BACK_STREAMS override uploaderd's {} MiB x {}, {}); \
         {rclone_version} with its defaults",
        size / MIB,
        env_u64("BENCH_PART_MIB", defaults.part_size / MIB),
        env_u64("BENCH_CONCURRENCY", defaults.concurrency as u64),
        env_u64("BENCH_READ_BACK_STREAMS", defaults.read_back_streams as u64),
        defaults.part_size / MIB,
        defaults.concurrency,
        defaults.read_back_streams,
    );
    let runtime = tokio::runtime::Runtime::new()?;

    let path = dir.join("recording-1.bin");
    make_random_file(&path, size)?;

    // Intake: SHA-256 + CRC-32 in one pass (recvault) vs OpenSSL's SHA-256
    // alone, alternating, page cache warm (the first read warms it).
    let (_, file) = hash_with_recvault(&runtime, &path)?;
    let (mut ours_h, mut ossl_h) = (Vec::new(), Vec::new());
    for _ in 0..hash_runs {
        let (t, info) = hash_with_recvault(&runtime, &path)?;
        if info.sha256 != file.sha256 || info.crc32 != file.crc32 {
            return Err("hash_file is not deterministic".into());
        }
        ours_h.push(mib_s(size, t));
        let (t, hex_digest) = hash_with_openssl(&path)?;
        if hex_digest != hex::encode(file.sha256) {
            return Err("openssl and recvault disagree on the SHA-256".into());
        }
        ossl_h.push(mib_s(size, t));
    }
    let (ours_hash, ossl_hash) = (median(ours_h.clone()), median(ossl_h.clone()));
    println!("\nIntake hash of the same file (MiB/s per run: {ours_h:.0?} vs {ossl_h:.0?}):");
    println!("  digest::hash_file (SHA-256 + CRC-32, one pass)  {ours_hash:7.0} MiB/s");
    println!("  openssl dgst -sha256 (SHA-NI)                   {ossl_hash:7.0} MiB/s");
    println!("  ratio {:.2} (target >= 0.90)", ours_hash / ossl_hash);

    if runs == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        return Ok(());
    }
    println!("\nUpload of {} MiB to s3s-fs, alternating:", size / MIB);
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for i in 0..runs {
        let r = run_ours(&dir, &file, &format!("{i}"))?;
        describe_run("ours", size, &r);
        ours.push(r);
        let r = run_rclone(&dir, &file, &format!("{i}"))?;
        describe_run("rclone", size, &r);
        theirs.push(r);
    }
    let med = |v: &[Run], f: fn(&Run) -> Option<f64>| median(v.iter().filter_map(f).collect());
    let ours_wall = med(&ours, |r| Some(r.wall));
    let ours_up = med(&ours, |r| r.upload_only);
    let ours_rss = med(&ours, |r| Some(r.rss_mib));
    let ours_cpu = med(&ours, |r| Some(r.cpu));
    let rc_wall = med(&theirs, |r| Some(r.wall));
    let rc_rss = med(&theirs, |r| Some(r.rss_mib));
    let rc_cpu = med(&theirs, |r| Some(r.cpu));
    println!("\nMedians ({} MiB):", size / MIB);
    println!("| client | wall s | MiB/s | peak RSS MiB | CPU s |");
    println!("|---|---|---|---|---|");
    println!(
        "| recvault upload only | {ours_up:.2} | {:.1} | | |",
        mib_s(size, ours_up)
    );
    println!(
        "| recvault upload + read-back verify | {ours_wall:.2} | {:.1} | {ours_rss:.1} | {ours_cpu:.2} |",
        mib_s(size, ours_wall)
    );
    println!(
        "| rclone copyto | {rc_wall:.2} | {:.1} | {rc_rss:.1} | {rc_cpu:.2} |",
        mib_s(size, rc_wall)
    );
    println!(
        "throughput ratio recvault/rclone: upload only {:.2}, with verify {:.2} (target >= 1); \
         peak RSS {ours_rss:.1} MiB (target < 64)",
        rc_wall / ours_up,
        rc_wall / ours_wall
    );
    let backup_rss = deliver_from_backups(&dir, &runtime, &file, runs, "main")?;
    println!(
        "peak RSS delivering from the backup: local directory {:.1} MiB, object store {:.1} MiB (target < 64)",
        backup_rss.0, backup_rss.1
    );
    let _ = std::fs::remove_file(&path);

    if big > 0 {
        let big_path = dir.join("recording-big.bin");
        make_random_file(&big_path, big)?;
        let (t, big_file) = hash_with_recvault(&runtime, &big_path)?;
        println!(
            "\nUpload of {} MiB (ours; intake hash {:.0} MiB/s on first read):",
            big / MIB,
            mib_s(big, t)
        );
        let mut bigs = Vec::new();
        for i in 0..big_runs {
            let r = run_ours(&dir, &big_file, &format!("big{i}"))?;
            describe_run("ours", big, &r);
            bigs.push(r);
        }
        let big_rss = med(&bigs, |r| Some(r.rss_mib));
        let big_up = med(&bigs, |r| r.upload_only);
        let big_wall = med(&bigs, |r| Some(r.wall));
        println!(
            "| recvault {} MiB | upload only {big_up:.2} s ({:.1} MiB/s) | with verify {big_wall:.2} s ({:.1} MiB/s) | peak RSS {big_rss:.1} MiB |",
            big / MIB,
            mib_s(big, big_up),
            mib_s(big, big_wall)
        );
        println!(
            "peak RSS {} MiB / {} MiB: {:.2} (target within 0.90..1.10)",
            big / MIB,
            size / MIB,
            big_rss / ours_rss
        );
        let big_backup_rss = deliver_from_backups(&dir, &runtime, &big_file, big_runs, "big")?;
        println!(
            "peak RSS from the backup {} MiB / {} MiB: local directory {:.2}, object store {:.2} (target within 0.90..1.10)",
            big / MIB,
            size / MIB,
            big_backup_rss.0 / backup_rss.0,
            big_backup_rss.1 / backup_rss.1
        );
        let _ = std::fs::remove_file(&big_path);
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
