//! The metrics endpoint (`[metrics] address`): Prometheus text format (0.0.4) over HTTP/1.x,
//! on loopback TCP or a Unix socket, `GET /metrics` only.
//!
//! Request counts and durations come from the gRPC layer through the core's
//! [`Observer`](snapshotter::stats::Observer) (a histogram per operation and result code);
//! everything else is read from the core at each scrape ([`Snapshotter::stats`],
//! [`Snapshotter::store_stats`], [`Snapshotter::heavy_stats`]). The HTTP side is a few lines
//! on purpose: one request per connection, its head bounded in size and time, so a stuck or
//! hostile client costs one task for a few seconds.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use snapshotter::Snapshotter;
use snapshotter::config::MetricsAddress;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Request durations' buckets, seconds: metadata calls take well under a millisecond, an
/// Apply of a big layer minutes.
const BUCKETS: [f64; 18] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 1800.0,
];

/// Longest a client may take to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head read.
const MAX_HEAD: usize = 8 << 10;

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    code: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

type Durations = Family<RequestLabels, Histogram, fn() -> Histogram>;

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

/// Codes that mean the daemon failed, not the caller (as the request log has them).
fn server_fault(code: &str) -> bool {
    matches!(code, "Internal" | "Unknown" | "DataLoss")
}

/// What the gRPC layer reports, kept in prometheus-client metrics.
#[derive(Debug)]
struct Requests {
    durations: Durations,
    errors: Family<OpLabels, Counter>,
}

impl snapshotter::stats::Observer for Requests {
    fn request(&self, op: &'static str, code: &'static str, elapsed: Duration) {
        self.durations
            .get_or_create(&RequestLabels { op, code })
            .observe(elapsed.as_secs_f64());
        if server_fault(code) {
            self.errors.get_or_create(&OpLabels { op }).inc();
        }
    }
}

