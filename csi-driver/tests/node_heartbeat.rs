//! A frontend's liveness is its node's heartbeat, against a real
//! kube-apiserver (binaries from `e2e/tools/build-upstream.sh`) and the real
//! heartbeat renewer (`twinvol-csi --mode heartbeat`, a process of its own):
//!
//! - while the renewer renews, the frontend's lease stays held for many
//!   lease durations and the volume's status is not written once;
//! - a frontend of another node, whose wall clock runs an hour ahead (and
//!   the holder node's renewer writes `renewTime` an hour ahead too), waits
//!   while the heartbeat changes;
//! - kill -9 of the renewer: the holder stops acknowledging at most the
//!   heartbeat's duration after the last renewal it learnt of was sent
//!   (both on this machine's `CLOCK_BOOTTIME`), and the other frontend takes
//!   the volume only after duration plus margin since then, by its own
//!   clock;
//! - the renewer comes back: the old holder does not acknowledge again — it
//!   must swap once in the record, which is refused (the volume moved), and
//!   it is fenced.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease as KubeLease;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use serde_json::json;
use twinvol_crds::{MirroredVolume, NodeName};
use twinvol_csi_driver::arbiter::KubeArbiter;
use twinvol_csi_driver::heartbeat::{HeartbeatConfig, HeartbeatReport, report_path};
use twinvol_e2e::{ControlPlane, ControlPlaneOptions};
use twinvol_engine::arbiter::{Arbiter, FrontendId};
use twinvol_engine::clock::{BootInstant, WallClock};
use twinvol_engine::frontend::lease::{self, LeaseConfig, LeaseState};

const NAMESPACE: &str = "default";
const PERIOD: Duration = Duration::from_millis(500);
/// The heartbeat's and the frontends' lease duration.
const DURATION: Duration = Duration::from_secs(2);
const MARGIN: Duration = Duration::from_secs(1);
const HOUR_MS: i64 = 3_600_000;

/// The renewer process; killed (-9) when dropped.
struct Renewer {
    child: Child,
}

