//! AcquireLease throughput and latency over mTLS with the durable audit log
//! on, against a baseline measured in the same run: a trivial tonic service
//! (`grpc.health.v1.Health/Check`) behind the same TLS set-up (the vault's dev
//! certificates, `tls::incoming` + `ReloadingServerTls`, the same server
//! builder settings), called by the same clients with the same concurrency.
//! Phases alternate (baseline, vault, baseline, vault, ...) so machine noise
//! hits both; the summary uses the medians. Target: vault ≥ 0.8 × baseline.
//!
//! The primary figure is AcquireLease as the uploader calls it: the secret
//! sealed to a key pair the client makes per call (HPKE), opened by the
//! client, with the zeroing allocator wiping freed memory (as in both
//! binaries). A second comparison, alternating in the same run, prices that
//! defense, each part apart: clear secrets without wiping (the behaviour
//! before sealing), sealed without wiping, sealed + wiping, in throughput
//! and CPU per call.
//!
//! PostgreSQL mode: in every round a third phase calls a second vault
//! whose store (credentials, keys, leases) is a real PostgreSQL database
//! (Debian's server, started by the test kit; skipped with the reason where
//! it is not installed), on the same certificates and settings. Its audit
//! log lives in that database too, as on every replica. The summary prints
//! both ratios.
//!
//! Run: `cargo bench -p recvault-vault --bench lease_throughput`
//!
//! Environment:
//! - `BENCH_CONCURRENCY` (64): client tasks calling in a loop;
//! - `BENCH_CHANNELS` (4): HTTP/2 connections the tasks share, round-robin;
//! - `BENCH_SECONDS` (5): length of each measured phase;
//! - `BENCH_WARMUP_SECONDS` (1): unmeasured warm-up per service;
//! - `BENCH_ROUNDS` (3): baseline/vault phase pairs;
//! - `BENCH_PAIRS` (1): also measure AcquireLease+ReleaseLease pairs (0 = skip);
//! - `BENCH_WORKERS` (CPU count): tokio worker threads;
//! - `BENCH_DIR` (system temp dir): where the vault's databases live. fsync
//!   cost depends on the file system: put it on the disk you deploy to.
//!
//! The audit log is exactly the production one: `GroupCommitOptions::default()`,
//! WAL with `synchronous=FULL`, and an AcquireLease answers only after its
//! event is committed and fsynced. Clients send no `x-request-id`, so the
//! vault generates one per call as it does for any such caller.
//!
//! Each phase prints requests/s, p50/p99 latency (nearest rank, over every
//! call of the phase), and the CPU time of this process (clients, servers,
//! audit writer) per call, which other load on the machine disturbs less
//! than throughput. Clients and servers share the machine's CPUs, and a
//! closed loop of C clients against a log that must fsync can do at most
//! about C / (commit interval × ~2) calls per second: a slow disk shows up
//! as long commit intervals.

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use recvault_audit::GroupCommitOptions;
use recvault_proto::vault::v1::{
    AcquireLeaseRequest, CredentialKind, PutCredentialRequest, ReleaseLeaseRequest,
    credentials_client::CredentialsClient, leases_client::LeasesClient,
};
use recvault_runtime::{
    devcerts, hpke,
    tls::{self, ReloadingServerTls},
};
use recvault_vault::testing;
use tonic::{Status, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Client identity for both services: the one AcquireLease is granted to.
const CLIENT: &str = "uploader";

/// The allocator both binaries run with; wiping is toggled per phase below.
#[global_allocator]
static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;

#[derive(Debug, Clone)]
struct Settings {
    concurrency: usize,
    channels: usize,
    seconds: f64,
    warmup: f64,
    rounds: usize,
    pairs: bool,
    workers: usize,
    dir: Option<PathBuf>,
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid value")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        Self {
            concurrency: env_or("BENCH_CONCURRENCY", 64usize).max(1),
            channels: env_or("BENCH_CHANNELS", 4usize).max(1),
            seconds: env_or("BENCH_SECONDS", 5.0f64),
            warmup: env_or("BENCH_WARMUP_SECONDS", 1.0f64),
            rounds: env_or("BENCH_ROUNDS", 3usize).max(1),
            pairs: env_or("BENCH_PAIRS", 1u8) != 0,
            workers: env_or("BENCH_WORKERS", cores).max(1),
            dir: std::env::var_os("BENCH_DIR").map(PathBuf::from),
        }
    }
}

/// One kind of call, made in a loop by every client task.
trait Caller: Clone + Send + 'static {
    fn call(&mut self) -> impl Future<Output = Result<(), Status>> + Send;
}

