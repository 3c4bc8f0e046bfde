//! The Kubernetes arbiter against a real kube-apiserver (etcd + kube-apiserver
//! on loopback, twinvol's CRDs applied with kubectl; binaries from
//! `e2e/tools/build-upstream.sh`, found through `TWINVOL_UPSTREAM_BIN`).
//!
//! The arbiter's contract is written once, generic over `A: Arbiter`
//! ([`conformance`], [`exactly_one_of_16_concurrent_swaps_wins`],
//! [`a_frontend_whose_clock_runs_ahead_never_takes_a_renewed_lease`]), and
//! run against both the engine's file arbiter and [`KubeArbiter`], so the
//! two cannot drift apart. The Kubernetes-only behaviours follow: what a kubectl
//! user sees in the status, the operator's fields kept, a stale
//! resourceVersion refused by the server itself, an unreadable status or a
//! deleted object reported as corrupt, and an API server that stops
//! answering (SIGSTOP) or dies (SIGKILL) turning every call into
//! `Unreachable` within the deadline instead of a hang.
//!
//! One control plane serves every Kubernetes case (each on its own
//! MirroredVolume); starting it dominates the run time.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::json;
use std::sync::Arc;
use twinvol_crds::{MirroredVolume, NodeName};
use twinvol_csi_driver::arbiter::KubeArbiter;
use twinvol_e2e::{ControlPlane, ControlPlaneOptions};

use twinvol_engine::arbiter::{
    Arbiter, ArbiterError, Change, FileArbiter, FrontendId, Lease, LeaseId, Rejected, VolumeRecord,
};
use twinvol_engine::clock::WallClock;
use twinvol_engine::frontend::lease::{self, LeaseConfig, LeaseError};
use twinvol_engine::protocol::{Epoch, ReplicaId};

const START_TIMEOUT: Duration = Duration::from_secs(120);
const SITES: [&str; 2] = ["room-a", "room-b"];
/// Per-call deadline of the arbiters under test.
const CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// What a call may take beyond its deadline (scheduling on a busy machine).
const SLACK: Duration = Duration::from_millis(1500);
const LEASE: Duration = Duration::from_secs(10);

fn r(s: &str) -> ReplicaId {
    ReplicaId::new(s).expect("valid replica id")
}

fn fe(s: &str) -> FrontendId {
    FrontendId(s.to_owned())
}

fn both() -> BTreeSet<ReplicaId> {
    SITES.iter().map(|s| r(s)).collect()
}

fn now_ms() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since.as_millis()).expect("fits")
}

fn acquire(holder: &str, now_ms: u64, replaces: Option<&Lease>) -> Change {
    Change::AcquireLease {
        holder: fe(holder),
        duration: LEASE,
        now_ms,
        replaces: replaces.cloned(),
    }
}

fn id(holder: &str, epoch: u64) -> LeaseId {
    LeaseId {
        holder: fe(holder),
        epoch: Epoch(epoch),
    }
}

fn renew(holder: &str, epoch: u64, now_ms: u64) -> Change {
    Change::RenewLease {
        lease: id(holder, epoch),
        now_ms,
    }
}

fn release(holder: &str, epoch: u64) -> Change {
    Change::ReleaseLease {
        lease: id(holder, epoch),
    }
}

async fn swap<A: Arbiter>(arbiter: &A, from: &VolumeRecord, change: Change) -> VolumeRecord {
    let what = format!("{change:?}");
    let next = arbiter
        .update(&from.version, change)
        .await
        .unwrap_or_else(|e| panic!("{what} from version {} fails: {e}", from.version));
    assert_ne!(next.version, from.version, "{what} gives a new version");
    let read = arbiter.read().await.expect("read after a swap");
    assert_eq!(read, next, "{what}: a read returns what the swap returned");
    next
}

