//! The node's heartbeat: one `coordination.k8s.io/v1` Lease per node,
//! `twinvol-node-<node>` in the driver's namespace, renewed every period —
//! the one steady-state API write of a node, however many volumes it
//! serves. A frontend's liveness *is* its node's heartbeat.
//!
//! # Who renews it, and why not the CSI service
//!
//! The frontends of the node stop acknowledging I/O when the heartbeat has
//! not been renewed for its duration, so whatever renews it must outlive
//! the CSI node service exactly as they do (a restart or upgrade of the
//! service must not stop their I/O, nor make the operator fail the site
//! over). It is a detached data-plane process of its own, `twinvol-csi
//! --mode heartbeat --spec FILE`, started and re-adopted by the node
//! service like the frontends ([`ensure`], [`supervise`]); its own
//! session, its own log, the data plane's cgroup. It stops by itself once
//! it has seen, for [`ORPHAN_GRACE`], neither a node service (whose pid the
//! service writes to `service.pid` beside the renewer's spec) nor any
//! frontend running on the node — the plugin was uninstalled — so that
//! nothing renews a heartbeat for a node that serves nothing.
//!
//! # The node-local report
//!
//! After each *successful* renewal the renewer rewrites the report file
//! (`<state-dir>/heartbeat/renewed.json`, atomically: temporary file and
//! rename) with the node's name, the renewal's duration, the Lease's new
//! resourceVersion and when the renewal was *sent*, on `CLOCK_BOOTTIME`
//! (taken before the first request of the renewal went out). The frontends
//! of this node read that file — a file on the same machine, no API read —
//! and count their lease from that instant: the same clock, the same
//! machine, no two clocks compared. A renewal whose answer was lost is not
//! reported (it may have landed: that only shortens the lease).
//!
//! # The contract with observers
//!
//! holderIdentity `<node>`, labels `app.kubernetes.io/name=twinvol`,
//! `twinvol.io/node=<node>`, `twinvol.io/site=<site>`;
//! `leaseDurationSeconds` = the heartbeat's duration rounded *up* to whole
//! seconds (observers never wait less than the frontends self-fence on).
//! Observers (the operator, a frontend of another node waiting to take a
//! volume) judge staleness by how long they have seen no change of the
//! Lease on their own monotonic clock; `renewTime` is written for humans.
//! Each renewal also carries the node's pool space (annotations
//! `twinvol.io/pool-free-bytes`, `-total-bytes`), from which the
//! controller answers GetCapacity — no extra write.

use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use serde::{Deserialize, Serialize};
use twinvol_engine::clock::BootInstant;

use crate::arbiter::mapping::lease_duration_seconds;
use crate::dataplane::process::{self, Launch, ProcessFiles};
use crate::error::{CsiError, CsiResult};
use crate::names::{
    ANNOTATION_POOL_CAPACITY, ANNOTATION_POOL_FREE, ANNOTATION_POOL_TOTAL, LABEL_APP, LABEL_NODE,
    LABEL_SITE, node_lease_name,
};

/// How the heartbeat is kept: the spec of `--mode heartbeat`, written by
/// the node service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeartbeatConfig {
    pub node: String,
    pub site: String,
    pub namespace: String,
    #[serde(with = "millis")]
    pub period: Duration,
    /// The heartbeat's duration: written as `leaseDurationSeconds`
    /// (rounded up); the frontends of this node stop acknowledging this
    /// long after the last successful renewal was sent.
    #[serde(with = "millis")]
    pub stale_after: Duration,
    /// The pool whose space is reported.
    pub pool: PathBuf,
    /// The node-local report of the last successful renewal.
    pub report: PathBuf,
    /// Tests only: this node's wall clock runs this far ahead (behind if
    /// negative) in the `renewTime` it writes, which nobody may decide
    /// anything from.
    #[serde(default)]
    pub wall_clock_offset_ms: i64,
}

mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// How long the renewer goes on with neither a node service nor a frontend
/// on the node before it stops (longer than any restart of the service).
pub const ORPHAN_GRACE: Duration = Duration::from_secs(60);

/// What the renewer checks to tell that it is no longer needed.
#[derive(Debug, Clone)]
pub struct Orphan {
    /// The node service's pid file (`service.pid` beside the spec).
    pub service_pid: PathBuf,
    /// The node's state directory (its frontends).
    pub state_dir: PathBuf,
}