/// Baseline: `grpc.health.v1.Health/Check`.
#[derive(Clone)]
struct HealthCheck(HealthClient<Channel>);

impl Caller for HealthCheck {
    async fn call(&mut self) -> Result<(), Status> {
        let reply = self
            .0
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner();
        if reply.status == ServingStatus::Serving as i32 {
            Ok(())
        } else {
            Err(Status::internal("baseline is not SERVING"))
        }
    }
}

/// The primary figure: `recvault.vault.v1.Leases/AcquireLease`.
#[derive(Clone)]
struct Acquire {
    client: LeasesClient<Channel>,
    credential_id: String,
    /// Seal to a one-call key (the uploader's way) or ask in clear.
    sealed: bool,
}

impl Acquire {
    async fn acquire(&mut self) -> Result<String, Status> {
        let one_call = if self.sealed {
            Some(hpke::OneCallKey::generate().map_err(|_| Status::internal("key pair"))?)
        } else {
            None
        };
        let reply = self
            .client
            .acquire_lease(AcquireLeaseRequest {
                credential_id: self.credential_id.clone(),
                purpose: "bench".into(),
                ttl_seconds: 0,
                recipient_public_key: one_call
                    .as_ref()
                    .map(|k| k.public_key().to_vec())
                    .unwrap_or_default(),
            })
            .await?
            .into_inner();
        let secret_len = match &one_call {
            Some(key) => key
                .open(
                    hpke::LEASE_INFO,
                    &hpke::aad(&[&reply.lease_id, &self.credential_id]),
                    &reply.enc,
                    &reply.sealed_secret,
                )
                .map_err(|_| Status::internal("the sealed secret does not open"))?
                .len(),
            None => reply.secret.len(),
        };
        if secret_len == 0 || reply.lease_id.is_empty() {
            return Err(Status::internal("AcquireLease answered without a secret"));
        }
        Ok(reply.lease_id)
    }
}

impl Caller for Acquire {
    async fn call(&mut self) -> Result<(), Status> {
        self.acquire().await.map(drop)
    }
}

/// Optional: AcquireLease followed by ReleaseLease of that lease.
#[derive(Clone)]
struct AcquireRelease(Acquire);

impl Caller for AcquireRelease {
    async fn call(&mut self) -> Result<(), Status> {
        let lease_id = self.0.acquire().await?;
        self.0
            .client
            .release_lease(ReleaseLeaseRequest { lease_id })
            .await
            .map(drop)
    }
}

/// Figures of one phase.
#[derive(Debug, Clone, Copy)]
struct Phase {
    calls: u64,
    errors: u64,
    rps: f64,
    p50: Duration,
    p99: Duration,
    /// CPU time of this whole process (clients, server, audit writer) per
    /// call, in microseconds; 0 where `/proc` is not available. Less
    /// sensitive than throughput to other load on the machine.
    cpu_us: f64,
}