impl Renewer {
    fn start(plane: &ControlPlane, dir: &Path, node: &str, offset_ms: i64) -> Self {
        let state = dir.join(node);
        std::fs::create_dir_all(state.join("heartbeat")).expect("state dir");
        let config = HeartbeatConfig {
            node: node.into(),
            site: "room-a".into(),
            namespace: NAMESPACE.into(),
            period: PERIOD,
            stale_after: DURATION,
            pool: dir.to_owned(),
            report: report_path(&state),
            wall_clock_offset_ms: offset_ms,
        };
        let spec = state.join("heartbeat").join("heartbeat.json");
        std::fs::write(&spec, serde_json::to_vec(&config).expect("json")).expect("spec");
        let log = std::fs::File::create(state.join("heartbeat.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_twinvol-csi"))
            .args(["--mode", "heartbeat", "--spec"])
            .arg(&spec)
            .env("KUBECONFIG", plane.kubeconfig())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup"))
            .stderr(log)
            .spawn()
            .expect("starts the renewer");
        Self { child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Renewer {
    fn drop(&mut self) {
        self.kill9();
    }
}

async fn wait_until<F: FnMut() -> bool>(what: &str, timeout: Duration, mut done: F) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn report(path: &Path) -> Option<HeartbeatReport> {
    HeartbeatReport::read(path).ok()
}

fn lease_config(node: &str, offset_ms: i64) -> LeaseConfig {
    LeaseConfig {
        holder: FrontendId(node.to_owned()),
        duration: DURATION,
        margin: MARGIN,
        wall_clock: WallClock::offset(offset_ms),
        reclaim_own: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_frontend_lives_by_its_nodes_heartbeat_and_is_taken_over_only_after_it_stops() {
    let started = Instant::now();
    let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
        .await
        .expect("control plane starts (binaries from e2e/tools/build-upstream.sh)");
    plane
        .install_twinvol_crds(Duration::from_secs(120))
        .await
        .expect("CRDs established");
    let dir = tempfile::tempdir().expect("temp dir");
    let client = plane.client();
    let volumes: Api<DynamicObject> =
        Api::all_with(client.clone(), &ApiResource::erase::<MirroredVolume>(&()));
    let object: DynamicObject = serde_json::from_value(json!({
        "apiVersion": "twinvol.io/v1alpha1",
        "kind": "MirroredVolume",
        "metadata": {"name": "hb-vol"},
        "spec": {"size": "1Gi", "sites": ["room-a", "room-b"]},
    }))
    .expect("a MirroredVolume");
    volumes
        .create(&PostParams::default(), &object)
        .await
        .expect("creates the volume");
    let arbiter_for = |node: &str| {
        KubeArbiter::new(
            client.clone(),
            "hb-vol",
            NodeName::new(node).expect("valid"),
        )
        .with_timeout(Duration::from_secs(2))
        .with_heartbeat(report_path(&dir.path().join(node)), NAMESPACE)
    };

    // Node A's renewer, its wall clock an hour ahead.
    let mut renewer = Renewer::start(&plane, dir.path(), "node-a1", HOUR_MS);
    let report_a = report_path(&dir.path().join("node-a1"));
    wait_until(
        "the first renewal reported",
        Duration::from_secs(60),
        || report(&report_a).is_some(),
    )
    .await;
    let a = Arc::new(arbiter_for("node-a1"));
    let (record, guard) = lease::acquire(
        a.as_ref(),
        &lease_config("node-a1", HOUR_MS),
        Duration::from_secs(30),
    )
    .await
    .expect("node A acquires");
    assert_eq!(record.epoch.get(), 1);
    let keeping = tokio::spawn(lease::renew(
        a.clone(),
        lease_config("node-a1", HOUR_MS),
        guard.clone(),
    ));
    let leases: Api<KubeLease> = Api::namespaced(client.clone(), NAMESPACE);
    let beat_rv = || async {
        leases
            .get("twinvol-node-node-a1")
            .await
            .expect("the heartbeat Lease")
            .metadata
            .resource_version
    };
    let volume_rv = || async {
        volumes
            .get("hb-vol")
            .await
            .expect("the volume")
            .metadata
            .resource_version
    };
    let (volume_before, beat_before) = (volume_rv().await, beat_rv().await);

    // Node B starts watching to take the volume over, its clock an hour
    // ahead as well.
    let b = arbiter_for("node-b1");
    let taking = tokio::spawn(async move {
        let taken = lease::acquire(
            &b,
            &lease_config("node-b1", HOUR_MS),
            Duration::from_secs(90),
        )
        .await;
        (taken, BootInstant::now())
    });

    // Steady state: held for three durations, the volume never written.
    let until = Instant::now() + 3 * DURATION;
    while Instant::now() < until {
        assert!(
            guard.valid(),
            "the lease ran out while the heartbeat renewed"
        );
        assert!(!taking.is_finished(), "node B took a live node's volume");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        volume_rv().await,
        volume_before,
        "the volume's status was written in steady state"
    );
    assert_ne!(
        beat_rv().await,
        beat_before,
        "the heartbeat was not renewed"
    );

    // kill -9 of the renewer.
    renewer.kill9();
    let last_sent = report(&report_a).expect("a report").sent();
    while guard.valid() {
        let now = BootInstant::now();
        assert!(
            now.saturating_since(last_sent) < DURATION,
            "still acknowledging {:?} after the last renewal was sent",
            now.saturating_since(last_sent)
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    assert_eq!(guard.state(), LeaseState::Expired);
    let (taken, taken_at) = taking.await.expect("join");
    let (record_b, guard_b) = taken.expect("node B takes the volume once the heartbeat stopped");
    assert!(
        taken_at.saturating_since(last_sent) >= DURATION + MARGIN,
        "taken {:?} after the holder's last renewal was sent, before duration plus margin",
        taken_at.saturating_since(last_sent)
    );
    assert_eq!(record_b.epoch.get(), 2, "the take-over bumps the epoch");
    assert!(guard_b.valid());

    // The renewer comes back: node A's frontend finds the volume taken.
    let _renewer = Renewer::start(&plane, dir.path(), "node-a1", HOUR_MS);
    let deadline = Instant::now() + Duration::from_secs(60);
    while guard.state() != LeaseState::Fenced {
        assert!(!guard.valid(), "the old holder acknowledges again");
        assert!(Instant::now() < deadline, "the old holder never fenced");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let record = a.read().await.expect("read");
    assert_eq!(
        record.lease.map(|l| l.holder.0),
        Some("node-b1".to_owned()),
        "the new holder keeps the volume"
    );
    keeping.abort();
    eprintln!("done in {:?}", started.elapsed());
}