async fn refused<A: Arbiter>(arbiter: &A, from: &VolumeRecord, change: Change) -> Rejected {
    let what = format!("{change:?}");
    let rejected = match arbiter.update(&from.version, change).await {
        Err(ArbiterError::Rejected(rejected)) => rejected,
        other => panic!("{what} should be rejected, got {other:?}"),
    };
    let read = arbiter.read().await.expect("read after a refusal");
    assert_eq!(read, *from, "{what}: a refused change leaves the record");
    rejected
}

/// What every arbiter does, from a fresh volume of the two [`SITES`].
async fn conformance<A: Arbiter>(arbiter: &A) {
    // A fresh record: epoch 0, both in sync, nobody's lease. Reading
    // changes nothing.
    let fresh = arbiter.read().await.expect("read a fresh record");
    assert_eq!(fresh.epoch, Epoch(0));
    assert_eq!(fresh.replicas, both());
    assert_eq!(fresh.in_sync, both());
    assert_eq!(fresh.lease, None);
    assert_eq!(arbiter.read().await.expect("read again"), fresh);

    // Acquiring bumps the epoch and records the lease as asked, with the
    // epoch of the acquisition.
    let t0 = now_ms();
    let held = swap(arbiter, &fresh, acquire("fe-1", t0, None)).await;
    assert_eq!(held.epoch, Epoch(1));
    let lease = held.lease.clone().expect("a lease");
    assert_eq!(
        (lease.id(), lease.renewed_at_ms, lease.duration),
        (id("fe-1", 1), t0, LEASE)
    );
    assert_eq!(held.in_sync, both(), "acquiring leaves the in-sync set");

    // A held lease is refused to whoever does not name it as the lease it
    // saw expire, whatever its clock says; only the acquisition itself
    // renews or releases it.
    let late = refused(arbiter, &held, acquire("fe-2", t0 + 3_600_000, None)).await;
    assert_eq!(
        late,
        Rejected::LeaseHeld {
            held: id("fe-1", 1),
            requester: fe("fe-2"),
        }
    );
    let not_holder = refused(arbiter, &held, renew("fe-2", 1, t0 + 1_000)).await;
    assert!(
        matches!(not_holder, Rejected::NotHolder { .. }),
        "{not_holder:?}"
    );
    let not_holder = refused(arbiter, &held, renew("fe-1", 0, t0 + 1_000)).await;
    assert!(
        matches!(not_holder, Rejected::NotHolder { .. }),
        "another acquisition of the same name: {not_holder:?}"
    );
    let not_holder = refused(arbiter, &held, release("fe-2", 1)).await;
    assert!(
        matches!(not_holder, Rejected::NotHolder { .. }),
        "{not_holder:?}"
    );
    let renewed = swap(arbiter, &held, renew("fe-1", 1, t0 + 3_000)).await;
    assert_eq!(renewed.epoch, held.epoch, "renewing keeps the epoch");
    assert_eq!(
        renewed.lease.as_ref().map(|l| l.renewed_at_ms),
        Some(t0 + 3_000)
    );
    // A renewal whose clock went back still changes the lease.
    let back = swap(arbiter, &renewed, renew("fe-1", 1, t0)).await;
    assert_eq!(
        back.lease.as_ref().map(|l| l.renewed_at_ms),
        Some(t0 + 3_001)
    );
    // The lease as it was before a renewal is not the one held now.
    refused(arbiter, &back, acquire("fe-2", t0, Some(&lease))).await;
    let renewed = back;

    // A swap on a version that is no longer current conflicts, carries the
    // current record and changes nothing.
    match arbiter
        .update(&held.version, Change::RemoveFromInSync(r(SITES[0])))
        .await
    {
        Err(ArbiterError::Conflict { expected, current }) => {
            assert_eq!(expected, held.version);
            assert_eq!(*current, renewed);
        }
        other => panic!("a swap on a stale version should conflict, got {other:?}"),
    }
    assert_eq!(arbiter.read().await.expect("read"), renewed);

    // The last in-sync replica cannot leave; a replica returns once.
    let degraded = swap(arbiter, &renewed, Change::RemoveFromInSync(r(SITES[0]))).await;
    assert_eq!(degraded.in_sync, [r(SITES[1])].into());
    assert_eq!(degraded.epoch, renewed.epoch);
    assert_eq!(
        refused(arbiter, &degraded, Change::RemoveFromInSync(r(SITES[1]))).await,
        Rejected::LastInSync {
            replica: r(SITES[1])
        }
    );
    assert_eq!(
        refused(arbiter, &degraded, Change::RemoveFromInSync(r(SITES[0]))).await,
        Rejected::NotInSync {
            replica: r(SITES[0])
        }
    );
    assert_eq!(
        refused(arbiter, &degraded, Change::RemoveFromInSync(r("room-c"))).await,
        Rejected::UnknownReplica {
            replica: r("room-c")
        }
    );
    let rejoined = swap(arbiter, &degraded, Change::ReturnToInSync(r(SITES[0]))).await;
    assert_eq!(rejoined.in_sync, both());
    assert_eq!(
        refused(arbiter, &rejoined, Change::ReturnToInSync(r(SITES[0]))).await,
        Rejected::AlreadyInSync {
            replica: r(SITES[0])
        }
    );

    // Released, the lease is free at once; every acquisition bumps the
    // epoch; a held lease — a restarted holder's own included — is taken
    // only by naming it exactly, and its old acquisition is refused.
    let released = swap(arbiter, &rejoined, release("fe-1", 1)).await;
    assert_eq!(released.lease, None);
    assert_eq!(released.epoch, Epoch(1), "releasing keeps the epoch");
    let second = swap(arbiter, &released, acquire("fe-2", t0 + 4_000, None)).await;
    assert_eq!(second.epoch, Epoch(2));
    refused(arbiter, &second, acquire("fe-2", t0 + 5_000, None)).await;
    let restarted = swap(
        arbiter,
        &second,
        acquire("fe-2", t0 + 5_000, second.lease.as_ref()),
    )
    .await;
    assert_eq!(restarted.epoch, Epoch(3));
    refused(arbiter, &restarted, renew("fe-2", 2, t0 + 5_001)).await;
    refused(
        arbiter,
        &restarted,
        acquire("fe-3", t0 + 99_000, second.lease.as_ref()),
    )
    .await;
    let taken = swap(
        arbiter,
        &restarted,
        acquire("fe-3", t0, restarted.lease.as_ref()),
    )
    .await;
    assert_eq!(taken.epoch, Epoch(4));
    assert_eq!(taken.lease.map(|l| l.id()), Some(id("fe-3", 4)));
}