impl Orphan {
    /// Beside the renewer's spec `<state-dir>/heartbeat/heartbeat.json`.
    pub fn for_spec(spec: &Path) -> Option<Self> {
        let dir = spec.parent()?;
        Some(Self {
            service_pid: dir.join("service.pid"),
            state_dir: dir.parent()?.to_owned(),
        })
    }

    /// Neither the node service nor any frontend of the node runs.
    pub fn orphaned(&self) -> bool {
        let service = std::fs::read_to_string(&self.service_pid)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
            .is_some_and(alive);
        let frontends = crate::node::state::VolumeDir::all(&self.state_dir)
            .iter()
            .any(|v| v.frontend().running().is_some());
        !service && !frontends
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        !s.rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with(['Z', 'X'])
    })
}

/// Records the node service's pid for the renewer ([`Orphan`]).
pub fn record_service(state_dir: &Path) -> CsiResult<()> {
    let dir = state_dir.join("heartbeat");
    std::fs::create_dir_all(&dir).map_err(|e| CsiError::io("creating directory", &dir, e))?;
    process::write_atomic(
        &dir.join("service.pid"),
        std::process::id().to_string().as_bytes(),
    )
}

/// Where the node's heartbeat process keeps its files.
pub fn process_files(state_dir: &Path) -> ProcessFiles {
    ProcessFiles::new(state_dir.join("heartbeat"), "heartbeat")
}

/// The node-local report of the last successful renewal.
pub fn report_path(state_dir: &Path) -> PathBuf {
    state_dir.join("heartbeat").join("renewed.json")
}

/// One successful renewal, as the renewer reports it on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeartbeatReport {
    pub node: String,
    /// `CLOCK_BOOTTIME` nanoseconds when the renewal was sent.
    pub sent_boot_ns: u64,
    /// The heartbeat's duration (exact; the Lease holds it rounded up).
    pub duration_ms: u64,
    /// The Lease's resourceVersion after the renewal.
    pub resource_version: String,
}

impl HeartbeatReport {
    /// When the renewal was sent, on this machine's `CLOCK_BOOTTIME`.
    pub fn sent(&self) -> BootInstant {
        BootInstant::from_since_boot(Duration::from_nanos(self.sent_boot_ns))
    }

    pub fn duration(&self) -> Duration {
        Duration::from_millis(self.duration_ms)
    }

    /// Reads the report at `path`.
    pub fn read(path: &Path) -> CsiResult<Self> {
        let bytes = std::fs::read(path).map_err(|e| CsiError::io("reading", path, e))?;
        serde_json::from_slice(&bytes).map_err(|e| CsiError::Internal {
            detail: format!("the heartbeat report {} is unreadable: {e}", path.display()),
        })
    }

    /// Writes the report at `path` atomically (a reader sees the old or
    /// the new one, never half of one).
    pub fn write(&self, path: &Path) -> CsiResult<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| CsiError::io("creating directory", dir, e))?;
        }
        let bytes = serde_json::to_vec(self).map_err(|e| CsiError::Internal {
            detail: format!("cannot encode the heartbeat report: {e}"),
        })?;
        process::write_atomic(path, &bytes)
    }
}

/// When the last renewal succeeded, for `/healthz`: read from the
/// node-local report, so the node service reports the detached renewer.
#[derive(Debug, Clone)]
pub struct HeartbeatHealth {
    report: PathBuf,
}

impl HeartbeatHealth {
    pub fn new(report: PathBuf) -> Self {
        Self { report }
    }

    /// How long ago the last renewal was sent; `None` before the first.
    pub fn since_last(&self) -> Option<Duration> {
        HeartbeatReport::read(&self.report)
            .ok()
            .map(|r| r.sent().elapsed())
    }
}

/// Free and total bytes of the filesystem holding `path`.
pub fn pool_space(path: &Path) -> CsiResult<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| CsiError::io("statvfs", path, std::io::Error::from_raw_os_error(e as i32)))?;
    let frag = st.fragment_size();
    Ok((st.blocks_available() * frag, st.blocks() * frag))
}