impl Phase {
    fn line(&self) -> String {
        format!(
            "{:>9.0} req/s  p50 {:>7.3} ms  p99 {:>7.3} ms  {:>5.1} µs CPU/call  ({} calls, {} errors)",
            self.rps,
            ms(self.p50),
            ms(self.p99),
            self.cpu_us,
            self.calls,
            self.errors
        )
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(sorted: &[u64], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    // Nearest-rank percentile.
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Duration::from_nanos(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// Runs `concurrency` tasks, each calling in a loop until `length` is over.
/// Every call started in the window is counted and timed; a call that fails
/// is counted as an error and makes the benchmark fail.
async fn phase<C: Caller>(callers: &[C], concurrency: usize, length: Duration) -> Phase {
    let cpu_start = recvault_runtime::cpu::process();
    let start = Instant::now();
    let deadline = start + length;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..concurrency {
        let mut caller = callers[i % callers.len()].clone();
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(16 * 1024);
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                match caller.call().await {
                    Ok(()) => latencies.push(t0.elapsed().as_nanos() as u64),
                    Err(status) => {
                        errors += 1;
                        first_error.get_or_insert(status);
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(done) = tasks.join_next().await {
        let (l, e, f) = done.expect("client task panicked");
        latencies.extend(l);
        errors += e;
        if first_error.is_none() {
            first_error = f;
        }
    }
    let elapsed = start.elapsed();
    let cpu = cpu_start
        .zip(recvault_runtime::cpu::process())
        .map(|(a, b)| b.saturating_sub(a));
    if let Some(status) = first_error {
        panic!("{errors} calls failed; first: {status:?}");
    }
    latencies.sort_unstable();
    Phase {
        calls: latencies.len() as u64,
        errors,
        rps: latencies.len() as f64 / elapsed.as_secs_f64(),
        cpu_us: cpu.map_or(0.0, |c| {
            c.as_secs_f64() * 1e6 / latencies.len().max(1) as f64
        }),
        p50: percentile(&latencies, 50.0),
        p99: percentile(&latencies, 99.0),
    }
}

/// Median of the phases, figure by figure.
fn median(phases: &[Phase]) -> Phase {
    fn mid<T: Copy + PartialOrd>(mut v: Vec<T>) -> T {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[v.len() / 2]
    }
    // With an even count take the mean of the two middle values.
    fn mid_f(mut v: Vec<f64>) -> f64 {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        let n = v.len();
        if n.is_multiple_of(2) {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        } else {
            v[n / 2]
        }
    }
    let mid_d = |f: fn(&Phase) -> Duration| {
        Duration::from_secs_f64(mid_f(phases.iter().map(|p| f(p).as_secs_f64()).collect()))
    };
    Phase {
        calls: mid(phases.iter().map(|p| p.calls).collect()),
        errors: phases.iter().map(|p| p.errors).sum(),
        rps: mid_f(phases.iter().map(|p| p.rps).collect()),
        p50: mid_d(|p| p.p50),
        p99: mid_d(|p| p.p99),
        cpu_us: mid_f(phases.iter().map(|p| p.cpu_us).collect()),
    }
}

/// The baseline server: tonic-health only, with the vault's TLS set-up and
/// server builder settings. Returns its address; it serves until the runtime ends.
async fn start_baseline(config: &recvault_vault::config::VaultConfig) -> SocketAddr {
    let tls = ReloadingServerTls::load(config.tls.clone()).expect("baseline TLS");
    let (listener, addr) = tls::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .await
        .expect("baseline binds");
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let interval = config.reload_interval();
    tokio::spawn(async move {
        let _reporter = reporter;
        let _reloader = tls.spawn_reloader(interval);
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .add_service(health)
            .serve_with_incoming(tls::incoming(
                listener,
                tls,
                tls::HandshakeRefusals::new(
                    Default::default(),
                    "bench_tls_handshakes_refused_total",
                ),
            ))
            .await
            .expect("baseline serves");
    });
    addr
}

fn channels(addr: SocketAddr, certs: &Path, n: usize) -> Vec<Channel> {
    (0..n)
        .map(|_| {
            tls::channel(
                &addr.to_string(),
                "localhost",
                &devcerts::files(certs, CLIENT),
            )
            .expect("client TLS config")
        })
        .collect()
}

async fn store_credential(vault: &testing::TestVault) -> String {
    let secret = serde_json::json!({
        "access_key_id": "AKIAIOSFODNN7EXAMPLE",
        "secret_access_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    });
    CredentialsClient::new(vault.channel("manager"))
        .put_credential(PutCredentialRequest {
            tenant_id: "bench".into(),
            name: "s3-bench".into(),
            kind: CredentialKind::S3 as i32,
            secret: serde_json::to_vec(&secret).expect("json"),
            ..Default::default()
        })
        .await
        .expect("PutCredential as manager")
        .into_inner()
        .credential_id
}

async fn run(settings: Settings) {
    let root = match &settings.dir {
        Some(dir) => tempfile::tempdir_in(dir),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let mut config = testing::prepare(root.path());
    // The primary phases acquire leases without releasing them (60 s default
    // TTL); lift the live-lease cap so the bench measures the path, not the cap.
    config.leases.max_active = usize::MAX;
    // Only for the "clear, no wiping" comparison phases.
    config.secrets.allow_plaintext = true;
    let pg_vault = match recvault_tests::postgres::Postgres::shared() {
        Some(pg) => {
            let url_file = pg.database().url_file(root.path());
            let mut pg_config = config.clone();
            pg_config.database = None;
            pg_config.database_url_file = Some(url_file);
            Some(testing::TestVault::start_with(pg_config).await)
        }
        None => None,
    };
    let vault = testing::TestVault::start_with(config).await;
    let baseline_addr = start_baseline(&vault.config).await;
    let credential_id = store_credential(&vault).await;
    let pg_acquire: Vec<Acquire> = match &pg_vault {
        Some(pg) => {
            let id = store_credential(pg).await;
            channels(pg.addr, &pg.certs, settings.channels)
                .into_iter()
                .map(|c| Acquire {
                    client: LeasesClient::new(c),
                    credential_id: id.clone(),
                    sealed: true,
                })
                .collect()
        }
        None => {
            println!(
                "postgresql: skipped (PostgreSQL is not installed: apt-get install -y postgresql)"
            );
            Vec::new()
        }
    };

    let group = GroupCommitOptions::default();
    println!(
        "lease_throughput: {} client tasks over {} HTTP/2 connections per service, {} s per phase \
         after {} s warm-up, {} rounds, {} tokio workers on {} CPUs",
        settings.concurrency,
        settings.channels,
        settings.seconds,
        settings.warmup,
        settings.rounds,
        settings.workers,
        std::thread::available_parallelism().map_or(0, usize::from),
    );
    println!(
        "vault: mTLS (TLS 1.3, client cert) on {}, audit log {} (WAL, synchronous=FULL, group \
         commit max_batch={}, linger {:?} once a commit carries {} events)",
        vault.addr,
        vault.config.audit_database.display(),
        group.max_batch,
        group.linger,
        group.busy_batch,
    );
    println!(
        "baseline: grpc.health.v1.Health/Check on {baseline_addr}, same certificates and TLS set-up"
    );

    let baseline: Vec<HealthCheck> = channels(baseline_addr, &vault.certs, settings.channels)
        .into_iter()
        .map(|c| HealthCheck(HealthClient::new(c)))
        .collect();
    let acquire: Vec<Acquire> = channels(vault.addr, &vault.certs, settings.channels)
        .into_iter()
        .map(|c| Acquire {
            client: LeasesClient::new(c),
            credential_id: credential_id.clone(),
            sealed: true,
        })
        .collect();
    let clear: Vec<Acquire> = acquire
        .iter()
        .cloned()
        .map(|a| Acquire { sealed: false, ..a })
        .collect();

    let length = Duration::from_secs_f64(settings.seconds);
    let warmup = Duration::from_secs_f64(settings.warmup);
    phase(&baseline, settings.concurrency, warmup).await;
    phase(&acquire, settings.concurrency, warmup).await;
    if !pg_acquire.is_empty() {
        phase(&pg_acquire, settings.concurrency, warmup).await;
    }

    let mut pg_phases = Vec::new();
    let mut base_phases = Vec::new();
    let mut vault_phases = Vec::new();
    let (mut events, mut commits) = (0u64, 0u64);
    for round in 1..=settings.rounds {
        let b = phase(&baseline, settings.concurrency, length).await;
        println!("round {round} baseline Health/Check       {}", b.line());
        let before = vault.core.audit.stats();
        let writer_before = recvault_runtime::cpu::threads("audit-writer");
        let wait_before = vault.core.metrics.audit_append.count_and_sum();
        let v = phase(&acquire, settings.concurrency, length).await;
        let writer_cpu = writer_before
            .zip(recvault_runtime::cpu::threads("audit-writer"))
            .map_or(Duration::ZERO, |(a, b)| b.saturating_sub(a));
        let after = vault.core.audit.stats();
        let wait_after = vault.core.metrics.audit_append.count_and_sum();
        let audit_wait = (wait_after.1 - wait_before.1).as_secs_f64() * 1e3
            / (wait_after.0 - wait_before.0).max(1) as f64;
        let (e, c) = (after.events - before.events, after.commits - before.commits);
        println!("round {round} vault    Leases/AcquireLease {}", v.line());
        println!(
            "round {round} ratio {:.3}; audit {e} events in {c} commits: {:.1} events/fsync, \
             one commit every {:.2} ms, writer thread {:.1} µs CPU/event, mean wait for durability {:.2} ms",
            v.rps / b.rps,
            e as f64 / c.max(1) as f64,
            length.as_secs_f64() * 1e3 / c.max(1) as f64,
            writer_cpu.as_secs_f64() * 1e6 / e.max(1) as f64,
            audit_wait,
        );
        if !pg_acquire.is_empty() {
            let p = phase(&pg_acquire, settings.concurrency, length).await;
            println!(
                "round {round} pg       Leases/AcquireLease {} ratio {:.3}",
                p.line(),
                p.rps / b.rps
            );
            pg_phases.push(p);
        }
        events += e;
        commits += c;
        base_phases.push(b);
        vault_phases.push(v);
    }
    let b = median(&base_phases);
    let v = median(&vault_phases);
    let ratio = v.rps / b.rps;
    let per_fsync = events as f64 / commits.max(1) as f64;
    println!("median   baseline Health/Check       {}", b.line());
    println!("median   vault    Leases/AcquireLease {}", v.line());
    println!(
        "audit    {events} events in {commits} commits during the vault phases: {per_fsync:.1} events per fsync"
    );
    // Phases of one round are adjacent in time; the median of the per-round
    // ratios is the steadier figure when other load on the machine drifts.
    let mut paired: Vec<f64> = base_phases
        .iter()
        .zip(&vault_phases)
        .map(|(b, v)| v.rps / b.rps)
        .collect();
    paired.sort_by(f64::total_cmp);
    let n = paired.len();
    let paired = if n.is_multiple_of(2) {
        (paired[n / 2 - 1] + paired[n / 2]) / 2.0
    } else {
        paired[n / 2]
    };
    println!(
        "ratio    vault/baseline throughput {ratio:.3} (of the medians; per-round median {paired:.3}) \
         (target >= 0.800: {})",
        if ratio >= 0.8 { "met" } else { "NOT MET" }
    );
    if !pg_phases.is_empty() {
        let p = median(&pg_phases);
        println!("median   pg       Leases/AcquireLease {}", p.line());
        println!(
            "ratio    postgresql/baseline throughput {:.3}, postgresql/sqlite {:.3} (target >= 0.650: {})",
            p.rps / b.rps,
            p.rps / v.rps,
            if p.rps / b.rps >= 0.65 {
                "met"
            } else {
                "NOT MET"
            }
        );
    }

    if settings.pairs {
        let pairs: Vec<AcquireRelease> = acquire.iter().cloned().map(AcquireRelease).collect();
        let p = phase(&pairs, settings.concurrency, length).await;
        println!(
            "extra    vault    AcquireLease+ReleaseLease (2 RPCs, 2 audit events per call) {}",
            p.line()
        );
    }

    // The price of sealing and of wiping, apart: clear without wiping (as
    // before), sealed without wiping, sealed + wiping (as shipped),
    // alternating. CPU per call counts the client's share too (it makes a
    // key pair and opens the reply: two of the four X25519 operations).
    let (mut shipped, mut sealed_only, mut before) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=settings.rounds {
        recvault_runtime::alloc::set_wiping(false);
        let c = phase(&clear, settings.concurrency, length).await;
        println!("round {round} cost  clear, no wiping       {}", c.line());
        let n = phase(&acquire, settings.concurrency, length).await;
        println!("round {round} cost  sealed, no wiping      {}", n.line());
        recvault_runtime::alloc::set_wiping(true);
        let s = phase(&acquire, settings.concurrency, length).await;
        println!("round {round} cost  sealed + wiping        {}", s.line());
        before.push(c);
        sealed_only.push(n);
        shipped.push(s);
    }
    let (c, n, s) = (median(&before), median(&sealed_only), median(&shipped));
    let cost = |what: &str, with: &Phase, without: &Phase| {
        println!(
            "cost     {what}: throughput {:.3}, CPU per call {:.3} ({:.1} vs {:.1} µs, client and server)",
            with.rps / without.rps,
            with.cpu_us / without.cpu_us.max(f64::MIN_POSITIVE),
            with.cpu_us,
            without.cpu_us,
        );
    };
    cost("sealing (sealed / clear, no wiping)", &n, &c);
    cost("wiping (sealed + wiping / sealed)", &s, &n);
    cost("both (sealed + wiping / clear without wiping)", &s, &c);

    let report = vault.core.audit.verify().await;
    assert!(report.ok, "audit chain does not verify: {report:?}");
    println!(
        "audit    chain verified: {} events, {} commits since start",
        report.events_checked,
        vault.core.audit.stats().commits
    );
    println!(
        "summary: AcquireLease {:.0} req/s (p50 {:.2} ms, p99 {:.2} ms) vs baseline Health/Check {:.0} req/s \
         (p50 {:.2} ms, p99 {:.2} ms), ratio {ratio:.2}, {per_fsync:.1} audit events per fsync, \
         concurrency {} over {} connections",
        v.rps,
        ms(v.p50),
        ms(v.p99),
        b.rps,
        ms(b.p50),
        ms(b.p99),
        settings.concurrency,
        settings.channels,
    );
    vault.stop().await;
    if let Some(pg) = pg_vault {
        pg.stop().await;
    }
}

fn main() {
    let mut settings = Settings::from_env();
    // `cargo bench` passes `--bench`. Without it (`cargo test --all-targets`)
    // this is a smoke run: same code path, short phases.
    if !std::env::args().any(|a| a == "--bench") {
        println!("lease_throughput: no --bench flag, smoke run with short phases");
        settings.seconds = settings.seconds.min(0.3);
        settings.warmup = settings.warmup.min(0.2);
        settings.rounds = 1;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(settings.workers)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(run(settings));
}