/// The lease's time rules through the engine's own lease code: a frontend
/// whose wall clock runs an hour ahead never takes a lease its holder
/// renews (expiry is judged on the observer's monotonic clock, from the
/// record going unchanged), and takes it once the holder stopped renewing
/// for the lease's duration plus the margin. From a record without a
/// lease.
async fn a_frontend_whose_clock_runs_ahead_never_takes_a_renewed_lease<A: Arbiter + Clone>(
    arbiter: &A,
) {
    let duration = Duration::from_secs(2);
    let margin = Duration::from_secs(1);
    let config = |holder: &str, offset_ms: i64| LeaseConfig {
        holder: fe(holder),
        duration,
        margin,
        wall_clock: WallClock::offset(offset_ms),
        reclaim_own: false,
    };
    let arbiter = Arc::new(arbiter.clone());
    let holder = config("fe-holder", 0);
    let (record, guard) = lease::acquire(arbiter.as_ref(), &holder, Duration::from_secs(30))
        .await
        .expect("the holder acquires");
    let renewing = tokio::spawn(lease::renew(arbiter.clone(), holder, guard.clone()));
    let ahead = config("fe-ahead", 3_600_000);
    let watched = 3 * (duration + margin);
    let started = Instant::now();
    let r = lease::acquire(arbiter.as_ref(), &ahead, watched).await;
    assert!(
        matches!(r, Err(LeaseError::GaveUp { .. })),
        "a frontend an hour ahead took a renewed lease after {:?}: {r:?}",
        started.elapsed()
    );
    assert!(guard.valid(), "the holder lost its lease");
    let now = arbiter.read().await.expect("read");
    assert_eq!(now.epoch, record.epoch);
    assert_eq!(now.lease.map(|l| l.holder), Some(fe("fe-holder")));

    renewing.abort();
    let stopped = Instant::now();
    let (taken, _) = lease::acquire(arbiter.as_ref(), &ahead, Duration::from_secs(30))
        .await
        .expect("taken once unrenewed");
    let took = stopped.elapsed();
    assert!(
        took >= duration,
        "taken {took:?} after the holder stopped renewing (lease {duration:?})"
    );
    assert_eq!(taken.epoch, Epoch(record.epoch.get() + 1));
    eprintln!(
        "clock-skew case: held for {watched:?} against a clock an hour ahead; taken {took:?} after the renewals stopped"
    );
}