/// The core's own counters and the store's state, read at each scrape.
#[derive(Debug)]
struct CoreCollector {
    // Weak: the endpoint must not keep the core (and its store) open after the daemon stops.
    core: std::sync::Weak<Snapshotter>,
}

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    label: &str,
    values: &[(&str, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (v, n) in values {
        ConstCounter::new(*n).encode(m.encode_family(&[(label, *v)])?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn signed(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Collector for CoreCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(core) = self.core.upgrade() else {
            return Ok(());
        };
        let s = core.stats();
        counter(
            &mut e,
            "erofs_snapshotter_layers_converted",
            "Layers written as EROFS images, by where (apply: the differ from a layer blob; commit: an upper directory).",
            "op",
            &[("apply", s.apply_layers), ("commit", s.commit_layers)],
        )?;
        counter(
            &mut e,
            "erofs_snapshotter_converted_bytes",
            "Bytes of EROFS layer images written, by where.",
            "op",
            &[("apply", s.apply_bytes), ("commit", s.commit_bytes)],
        )?;
        counter(
            &mut e,
            "erofs_snapshotter_fallbacks",
            "Things done the slower or weaker way because the kernel lacks the better one: loop_device (an EROFS mount through a loop device instead of from the file), fsverity_userspace (a layer sealed with a userspace digest instead of kernel fs-verity), dmverity_skipped (a layer with a dm-verity tree mounted without dm-verity).",
            "kind",
            &[
                ("loop_device", s.loop_mounts),
                ("fsverity_userspace", s.fsverity_userspace),
                ("dmverity_skipped", s.dmverity_skipped),
            ],
        )?;
        counter(
            &mut e,
            "erofs_snapshotter_fsmeta_built",
            "fsmeta.erofs images built for flattened layer chains (max_unmerged_layers), once per parent.",
            "kind",
            &[("fsmeta", s.fsmeta_built)],
        )?;
        let artifacts: Vec<(&str, u64)> = s.artifacts.iter().map(|(o, n)| (o.name(), *n)).collect();
        counter(
            &mut e,
            "erofs_snapshotter_artifacts",
            "Tar-index layers Apply looked up registry artifacts for, by outcome: used (fetched, valid, used), no_image (containerd passed no image reference), absent, unreachable, tls (certificate refused either way, or unusable TLS files), timeout, invalid (malformed, too large, another diffID), bad_index, bad_tree, bad_signature. All but used were computed locally.",
            "outcome",
            &artifacts,
        )?;
        let h = core.heavy_stats();
        gauge(
            &mut e,
            "erofs_snapshotter_heavy_requests_running",
            "Apply, Compare and converting Commit requests running now.",
            h.running as i64,
        )?;
        gauge(
            &mut e,
            "erofs_snapshotter_heavy_requests_limit",
            "daemon.max_concurrent_heavy in force.",
            h.limit as i64,
        )?;
        match core.store_stats() {
            Ok(st) => {
                let mut m = e.encode_descriptor(
                    "erofs_snapshotter_snapshots",
                    "Snapshots in the store, by kind (committed ones are layers).",
                    None,
                    MetricType::Gauge,
                )?;
                for (kind, n) in [
                    ("active", st.active),
                    ("view", st.views),
                    ("committed", st.committed),
                ] {
                    ConstGauge::new(signed(n)).encode(m.encode_family(&[("kind", kind)])?)?;
                }
                gauge(
                    &mut e,
                    "erofs_snapshotter_layer_disk_bytes",
                    "Disk space of the committed layers' images.",
                    signed(st.layer_bytes),
                )?;
            }
            // The scrape still answers with the rest; the store's own error is logged.
            Err(err) => tracing::warn!(error = %err, "metrics: reading the store"),
        }
        Ok(())
    }
}

/// The registry behind the endpoint.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    /// Metrics of `core`; installs the request observer in it.
    pub fn new(core: &Arc<Snapshotter>) -> Arc<Self> {
        let mut registry = Registry::default();
        let durations = Durations::new_with_constructor(histogram as fn() -> Histogram);
        let errors = Family::<OpLabels, Counter>::default();
        registry.register(
            "erofs_snapshotter_request_duration_seconds",
            "gRPC requests by operation (prepare, view, mounts, commit, remove, apply, compare, ...) and result code, and how long they took",
            durations.clone(),
        );
        registry.register(
            "erofs_snapshotter_errors",
            "Requests that failed through the daemon's fault (codes Internal, Unknown, DataLoss), by operation",
            errors.clone(),
        );
        core.set_observer(Arc::new(Requests { durations, errors }));
        registry.register_collector(Box::new(CoreCollector {
            core: Arc::downgrade(core),
        }));
        Arc::new(Metrics { registry })
    }

    /// The text a scrape gets.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// A bound metrics listener.
#[derive(Debug)]
pub enum Listener {
    /// Loopback TCP.
    Tcp(tokio::net::TcpListener),
    /// A Unix socket.
    Unix(tokio::net::UnixListener),
}

/// Bind the endpoint (before the daemon says it is ready). A Unix socket gets the gRPC
/// socket's mode and group.
pub async fn bind(addr: &MetricsAddress, mode: u32, gid: u32) -> anyhow::Result<Listener> {
    Ok(match addr {
        MetricsAddress::Tcp(a) => Listener::Tcp(
            tokio::net::TcpListener::bind(a)
                .await
                .with_context(|| format!("binding the metrics endpoint {a}"))?,
        ),
        MetricsAddress::Unix(p) => Listener::Unix(
            erofs_grpc::serve::bind(p, mode, gid)
                .await
                .context("binding the metrics socket")?,
        ),
    })
}

/// Answer scrapes until the task is dropped.
pub async fn serve(listener: Listener, metrics: Arc<Metrics>) {
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Box::new(s) as Box<dyn Conn>),
        };
        match accepted {
            Ok(conn) => {
                let m = metrics.clone();
                tokio::spawn(async move {
                    if let Err(e) = answer(conn, m).await {
                        tracing::debug!(error = %e, "metrics: connection");
                    }
                });
            }
            Err(e) => {
                // E.g. EMFILE: do not spin.
                tracing::warn!(error = %e, "metrics: accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}

/// Read one request head (bounded), answer it, close.
async fn answer(mut conn: Box<dyn Conn>, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(512);
    let complete = tokio::time::timeout(HEAD_TIMEOUT, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
            if head.len() >= MAX_HEAD {
                return Ok(false);
            }
            let n = conn.read(&mut buf).await?;
            if n == 0 {
                return Ok(false);
            }
            head.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(true)
    })
    .await
    .unwrap_or(Ok(false))?;
    let line = head
        .split(|&b| b == b'\n')
        .next()
        .map(|l| String::from_utf8_lossy(l).trim_end().to_string())
        .unwrap_or_default();
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, ctype, body) = if !complete {
        ("400 Bad Request", "text/plain", "bad request\n".to_string())
    } else if method != "GET" && method != "HEAD" {
        (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        )
    } else if path != "/metrics" {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    } else {
        let m = metrics.clone();
        // The collector reads the store: not on a runtime worker.
        let text = tokio::task::spawn_blocking(move || m.render())
            .await
            .map_err(std::io::Error::other)?;
        (
            "200 OK",
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            text,
        )
    };
    let mut resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if status.starts_with("405") {
        resp.push_str("Allow: GET, HEAD\r\n");
    }
    resp.push_str("\r\n");
    conn.write_all(resp.as_bytes()).await?;
    if method != "HEAD" {
        conn.write_all(body.as_bytes()).await?;
    }
    conn.shutdown().await
}