fn lease_object(config: &HeartbeatConfig, existing: Option<&Lease>) -> CsiResult<Lease> {
    let (free, total) = pool_space(&config.pool)?;
    let wall = twinvol_engine::clock::WallClock::offset(config.wall_clock_offset_ms).now_ms();
    let now = MicroTime(
        i64::try_from(wall)
            .ok()
            .and_then(|ms| Timestamp::from_millisecond(ms).ok())
            .unwrap_or_else(Timestamp::now),
    );
    let mut lease = existing.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(node_lease_name(&config.node)),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let labels = lease.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(LABEL_APP.0.into(), LABEL_APP.1.into());
    labels.insert(LABEL_NODE.into(), config.node.clone());
    labels.insert(LABEL_SITE.into(), config.site.clone());
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(ANNOTATION_POOL_FREE.into(), free.to_string());
    annotations.insert(ANNOTATION_POOL_TOTAL.into(), total.to_string());
    // The operator's placement reads the usable size of the pool and
    // subtracts the replicas it placed there itself.
    annotations.insert(ANNOTATION_POOL_CAPACITY.into(), total.to_string());
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.node.as_str()) {
        spec.acquire_time = Some(now.clone());
        spec.holder_identity = Some(config.node.clone());
    }
    spec.lease_duration_seconds = Some(lease_duration_seconds(config.stale_after).max(1));
    spec.renew_time = Some(now);
    Ok(lease)
}

/// Renews once: replaces the Lease last written (its resourceVersion as
/// the precondition), or reads it first when there is none or a concurrent
/// writer changed it, or creates it. Returns the Lease written.
pub async fn renew(
    api: &Api<Lease>,
    config: &HeartbeatConfig,
    last: Option<Lease>,
) -> CsiResult<Lease> {
    let name = node_lease_name(&config.node);
    let mut known = last;
    for _ in 0..2 {
        let existing = match known.take() {
            Some(l) => Some(l),
            None => api
                .get_opt(&name)
                .await
                .map_err(|e| CsiError::kube(format!("reading Lease {name}"), e))?,
        };
        let lease = lease_object(config, existing.as_ref())?;
        let result = match existing {
            Some(_) => api.replace(&name, &PostParams::default(), &lease).await,
            None => api.create(&PostParams::default(), &lease).await,
        };
        match result {
            Ok(written) => return Ok(written),
            // Someone else wrote it (an older renewer, a person): read it
            // and try once more.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(CsiError::kube(format!("renewing Lease {name}"), e)),
        }
    }
    Err(CsiError::Internal {
        detail: format!("Lease {name} kept changing under its renewal"),
    })
}

/// Renews every period, reporting each success in the node-local file,
/// until the task is dropped — or, with `orphan`, until it was orphaned
/// for [`ORPHAN_GRACE`].
pub async fn run(client: Client, config: HeartbeatConfig, orphan: Option<Orphan>) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut tick = tokio::time::interval(config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // A renewal that takes longer than this is given up: the next one is
    // due, and the frontends need a fresh one well within the duration.
    let deadline = config.period.min(config.stale_after / 3);
    let mut last: Option<Lease> = None;
    let mut log = twinvol_engine::frontend::lease::RateLimit::new(Duration::from_secs(5));
    let mut orphaned_since: Option<std::time::Instant> = None;
    loop {
        tick.tick().await;
        if let Some(o) = &orphan {
            if o.orphaned() {
                let since = *orphaned_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= ORPHAN_GRACE {
                    tracing::warn!(
                        "no node service and no frontend on this node for {ORPHAN_GRACE:?}: the heartbeat stops"
                    );
                    return;
                }
            } else {
                orphaned_since = None;
            }
        }
        let sent = BootInstant::now();
        match tokio::time::timeout(deadline, renew(&api, &config, last.take())).await {
            Ok(Ok(written)) => {
                let report = HeartbeatReport {
                    node: config.node.clone(),
                    sent_boot_ns: u64::try_from(sent.since_boot().as_nanos()).unwrap_or(u64::MAX),
                    duration_ms: u64::try_from(config.stale_after.as_millis()).unwrap_or(u64::MAX),
                    resource_version: written
                        .metadata
                        .resource_version
                        .clone()
                        .unwrap_or_default(),
                };
                if let Err(e) = report.write(&config.report) {
                    tracing::warn!(error = %twinvol_engine::error_chain(&e), "cannot write the heartbeat report; this node's frontends stop acknowledging when it gets stale");
                }
                last = Some(written);
            }
            Ok(Err(e)) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(error = %twinvol_engine::error_chain(&e), suppressed = n, "heartbeat renewal failed");
                }
            }
            Err(_) => {
                if let Some(n) = log.allow() {
                    tracing::warn!(
                        suppressed = n,
                        "heartbeat renewal timed out after {deadline:?}"
                    );
                }
            }
        }
    }
}