/// Sixteen swaps on one version, half dropping each replica: exactly one
/// lands; every other one is a `Conflict` carrying the winner's record.
async fn exactly_one_of_16_concurrent_swaps_wins<A: Arbiter + Clone>(arbiter: &A) {
    let start = arbiter.read().await.expect("read");
    assert_eq!(start.in_sync, both());
    let tasks: Vec<_> = SITES
        .into_iter()
        .cycle()
        .take(16)
        .map(|victim| {
            let arbiter = arbiter.clone();
            let expected = start.version.clone();
            tokio::spawn(async move {
                arbiter
                    .update(&expected, Change::RemoveFromInSync(r(victim)))
                    .await
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut conflicts = Vec::new();
    for task in tasks {
        match task.await.expect("the swap task does not panic") {
            Ok(record) => winners.push(record),
            Err(ArbiterError::Conflict { expected, current }) => {
                assert_eq!(expected, start.version);
                conflicts.push(*current);
            }
            Err(other) => panic!("a losing swap must conflict, got {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "no split brain: one swap wins");
    let winner = &winners[0];
    assert_eq!(winner.in_sync.len(), 1);
    assert_eq!(conflicts.len(), 15);
    for current in &conflicts {
        assert_eq!(current, winner, "a loser learns the winner's record");
    }
    assert_eq!(arbiter.read().await.expect("read"), *winner);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_file_arbiter_meets_the_arbiter_contract() {
    for run in ["conformance", "race"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let arbiter =
            FileArbiter::create(&dir.path().join("vol.json"), both()).expect("creates a record");
        match run {
            "conformance" => conformance(&arbiter).await,
            _ => exactly_one_of_16_concurrent_swaps_wins(&arbiter).await,
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let arbiter =
        FileArbiter::create(&dir.path().join("vol.json"), both()).expect("creates a record");
    a_frontend_whose_clock_runs_ahead_never_takes_a_renewed_lease(&arbiter).await;
}

/// A test's Kubernetes side: the control plane, a client and helpers.
struct Cluster {
    plane: ControlPlane,
    node: NodeName,
}

impl Cluster {
    async fn start() -> Self {
        let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
            .await
            .expect("control plane starts (binaries from e2e/tools/build-upstream.sh)");
        plane
            .install_twinvol_crds(START_TIMEOUT)
            .await
            .expect("the chart's CRDs apply and become Established");
        Self {
            plane,
            node: NodeName::new("node-a1").expect("valid"),
        }
    }

    fn volumes(&self) -> Api<DynamicObject> {
        Api::all_with(
            self.plane.client(),
            &ApiResource::erase::<MirroredVolume>(&()),
        )
    }

    /// Creates a MirroredVolume on [`SITES`] and its arbiter.
    async fn volume(&self, name: &str) -> KubeArbiter {
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "twinvol.io/v1alpha1",
            "kind": "MirroredVolume",
            "metadata": {"name": name},
            "spec": {"size": "1Gi", "sites": SITES},
        }))
        .expect("a MirroredVolume");
        self.volumes()
            .create(&PostParams::default(), &object)
            .await
            .expect("creates the MirroredVolume");
        KubeArbiter::new(self.plane.client(), name, self.node.clone()).with_timeout(CALL_TIMEOUT)
    }

    fn kubectl(&self, args: &[&str]) -> String {
        self.plane
            .kubectl_ok(args)
            .unwrap_or_else(|e| panic!("kubectl {args:?}: {e}"))
    }

    fn jsonpath(&self, volume: &str, path: &str) -> String {
        self.kubectl(&[
            "get",
            "mirroredvolume",
            volume,
            "-o",
            &format!("jsonpath={{{path}}}"),
        ])
    }

    fn patch_status(&self, volume: &str, patch: serde_json::Value) {
        self.kubectl(&[
            "patch",
            "mirroredvolume",
            volume,
            "--subresource=status",
            "--type=merge",
            "-p",
            &patch.to_string(),
        ]);
    }

    fn api_server_pid(&self) -> Pid {
        let (_, pid) = self
            .plane
            .pids()
            .into_iter()
            .find(|(name, _)| name == "kube-apiserver")
            .expect("the control plane runs a kube-apiserver");
        Pid::from_raw(i32::try_from(pid).expect("a pid fits i32"))
    }
}

/// The status a kubectl user reads after swaps; the operator's own fields
/// (replicas, conditions, observedGeneration) written before survive them.
async fn status_shows_the_record_and_keeps_the_operators_fields(cluster: &Cluster) {
    let arbiter = cluster.volume("status").await;
    cluster.patch_status(
        "status",
        json!({"status": {
            "observedGeneration": 1,
            "replicas": [
                {"site": "room-a", "node": "node-a1", "state": "InSync"},
                {"site": "room-b", "node": "node-b1", "state": "InSync"},
            ],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Placed",
                            "message": "both replicas placed",
                            "lastTransitionTime": "2026-11-25T12:00:00Z"}],
        }}),
    );
    let fresh = arbiter
        .read()
        .await
        .expect("operator fields only: still a fresh record");
    assert_eq!((fresh.epoch, fresh.in_sync.clone()), (Epoch(0), both()));
    let before = cluster.jsonpath("status", ".status.replicas")
        + &cluster.jsonpath("status", ".status.conditions");

    let t0 = now_ms();
    let held = swap(&arbiter, &fresh, acquire("node-a1-fe", t0, None)).await;
    let degraded = swap(&arbiter, &held, Change::RemoveFromInSync(r("room-b"))).await;
    assert_eq!(
        cluster.jsonpath("status", ".metadata.resourceVersion"),
        degraded.version.0,
        "the record's version is the object's resourceVersion"
    );
    assert_eq!(cluster.jsonpath("status", ".status.epoch"), "1");
    assert_eq!(
        cluster.jsonpath("status", ".status.inSync"),
        r#"["room-a"]"#
    );
    assert_eq!(
        cluster.jsonpath("status", ".status.frontend.node"),
        "node-a1"
    );
    assert_eq!(cluster.jsonpath("status", ".status.frontend.epoch"), "1");
    assert_eq!(
        cluster.jsonpath("status", ".status.frontend.leaseHolder"),
        "node-a1-fe"
    );
    let renew_time = cluster.jsonpath("status", ".status.frontend.renewTime");
    let expected = format!(".{:03}000Z", t0 % 1000);
    assert!(
        renew_time.ends_with(&expected),
        "renewTime to the millisecond ({t0} ms): {renew_time}"
    );
    assert_eq!(
        cluster.jsonpath("status", ".status.frontend.leaseDurationSeconds"),
        "10"
    );
    let after = cluster.jsonpath("status", ".status.replicas")
        + &cluster.jsonpath("status", ".status.conditions");
    assert_eq!(after, before, "the operator's fields are kept");
    assert_eq!(
        cluster.jsonpath("status", ".status.observedGeneration"),
        "1"
    );
    let columns = cluster.kubectl(&["get", "mv", "status", "--no-headers"]);
    assert!(
        columns.contains("[\"room-a\"]") && columns.contains("node-a1"),
        "kubectl get shows in-sync set and frontend node: {columns}"
    );

    // A sub-second duration is recorded rounded up, and reads back so.
    let short = swap(
        &arbiter,
        &degraded,
        Change::AcquireLease {
            holder: fe("node-a1-fe"),
            duration: Duration::from_millis(1_500),
            now_ms: t0 + 1,
            replaces: degraded.lease.clone(),
        },
    )
    .await;
    assert_eq!(
        short.lease.as_ref().map(|l| l.duration),
        Some(Duration::from_secs(2))
    );

    assert_eq!(
        cluster.jsonpath("status", ".status.frontend.epoch"),
        "2",
        "the acquisition's epoch"
    );
    let released = swap(&arbiter, &short, release("node-a1-fe", 2)).await;
    assert_eq!(cluster.jsonpath("status", ".status.frontend"), "");
    assert_eq!(released.epoch, Epoch(2));
}

/// The server itself refuses a status write carrying an old
/// resourceVersion: what the arbiter's swap stands on, checked without the
/// arbiter's own version check in the way.
async fn a_stale_resource_version_write_does_not_land(cluster: &Cluster) {
    let arbiter = cluster.volume("stale").await;
    let fresh = arbiter.read().await.expect("read");
    let stale_object = cluster.volumes().get("stale").await.expect("get");
    let held = swap(&arbiter, &fresh, acquire("fe-1", now_ms(), None)).await;

    let mut write = stale_object;
    write.data["status"] = json!({"epoch": 0, "inSync": ["room-b"]});
    write.metadata.resource_version = Some(fresh.version.0.clone());
    match cluster
        .volumes()
        .replace_status("stale", &PostParams::default(), &write)
        .await
    {
        Err(kube::Error::Api(status)) => assert_eq!(status.code, 409, "{status:?}"),
        other => panic!("a stale status write must be refused with 409, got {other:?}"),
    }
    match arbiter
        .update(&fresh.version, Change::RemoveFromInSync(r("room-a")))
        .await
    {
        Err(ArbiterError::Conflict { current, .. }) => assert_eq!(*current, held),
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert_eq!(arbiter.read().await.expect("read"), held, "nothing landed");
    assert_eq!(
        cluster.jsonpath("stale", ".status.inSync"),
        r#"["room-a","room-b"]"#
    );
}

/// A status the rules could never produce (an empty in-sync set after a
/// frontend held the volume), and a deleted volume, are `Corrupt`: the
/// frontend holds rather than guesses.
async fn an_unreadable_status_or_a_deleted_volume_is_corrupt(cluster: &Cluster) {
    let arbiter = cluster.volume("corrupt").await;
    let fresh = arbiter.read().await.expect("read");
    let held = swap(&arbiter, &fresh, acquire("fe-1", now_ms(), None)).await;
    cluster.patch_status("corrupt", json!({"status": {"inSync": []}}));
    let err = arbiter
        .read()
        .await
        .expect_err("an empty in-sync set once a frontend held the volume");
    assert!(
        matches!(&err, ArbiterError::Corrupt { reason, .. } if reason.contains("status.inSync")),
        "{err}"
    );
    let err = arbiter
        .update(&held.version, renew("fe-1", 1, now_ms()))
        .await
        .expect_err("nothing is written over an unreadable status");
    assert!(matches!(err, ArbiterError::Corrupt { .. }), "{err}");

    cluster.kubectl(&["delete", "mirroredvolume", "corrupt", "--wait=true"]);
    let err = arbiter.read().await.expect_err("a deleted volume");
    assert!(
        matches!(&err, ArbiterError::Corrupt { reason, .. } if reason.contains("does not exist")),
        "{err}"
    );
}

/// An API server that stops answering (SIGSTOP: packets vanish, as in a
/// partition) and then dies (SIGKILL: connections refused): every call
/// ends in `Unreachable` within its deadline.
async fn a_silent_or_dead_api_server_is_unreachable_within_the_deadline(cluster: &Cluster) {
    let arbiter = cluster.volume("cut").await;
    let record = arbiter.read().await.expect("read while the server is up");
    let pid = cluster.api_server_pid();
    kill(pid, Signal::SIGSTOP).expect("stops the API server");
    // kill() only queues the signal: until one of the server's threads runs
    // and starts the group stop, the others still answer (on a loaded
    // machine a GET sent right after kill() was served: CI, 2026-12-02).
    wait_until_stopped(pid);
    for state in ["stopped", "killed"] {
        let started = Instant::now();
        let read = arbiter.read().await;
        let read_took = started.elapsed();
        let started = Instant::now();
        let update = arbiter
            .update(&record.version, Change::RemoveFromInSync(r("room-b")))
            .await;
        let update_took = started.elapsed();
        for (call, result, took) in [
            ("read", read.err(), read_took),
            ("update", update.err(), update_took),
        ] {
            assert!(
                matches!(result, Some(ArbiterError::Unreachable { .. })),
                "{call} with the API server {state}: {result:?}"
            );
            eprintln!("{call} with the API server {state}: Unreachable after {took:?}");
            assert!(
                took <= CALL_TIMEOUT + SLACK,
                "{call} with the API server {state} took {took:?} (deadline {CALL_TIMEOUT:?})"
            );
        }
        if state == "stopped" {
            kill(pid, Signal::SIGKILL).expect("kills the API server");
            // Reaped by the control plane's guard when the test ends.
        }
    }
}

/// Waits until every thread of `pid` is in the stopped state (`T` in
/// /proc/<pid>/task/*/stat).
fn wait_until_stopped(pid: Pid) {
    let tasks = format!("/proc/{pid}/task");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: Vec<String> = std::fs::read_dir(&tasks)
            .unwrap_or_else(|e| panic!("{tasks}: {e}"))
            .filter_map(|task| {
                let stat = std::fs::read_to_string(task.ok()?.path().join("stat")).ok()?;
                // The state follows the parenthesised command name.
                let state = stat
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .next()?
                    .to_owned();
                (state != "T" && state != "t").then_some(state)
            })
            .collect();
        if running.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the API server's threads still not stopped 10 s after SIGSTOP: {running:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kube_arbiter_meets_the_arbiter_contract_against_a_real_api_server() {
    let started = Instant::now();
    let cluster = Cluster::start().await;
    eprintln!("control plane with CRDs up in {:?}", started.elapsed());

    conformance(&cluster.volume("conformance").await).await;
    exactly_one_of_16_concurrent_swaps_wins(&cluster.volume("race").await).await;
    a_frontend_whose_clock_runs_ahead_never_takes_a_renewed_lease(&cluster.volume("skew").await)
        .await;
    status_shows_the_record_and_keeps_the_operators_fields(&cluster).await;
    a_stale_resource_version_write_does_not_land(&cluster).await;
    an_unreadable_status_or_a_deleted_volume_is_corrupt(&cluster).await;
    // Last: it takes the API server down.
    a_silent_or_dead_api_server_is_unreachable_within_the_deadline(&cluster).await;
    eprintln!("all cases done in {:?}", started.elapsed());
}
