//! Intake benchmark (not a test): the backup writer's whole path with
//! encryption at rest — SHA-256 of the plaintext and AES-256-GCM per 64 KiB
//! segment on the caller's thread; write and SHA-256 of the stored bytes on
//! the writer's thread; fsync, rename — against the same path without
//! encryption (what the writer did before: SHA-256, write through a 1 MiB
//! buffer, fsync, rename, on one thread), in one run, alternating, on the
//! same disk. Prints MiB/s and CPU seconds per GiB for both, and the ratios.
//!
//! The encrypted path also runs a second time per pair with the daemons'
//! zeroing allocator wiping freed memory (it is off for the other two), each
//! chunk arriving in a freshly allocated buffer as the gRPC decoder hands it
//! over, so the wiping cost is priced in the same run.
//!
//! ```text
//! cargo bench -p recvault-uploader --bench intake
//! ```
//!
//! Environment (optional): `BENCH_INTAKE_MIB` (1024), `BENCH_INTAKE_RUNS`
//! (3 rounds), `BENCH_CHUNK_KIB` (1024: the chunk size a recorder sends),
//! `BENCH_DIR` (`target/tmp/bench-intake`).

use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Write as _};
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use recvault_uploader::backup::BackupStore;
use recvault_uploader::backup::wrapping::{WrappingKey, suite};
use recvault_uploader::digest::Sha256Digest;
use recvault_uploader::jobs::{RecordingId, TenantId};
use sha2::{Digest as _, Sha256};

const MIB: usize = 1024 * 1024;

// The allocator uploaderd runs with; wiping is switched per phase.
#[global_allocator]
static ALLOCATOR: recvault_runtime::alloc::Zeroing = recvault_runtime::alloc::Zeroing;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The writer without encryption: buffered writes, SHA-256, fsync, rename,
/// directory fsync (the backup store's path before encryption at rest).
fn write_plain(dir: &Path, chunk: &[u8], chunks: usize, expected: Sha256Digest) -> PathBuf {
    let staging = dir.join("plain.part");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .expect("create");
    let mut out = BufWriter::with_capacity(MIB, file);
    let mut sha = Sha256::new();
    for _ in 0..chunks {
        out.write_all(chunk).expect("write");
        sha.update(chunk);
    }
    assert_eq!(Sha256Digest::from_hasher(sha), expected);
    let file = out.into_inner().expect("flush");
    file.sync_all().expect("fsync");
    drop(file);
    let target = dir.join("plain");
    fs::rename(&staging, &target).expect("rename");
    File::open(dir)
        .and_then(|d| d.sync_all())
        .expect("fsync dir");
    target
}

/// CPU seconds this process used so far (all threads, the writer's included).
fn cpu_secs() -> f64 {
    recvault_runtime::cpu::process().map_or(f64::NAN, |d| d.as_secs_f64())
}

fn main() {
    let total_mib = env_usize("BENCH_INTAKE_MIB", 1024);
    let runs = env_usize("BENCH_INTAKE_RUNS", 3).max(1);
    let chunk_len = env_usize("BENCH_CHUNK_KIB", 1024) * 1024;
    let dir = std::env::var_os("BENCH_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/tmp/bench-intake"),
        PathBuf::from,
    );
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(dir.join("plain")).expect("bench dir");

    let chunks = total_mib * MIB / chunk_len;
    let mut chunk = vec![0u8; chunk_len];
    getrandom::fill(&mut chunk).expect("random");
    let mut sha = Sha256::new();
    for _ in 0..chunks {
        sha.update(&chunk);
    }
    let expected = Sha256Digest::from_hasher(sha);
    let mib = (chunks * chunk_len) as f64 / MIB as f64;

    let (public, _private) = suite().generate_key_pair().expect("key pair");
    let key = WrappingKey::new(1, public.0.as_slice().try_into().expect("32 bytes"));
    let store = BackupStore::open(dir.join("store"), key).expect("store");
    let tenant = TenantId::parse("bench").expect("tenant");

    println!(
        "intake: {mib:.0} MiB in {} KiB chunks, {runs} rounds, alternating, in {}",
        chunk_len / 1024,
        dir.display()
    );
    let (mut plain, mut encrypted, mut wiped) = (Vec::new(), Vec::new(), Vec::new());
    let (mut plain_cpu, mut encrypted_cpu, mut wiped_cpu) = (Vec::new(), Vec::new(), Vec::new());
    let gib = mib / 1024.0;
    // One encrypted ingest, each chunk in a fresh buffer: (MiB/s, CPU s/GiB).
    let encrypted_run = |name: String, wiping: bool| {
        recvault_runtime::alloc::set_wiping(wiping);
        let cpu = cpu_secs();
        let start = Instant::now();
        let recording = RecordingId::parse(name).expect("recording");
        let mut writer = store.begin(&tenant, &recording).expect("begin");
        for _ in 0..chunks {
            let message = std::hint::black_box(chunk.clone());
            writer.write_chunk(&message).expect("write");
        }
        let stored = writer.finish(expected).expect("finish");
        let secs = start.elapsed().as_secs_f64();
        let cpu = (cpu_secs() - cpu) / gib;
        fs::remove_file(stored.path).expect("remove");
        recvault_runtime::alloc::set_wiping(false);
        (mib / secs, cpu)
    };
    recvault_runtime::alloc::set_wiping(false);
    for run in 0..runs {
        let cpu = cpu_secs();
        let start = Instant::now();
        let path = write_plain(&dir.join("plain"), &chunk, chunks, expected);
        let secs = start.elapsed().as_secs_f64();
        plain.push(mib / secs);
        plain_cpu.push((cpu_secs() - cpu) / gib);
        fs::remove_file(path).expect("remove");

        let (rate, cpu) = encrypted_run(format!("bench-{run}"), false);
        encrypted.push(rate);
        encrypted_cpu.push(cpu);
        let (rate_w, cpu_w) = encrypted_run(format!("bench-{run}-wiped"), true);
        wiped.push(rate_w);
        wiped_cpu.push(cpu_w);
        println!(
            "  run {}: without encryption {:.0} MiB/s ({:.2} CPU s/GiB), encrypted {:.0} MiB/s ({:.2} CPU s/GiB), encrypted + wiping {:.0} MiB/s ({:.2} CPU s/GiB)",
            run + 1,
            mib / secs,
            plain_cpu[run],
            rate,
            cpu,
            rate_w,
            cpu_w,
        );
    }
    let (p, e, w) = (median(plain), median(encrypted), median(wiped));
    let (pc, ec, wc) = (median(plain_cpu), median(encrypted_cpu), median(wiped_cpu));
    println!(
        "median: encrypted + wiping {w:.0} MiB/s vs encrypted {e:.0} MiB/s; ratio {:.3}; CPU {wc:.2} vs {ec:.2} s/GiB, ratio {:.2} (the zeroing allocator's cost)",
        w / e,
        wc / ec
    );
    println!(
        "median: without encryption {p:.0} MiB/s, encrypted {e:.0} MiB/s; ratio {:.3} (throughput cost {:.1} %)",
        e / p,
        (1.0 - e / p) * 100.0
    );
    println!(
        "median CPU: without encryption {pc:.2} s/GiB, encrypted {ec:.2} s/GiB; ratio {:.2}",
        ec / pc
    );
    let _ = fs::remove_dir_all(&dir);
}
