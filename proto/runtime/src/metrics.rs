//! Prometheus metrics: a small registry of counters, gauges and histograms and
//! a loopback HTTP endpoint serving the text exposition format (0.0.4) on its
//! own port, apart from the mTLS API. Metric values are counts and timings,
//! never identifiers of secrets.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::net::TcpListener;

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Latency buckets in seconds, 100 µs to 10 s.
const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0, 10.0,
];

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        for (bound, count) in BUCKETS.iter().zip(&self.counts) {
            if secs <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(
            u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Observations so far and their total duration.
    pub fn count_and_sum(&self) -> (u64, Duration) {
        (
            self.count.load(Ordering::Relaxed),
            Duration::from_micros(self.sum_micros.load(Ordering::Relaxed)),
        )
    }
}

#[derive(Debug, Clone)]
enum Metric {
    Counter(Arc<Counter>),
    Gauge(Arc<Gauge>),
    Histogram(Arc<Histogram>),
}

/// One metric family: a name, help text and series keyed by their label string.
#[derive(Debug)]
struct Family {
    help: String,
    kind: &'static str,
    series: BTreeMap<String, Metric>,
}

/// The set of metrics one service exposes.
#[derive(Debug, Default)]
pub struct Registry {
    families: Mutex<BTreeMap<String, Family>>,
}

fn labels(pairs: &[(&str, &str)]) -> String {
    if pairs.is_empty() {
        return String::new();
    }
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            format!(
                "{k}=\"{}\"",
                v.replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n")
            )
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

impl Registry {
    fn get_or_insert(
        &self,
        name: &str,
        help: &str,
        kind: &'static str,
        pairs: &[(&str, &str)],
        make: impl FnOnce() -> Metric,
    ) -> Metric {
        let mut families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let family = families.entry(name.to_owned()).or_insert_with(|| Family {
            help: help.to_owned(),
            kind,
            series: BTreeMap::new(),
        });
        family
            .series
            .entry(labels(pairs))
            .or_insert_with(make)
            .clone()
    }

    /// The counter `name{labels}`, created on first use.
    pub fn counter(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Counter> {
        match self.get_or_insert(name, help, "counter", pairs, || {
            Metric::Counter(Arc::default())
        }) {
            Metric::Counter(c) => c,
            _ => Arc::default(),
        }
    }

    /// The gauge `name{labels}`, created on first use.
    pub fn gauge(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Gauge> {
        match self.get_or_insert(name, help, "gauge", pairs, || Metric::Gauge(Arc::default())) {
            Metric::Gauge(g) => g,
            _ => Arc::default(),
        }
    }

    /// The histogram `name{labels}` (seconds), created on first use.
    pub fn histogram(&self, name: &str, help: &str, pairs: &[(&str, &str)]) -> Arc<Histogram> {
        match self.get_or_insert(name, help, "histogram", pairs, || {
            Metric::Histogram(Arc::default())
        }) {
            Metric::Histogram(h) => h,
            _ => Arc::default(),
        }
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let families = self.families.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = String::new();
        for (name, f) in families.iter() {
            let _ = writeln!(out, "# HELP {name} {}", f.help);
            let _ = writeln!(out, "# TYPE {name} {}", f.kind);
            for (labels, metric) in &f.series {
                match metric {
                    Metric::Counter(c) => {
                        let _ = writeln!(out, "{name}{labels} {}", c.get());
                    }
                    Metric::Gauge(g) => {
                        let _ = writeln!(out, "{name}{labels} {}", g.get());
                    }
                    Metric::Histogram(h) => {
                        let with = |extra: &str| {
                            if labels.is_empty() {
                                format!("{{{extra}}}")
                            } else {
                                format!("{},{extra}}}", &labels[..labels.len() - 1])
                            }
                        };
                        for (bound, count) in BUCKETS.iter().zip(&h.counts) {
                            let _ = writeln!(
                                out,
                                "{name}_bucket{} {}",
                                with(&format!("le=\"{bound}\"")),
                                count.load(Ordering::Relaxed)
                            );
                        }
                        let total = h.count.load(Ordering::Relaxed);
                        let _ = writeln!(out, "{name}_bucket{} {total}", with("le=\"+Inf\""));
                        let _ = writeln!(
                            out,
                            "{name}_sum{labels} {}",
                            h.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
                        );
                        let _ = writeln!(out, "{name}_count{labels} {total}");
                    }
                }
            }
        }
        out
    }
}

/// Serves `GET /metrics` over plain HTTP on `addr` (loopback by default: put it
/// behind the cluster's scrape network, never the internet). Returns the bound address.
pub async fn serve(addr: SocketAddr, registry: Arc<Registry>) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let registry = registry.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let registry = registry.clone();
                        async move {
                            let (status, body) = if req.uri().path() == "/metrics" {
                                (http::StatusCode::OK, registry.render())
                            } else {
                                (
                                    http::StatusCode::NOT_FOUND,
                                    "only /metrics is served here\n".to_owned(),
                                )
                            };
                            http::Response::builder()
                                .status(status)
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_gauges_and_histograms_in_text_format() {
        let r = Registry::default();
        r.counter(
            "recvault_leases_total",
            "Leases.",
            &[("outcome", "granted")],
        )
        .add(3);
        r.gauge("recvault_jobs", "Jobs by state.", &[("state", "retained")])
            .set(2);
        r.histogram(
            "recvault_audit_commit_seconds",
            "Audit commit latency.",
            &[],
        )
        .observe(Duration::from_millis(2));
        let text = r.render();
        assert!(
            text.contains("# TYPE recvault_leases_total counter"),
            "{text}"
        );
        assert!(
            text.contains("recvault_leases_total{outcome=\"granted\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("recvault_jobs{state=\"retained\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("recvault_audit_commit_seconds_bucket{le=\"0.0025\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("recvault_audit_commit_seconds_bucket{le=\"0.001\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("recvault_audit_commit_seconds_count 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn serves_metrics_over_http() {
        let r = Arc::new(Registry::default());
        r.counter("x_total", "X.", &[]).inc();
        let addr = serve("127.0.0.1:0".parse().expect("addr"), r)
            .await
            .expect("bind");
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
            .await
            .expect("write");
        let mut body = String::new();
        stream.read_to_string(&mut body).await.expect("read");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        assert!(body.contains("x_total 1"), "{body}");
    }
}
