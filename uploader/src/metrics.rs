//! The uploader's Prometheus metrics (served on their own loopback port):
//! jobs by state, bytes delivered, retries, verification failures, scrub
//! results, ingest outcomes and audit write failures.

use std::{sync::Arc, time::Duration};

use recvault_runtime::metrics::{Counter, Gauge, Registry};

use crate::jobs::{JobState, JobStore};

/// Handles to every uploader metric.
#[derive(Debug)]
pub struct UploaderMetrics {
    pub registry: Arc<Registry>,
    pub ingested: Arc<Counter>,
    pub ingest_rejected: Arc<Counter>,
    pub delivered: Arc<Counter>,
    pub bytes_delivered: Arc<Counter>,
    retries_transient: Arc<Counter>,
    retries_doubtful: Arc<Counter>,
    pub retained: Arc<Counter>,
    pub verification_failures: Arc<Counter>,
    /// Attempts this replica stopped because another replica took the job over.
    pub claims_lost: Arc<Counter>,
    pub scrub_checked: Arc<Counter>,
    pub scrub_corrupt: Arc<Counter>,
    pub audit_failures: Arc<Counter>,
}

const STATES: [JobState; 6] = [
    JobState::Stored,
    JobState::Uploading,
    JobState::Verifying,
    JobState::Delivered,
    JobState::Retrying,
    JobState::Retained,
];

const RETRIES_HELP: &str = "Delivery attempts that failed and were scheduled again: class=\"transient\" (retried for [delivery].retry_window_secs) or \"doubtful\" (may be permanent; [delivery].max_doubtful_failures).";

impl UploaderMetrics {
    pub fn new() -> Arc<Self> {
        let r = Arc::new(Registry::default());
        let c = |name: &str, help: &str| r.counter(name, help, &[]);
        Arc::new(Self {
            ingested: c(
                "recvault_uploader_recordings_ingested_total",
                "Recordings stored durably in the backup store.",
            ),
            ingest_rejected: c(
                "recvault_uploader_ingest_rejected_total",
                "Upload streams refused (bad header or destination, file name in use, bad CRC-32, SHA-256 mismatch, cut or idle stream, storage failure).",
            ),
            delivered: c(
                "recvault_uploader_deliveries_total",
                "Recordings delivered and verified.",
            ),
            bytes_delivered: c(
                "recvault_uploader_bytes_delivered_total",
                "Bytes of recordings delivered and verified.",
            ),
            retries_transient: r.counter(
                "recvault_uploader_retries_total",
                RETRIES_HELP,
                &[("class", "transient")],
            ),
            retries_doubtful: r.counter(
                "recvault_uploader_retries_total",
                RETRIES_HELP,
                &[("class", "doubtful")],
            ),
            retained: c(
                "recvault_uploader_retained_total",
                "Jobs that ended RETAINED (permanent error, retry window over, or doubtful-failure budget used up).",
            ),
            verification_failures: c(
                "recvault_uploader_verification_failures_total",
                "Delivered objects whose size or checksum did not match.",
            ),
            claims_lost: c(
                "recvault_uploader_claims_lost_total",
                "Attempts stopped because this replica's claim on the job expired and another replica took it over.",
            ),
            scrub_checked: c(
                "recvault_uploader_scrub_checked_total",
                "Backups re-hashed by the scrub.",
            ),
            scrub_corrupt: c(
                "recvault_uploader_scrub_corrupt_total",
                "Backups the scrub found corrupt (never uploaded).",
            ),
            audit_failures: c(
                "recvault_uploader_audit_failures_total",
                "Audit events that could not be made durable (their calls failed UNAVAILABLE).",
            ),
            registry: r,
        })
    }

    /// Counts a failed attempt that was scheduled again, by how it is retried.
    pub fn retry(&self, doubtful: bool) {
        if doubtful {
            self.retries_doubtful.inc();
        } else {
            self.retries_transient.inc();
        }
    }

    fn state_gauge(&self, state: JobState) -> Arc<Gauge> {
        self.registry.gauge(
            "recvault_uploader_jobs",
            "Jobs by state.",
            &[("state", state.as_str())],
        )
    }

    /// Refreshes the jobs-by-state gauges every `interval` until dropped.
    pub fn spawn_job_gauges(
        self: &Arc<Self>,
        jobs: JobStore,
        interval: Duration,
    ) -> tokio::task::JoinHandle<()> {
        let this = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            loop {
                tick.tick().await;
                let Some(this) = this.upgrade() else { return };
                if let Ok(counts) = jobs.count_by_state().await {
                    for state in STATES {
                        let n = counts
                            .iter()
                            .find(|(s, _)| *s == state)
                            .map_or(0, |(_, n)| *n);
                        this.state_gauge(state)
                            .set(i64::try_from(n).unwrap_or(i64::MAX));
                    }
                }
            }
        })
    }
}