/// Makes sure the node's heartbeat process runs with `config`: adopts one
/// that already does (after a restart of the node service), replaces one
/// started with other settings, or starts it.
pub async fn ensure(
    launch: &Launch,
    files: &ProcessFiles,
    config: &HeartbeatConfig,
) -> CsiResult<()> {
    if let Some(pid) = files.running() {
        match files.read_spec::<HeartbeatConfig>() {
            Ok(running) if running == *config => {
                tracing::info!(pid, "adopted the running heartbeat process");
                return Ok(());
            }
            _ => {
                tracing::info!(
                    pid,
                    "the heartbeat process runs with other settings: replacing it"
                );
                process::stop(files, Duration::from_secs(5)).await?;
            }
        }
    }
    files.write_spec(config)?;
    let launch = Launch {
        mode: "heartbeat",
        ..launch.clone()
    };
    process::spawn(&launch, files)?;
    Ok(())
}

/// Restarts the heartbeat process whenever it is found gone, until the
/// task is dropped (the node service's life).
pub async fn supervise(launch: Launch, files: ProcessFiles, config: HeartbeatConfig) {
    let mut tick = tokio::time::interval(config.period.max(Duration::from_millis(500)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if files.running().is_none() {
            tracing::warn!("the heartbeat process is gone: starting it again");
            if let Err(e) = ensure(&launch, &files, &config).await {
                tracing::error!(error = %twinvol_engine::error_chain(&e), "cannot start the heartbeat process");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &Path) -> HeartbeatConfig {
        HeartbeatConfig {
            node: "node-a1".into(),
            site: "room-a".into(),
            namespace: "twinvol-system".into(),
            period: Duration::from_millis(1500),
            stale_after: Duration::from_millis(4500),
            pool: dir.to_owned(),
            report: report_path(dir),
            wall_clock_offset_ms: 0,
        }
    }

    #[test]
    fn the_lease_follows_the_contract() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        let lease = lease_object(&config, None).expect("built");
        assert_eq!(lease.metadata.name.as_deref(), Some("twinvol-node-node-a1"));
        let labels = lease.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "twinvol");
        assert_eq!(labels["twinvol.io/node"], "node-a1");
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a1"));
        assert_eq!(
            spec.lease_duration_seconds,
            Some(5),
            "4.5 s rounds up: observers never wait less than the frontends hold"
        );
        let free: u64 = lease.metadata.annotations.as_ref().expect("annotations")
            [ANNOTATION_POOL_FREE]
            .parse()
            .expect("a number");
        assert!(free > 0);
        let again = lease_object(&config, Some(&lease)).expect("renewed");
        assert_eq!(
            again.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            spec.acquire_time,
            "acquired once"
        );
    }

    #[test]
    fn the_report_round_trips_on_the_boot_clock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = report_path(dir.path());
        let sent = BootInstant::now();
        let report = HeartbeatReport {
            node: "node-a1".into(),
            sent_boot_ns: u64::try_from(sent.since_boot().as_nanos()).expect("fits"),
            duration_ms: 4500,
            resource_version: "42".into(),
        };
        report.write(&path).expect("written");
        let read = HeartbeatReport::read(&path).expect("read");
        assert_eq!(read, report);
        assert_eq!(read.sent(), sent);
        assert_eq!(read.duration(), Duration::from_millis(4500));
        let health = HeartbeatHealth::new(path);
        assert!(health.since_last().expect("renewed") < Duration::from_secs(5));
        assert!(
            HeartbeatHealth::new(dir.path().join("none"))
                .since_last()
                .is_none()
        );
    }

    #[test]
    fn the_renewer_is_orphaned_without_a_node_service_or_a_frontend() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = dir.path().join("heartbeat").join("heartbeat.json");
        let orphan = Orphan::for_spec(&spec).expect("beside its spec");
        assert_eq!(orphan.state_dir, dir.path());
        assert!(orphan.orphaned(), "no service pid recorded");
        record_service(dir.path()).expect("recorded");
        assert!(!orphan.orphaned(), "this process is the service");
        let mut gone = std::process::Command::new("true").spawn().expect("true");
        let pid = gone.id();
        gone.wait().expect("reaped");
        std::fs::write(&orphan.service_pid, pid.to_string()).expect("pid");
        assert!(orphan.orphaned(), "the service's pid is dead");
    }

    #[test]
    fn the_spec_round_trips() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = config(dir.path());
        let text = serde_json::to_string(&config).expect("encoded");
        let back: HeartbeatConfig = serde_json::from_str(&text).expect("decoded");
        assert_eq!(back, config);
    }
}
