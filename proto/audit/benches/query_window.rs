//! QueryEvents with a one-hour time window over a 1,000,000-event embedded
//! log (target: the whole window answered in under 100 ms), beside the same
//! events fetched by sequence range (the primary-key scan), measured in the
//! same run.
//!
//! The log spans seven days (about 6,000 events per hour). Each measurement
//! reads a whole window as `QueryEvents` does, page by page
//! ([`MAX_QUERY_LIMIT`] events per page): the first hour, one in the
//! middle and the last hour, five times each; the summary prints medians.
//!
//! Run: `cargo bench -p recvault-audit --bench query_window`
//! (`BENCH_EVENTS`, default 1,000,000; `BENCH_DIR`, where the log is built.)

#![allow(clippy::unwrap_used)]

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use recvault_audit::{
    AuditFilter, AuditKey, AuditLog, AuditRecord, GroupCommitOptions, MAX_QUERY_LIMIT, Outcome,
};
use recvault_runtime::secret::SecretBytes;
use time::OffsetDateTime;

const SPAN: Duration = Duration::from_secs(7 * 24 * 3600);
const HOUR: Duration = Duration::from_secs(3600);

/// Reads every event of `filter` after `after`, a page at a time; returns
/// how many and how long it took.
async fn read_all(log: &AuditLog, filter: &AuditFilter, mut after: u64) -> (usize, Duration) {
    let started = Instant::now();
    let mut n = 0;
    loop {
        let page = log.query(filter, after, MAX_QUERY_LIMIT).await.unwrap();
        n += page.len();
        match page.last() {
            Some(last) if page.len() == MAX_QUERY_LIMIT as usize => after = last.sequence,
            _ => break,
        }
    }
    (n, started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let events: u64 = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if full { 1_000_000 } else { 20_000 });
    if !full {
        println!("query_window: no --bench flag, smoke run with {events} events");
    }
    let dir = match std::env::var_os("BENCH_DIR") {
        Some(d) => tempfile::tempdir_in(d).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let path = dir.path().join("audit.db");
        let key = || AuditKey::new(SecretBytes::from_slice(&[7; 32])).unwrap();
        let log = Arc::new(AuditLog::open(&path, key(), GroupCommitOptions::default()).unwrap());
        let start = OffsetDateTime::now_utc() - SPAN;
        let step = SPAN.as_nanos() as u64 / events;
        let built = Instant::now();
        // Appends in flight at once, so the writer commits big batches.
        const IN_FLIGHT: u64 = 4096;
        let mut i = 0;
        while i < events {
            let mut batch = tokio::task::JoinSet::new();
            for j in i..(i + IN_FLIGHT).min(events) {
                let log = log.clone();
                let time = start + Duration::from_nanos(j * step);
                batch.spawn(async move {
                    log.append(AuditRecord {
                        time,
                        tenant_id: format!("tenant-{}", j % 50),
                        credential_id: format!("cred-{}", j % 5000),
                        request_id: format!("req-{j}"),
                        ..AuditRecord::now(
                            "recvault.vault.v1.Leases/AcquireLease",
                            Outcome::Allowed,
                            "OK",
                        )
                    })
                    .await
                    .unwrap()
                });
            }
            while let Some(done) = batch.join_next().await {
                done.unwrap();
            }
            i += IN_FLIGHT;
        }
        println!(
            "built a {events}-event log over 7 days in {:.1?} ({:.0} events/s)",
            built.elapsed(),
            events as f64 / built.elapsed().as_secs_f64()
        );

        let per_hour = events * HOUR.as_nanos() as u64 / SPAN.as_nanos() as u64;
        let mut window_times = Vec::new();
        let mut range_times = Vec::new();
        for (name, offset) in [
            ("first hour", Duration::ZERO),
            ("middle hour", SPAN / 2),
            ("last hour", SPAN - HOUR),
        ] {
            let since = start + offset;
            let window = AuditFilter {
                since: Some(since),
                until: Some(since + HOUR),
                ..AuditFilter::default()
            };
            // The same events by sequence: what a primary-key range costs.
            let first_seq = offset.as_nanos() as u64 / step;
            let by_range = AuditFilter::default();
            let mut w = Vec::new();
            let mut r = Vec::new();
            let mut found = 0;
            for _ in 0..5 {
                let (n, t) = read_all(&log, &window, 0).await;
                found = n;
                w.push(t);
                let started = Instant::now();
                let mut got = 0;
                let mut after = first_seq;
                while got < n {
                    let page = log
                        .query(&by_range, after, MAX_QUERY_LIMIT.min((n - got) as u32))
                        .await
                        .unwrap();
                    let Some(last) = page.last() else { break };
                    after = last.sequence;
                    got += page.len();
                }
                r.push(started.elapsed());
            }
            let (w, r) = (median(w), median(r));
            println!(
                "{name}: {found} events (expected ~{per_hour}) by time window {w:.2?}, \
                 by sequence range {r:.2?} (ratio {:.2})",
                w.as_secs_f64() / r.as_secs_f64()
            );
            window_times.push(w);
            range_times.push(r);
        }
        let worst = window_times.iter().max().unwrap();
        println!(
            "summary: one-hour window over {events} events, worst median {worst:.2?} \
             (target < 100 ms: {})",
            if *worst < Duration::from_millis(100) {
                "met"
            } else {
                "NOT met"
            }
        );
    });
}
