//! Prometheus metrics of the engine's processes and the `/metrics` endpoint.
//!
//! Families are registered once at startup; the hot path records through
//! [`OpHandles`], clones of the per-(volume, replica, op) metrics taken when a
//! volume is opened, so recording an I/O is a few atomic adds — no label
//! hashing, no allocation.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The I/O operations that are measured.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum IoOp {
    Open,
    Read,
    Write,
    Flush,
    Trim,
    WriteZeroes,
}

impl IoOp {
    const ALL: [IoOp; 6] = [
        IoOp::Open,
        IoOp::Read,
        IoOp::Write,
        IoOp::Flush,
        IoOp::Trim,
        IoOp::WriteZeroes,
    ];
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IoLabels {
    pub volume: String,
    /// The replica an I/O went to; empty for the end-to-end figure of a
    /// frontend and for a replica server's own disk I/O.
    pub replica: String,
    pub op: IoOp,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReplicaStateLabels {
    pub volume: String,
    pub replica: String,
    pub state: String,
}

fn latency_histogram() -> Histogram {
    // 8 µs .. ~17 s.
    Histogram::new(exponential_buckets(8e-6, 2.0, 22))
}

type HistogramFamily = Family<IoLabels, Histogram, fn() -> Histogram>;

/// The metric families of one process.
pub struct Metrics {
    registry: Registry,
    latency: HistogramFamily,
    bytes: Family<IoLabels, Counter>,
    errors: Family<IoLabels, Counter>,
    replica_state: Family<ReplicaStateLabels, Gauge>,
    connections: Gauge,
    resync: ResyncFamilies,
    failover: FailoverFamilies,
}

/// A frontend's degraded-operation figures (see `crate::frontend::failover`).
struct FailoverFamilies {
    count: Family<VolumeLabels, Counter>,
    rejoins: Family<VolumeLabels, Counter>,
    pause: Family<VolumeLabels, Histogram, fn() -> Histogram>,
    lease_remaining: Family<VolumeLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VolumeLabels {
    pub volume: String,
}

/// The resync's figures on a replica server (see `crate::resync`).
struct ResyncFamilies {
    remaining: Family<ResyncLabels, Gauge>,
    copied: Family<ResyncLabels, Gauge>,
    state: Family<ReplicaStateLabels, Gauge>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResyncLabels {
    pub volume: String,
    /// The peer replica being resynchronised.
    pub replica: String,
}

impl Metrics {
    /// `prefix` names the process role: `twinvol_replica` or
    /// `twinvol_frontend`.
    pub fn new(prefix: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix(prefix);
        let latency: HistogramFamily = Family::new_with_constructor(latency_histogram);
        let bytes = Family::<IoLabels, Counter>::default();
        let errors = Family::<IoLabels, Counter>::default();
        let replica_state = Family::<ReplicaStateLabels, Gauge>::default();
        let connections = Gauge::default();
        registry.register(
            "io_latency_seconds",
            "Latency of I/O operations, per volume, replica and operation",
            latency.clone(),
        );
        registry.register(
            "io_bytes",
            "Bytes read or written, per volume, replica and operation",
            bytes.clone(),
        );
        registry.register(
            "io_errors",
            "Failed I/O operations, per volume, replica and operation",
            errors.clone(),
        );
        registry.register(
            "replica_state",
            "1 for the current state of each replica connection of a frontend",
            replica_state.clone(),
        );
        registry.register(
            "connections",
            "Open protocol connections",
            connections.clone(),
        );
        let resync = ResyncFamilies {
            remaining: Family::default(),
            copied: Family::default(),
            state: Family::default(),
        };
        registry.register(
            "resync_bytes_remaining",
            "Bytes still dirty for the out-of-sync peer, per volume and peer",
            resync.remaining.clone(),
        );
        registry.register(
            "resync_bytes_copied",
            "Bytes copied to the peer by resyncs since the process started",
            resync.copied.clone(),
        );
        registry.register(
            "resync_state",
            "1 for the current state of each volume's resync",
            resync.state.clone(),
        );
        let failover = FailoverFamilies {
            count: Family::default(),
            rejoins: Family::default(),
            pause: Family::new_with_constructor(latency_histogram),
            lease_remaining: Family::default(),
        };
        registry.register(
            "failovers",
            "Replicas taken out of the in-sync set by this frontend",
            failover.count.clone(),
        );
        registry.register(
            "rejoins",
            "Replicas returned to the in-sync set by this frontend after catching up",
            failover.rejoins.clone(),
        );
        registry.register(
            "failover_pause_seconds",
            "I/O pause at a replica loss: from the failed call to the writes resuming on the survivor",
            failover.pause.clone(),
        );
        registry.register(
            "lease_remaining_seconds",
            "Time left on this frontend's lease (0: expired or fenced, no acknowledgements)",
            failover.lease_remaining.clone(),
        );
        Arc::new(Self {
            failover,
            resync,
            registry,
            latency,
            bytes,
            errors,
            replica_state,
            connections,
        })
    }

    /// Handles for recording I/O of `volume` to `replica` (empty: none).
    pub fn handles(&self, volume: &str, replica: &str) -> OpHandles {
        let label = |op| IoLabels {
            volume: volume.to_owned(),
            replica: replica.to_owned(),
            op,
        };
        OpHandles {
            latency: IoOp::ALL.map(|op| self.latency.get_or_create(&label(op)).clone()),
            bytes: IoOp::ALL.map(|op| self.bytes.get_or_create(&label(op)).clone()),
            errors: IoOp::ALL.map(|op| self.errors.get_or_create(&label(op)).clone()),
        }
    }

    /// Sets the state gauge of a replica connection: 1 for `state`, 0 for
    /// every other of `all_states`.
    pub fn set_replica_state(&self, volume: &str, replica: &str, all_states: &[&str], state: &str) {
        for s in all_states {
            let labels = ReplicaStateLabels {
                volume: volume.to_owned(),
                replica: replica.to_owned(),
                state: (*s).to_owned(),
            };
            self.replica_state
                .get_or_create(&labels)
                .set(i64::from(*s == state));
        }
    }

    /// Sets the resync figures of `volume` towards `peer`.
    pub fn set_resync(&self, volume: &str, peer: &str, remaining: u64, copied: u64, state: &str) {
        let labels = ResyncLabels {
            volume: volume.to_owned(),
            replica: peer.to_owned(),
        };
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.resync
            .remaining
            .get_or_create(&labels)
            .set(clamp(remaining));
        self.resync.copied.get_or_create(&labels).set(clamp(copied));
        for s in crate::resync::STATE_NAMES {
            let l = ReplicaStateLabels {
                volume: volume.to_owned(),
                replica: peer.to_owned(),
                state: s.to_owned(),
            };
            self.resync
                .state
                .get_or_create(&l)
                .set(i64::from(s == state));
        }
    }

    /// Counts a fail-over of `volume` and its I/O pause.
    pub fn record_failover(&self, volume: &str, pause: std::time::Duration) {
        let l = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.failover.count.get_or_create(&l).inc();
        self.failover
            .pause
            .get_or_create(&l)
            .observe(pause.as_secs_f64());
    }

    /// Counts a replica returned to `volume`'s in-sync set.
    pub fn record_rejoin(&self, volume: &str) {
        let l = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.failover.rejoins.get_or_create(&l).inc();
    }

    /// Sets the time left on the lease of `volume`'s frontend.
    pub fn set_lease_remaining(&self, volume: &str, remaining: std::time::Duration) {
        let l = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.failover
            .lease_remaining
            .get_or_create(&l)
            .set(remaining.as_secs_f64());
    }

    pub fn connections(&self) -> &Gauge {
        &self.connections
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Per-operation metrics of one (volume, replica), ready to record.
#[derive(Clone)]
pub struct OpHandles {
    latency: [Histogram; 6],
    bytes: [Counter; 6],
    errors: [Counter; 6],
}

impl OpHandles {
    /// Records one operation that started at `started` and moved `bytes`.
    pub fn record(&self, op: IoOp, started: Instant, bytes: u64, ok: bool) {
        let i = op.index();
        self.latency[i].observe(started.elapsed().as_secs_f64());
        if ok {
            self.bytes[i].inc_by(bytes);
        } else {
            self.errors[i].inc();
        }
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    use axum::http::header::CONTENT_TYPE;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let m = metrics.clone();
            async move {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    m.encode(),
                )
            }
        }),
    );
    axum::serve(listener, app).await
}

/// Binds the metrics listener (so that a busy port fails at startup).
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recorded_io_shows_in_the_exposition() {
        let m = Metrics::new("twinvol_test");
        let h = m.handles("v1", "a");
        h.record(IoOp::Write, Instant::now(), 4096, true);
        h.record(IoOp::Read, Instant::now(), 0, false);
        let text = m.encode();
        assert!(
            text.contains(
                r#"twinvol_test_io_bytes_total{volume="v1",replica="a",op="Write"} 4096"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"twinvol_test_io_errors_total{volume="v1",replica="a",op="Read"} 1"#),
            "{text}"
        );
        assert!(text.contains("twinvol_test_io_latency_seconds_bucket"));
    }
}
