//! Issue 12's "no false alarm": with no fault injected, a busy machine
//! never makes the operator fail a volume over.
//!
//! The cluster bed with the chart installed (its operator, CSI controller
//! and node plugins, the chart's timings), a StatefulSet pod on site A with
//! two containers on one twinvol volume: the records writer of the
//! site-loss scenarios (an fsync per record, every acknowledged record
//! checked at the end) and Debian's fio (random 16 KiB writes with fsync,
//! each batch read back and verified: `--verify_backlog`). Then, for
//! `TWINVOL_QUIET_MINUTES` (10), nothing is done but watching: the test
//! command runs this beside its other lanes (e2e/tools/test-lanes.sh),
//! so the machine is as busy as the suite makes it.
//!
//! Every 200 ms the observer samples what a fail-over would change. The
//! test fails if any of it changed: the epoch, the frontend's node, the
//! in-sync set (both replicas), a Site turning unhealthy or fenced, the
//! pod deleted or replaced, its VolumeAttachment, a container restarted
//! (an I/O error ends fio or the writer), a Warning event from the
//! operator, an acknowledged record missing.
//!
//! Ignored by `cargo test` (it takes ten minutes): the test command runs it
//! with `--ignored` in its own lane.

mod common;

use std::time::{Duration, Instant};

use common::observe::{Observer, Sample};
use common::workload::{Collector, all_acked, statefulset_with, verify};
use common::{Bed, node};
use twinvol_e2e::cluster::{Site, images};

const APP: &str = "busy";
const PVC: &str = "data-busy-0";
const POD: &str = "busy-0";

/// The fio container: random writes over a 48 MiB file, an fsync every 8,
/// every 32 written blocks read back and checked (crc32c), at most 2 MiB/s
/// (busy, without starving the suite running beside it), until the test
/// ends. fio exits non-zero on any I/O or verify error: the container
/// restarts and the test sees it.
const FIO: &str = r#"        - name: fio
          image: twinvol.local/fio:1
          imagePullPolicy: Never
          args: [--name=busy, --filename=/data/fio.dat, --size=48m, --rw=randwrite,
                 --bs=16k, --ioengine=psync, --fsync=8, --rate=2m,
                 --verify=crc32c, --verify_backlog=32, --verify_fatal=1,
                 --time_based, --runtime=86400, --eta=never]
          volumeMounts:
            - {name: data, mountPath: /data}
"#;

fn minutes() -> f64 {
    std::env::var("TWINVOL_QUIET_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(10.0)
}

/// What must not change while nothing fails, as one comparable value.
#[derive(Debug, PartialEq)]
struct Steady {
    epoch: Option<u64>,
    frontend: Option<String>,
    in_sync: usize,
    sites: Vec<(String, bool, bool)>,
    pod: Option<String>,
    attachments: Vec<(String, bool)>,
}

fn steady(s: &Sample) -> Steady {
    Steady {
        epoch: s.epoch,
        frontend: s.frontend.clone(),
        in_sync: s.in_sync.len(),
        sites: s
            .sites
            .iter()
            .map(|(site, healthy, fenced)| (site.clone(), healthy == "True", *fenced))
            .collect(),
        pod: s
            .pods
            .iter()
            .find(|p| !p.deleting)
            .map(|p| format!("{}@{}", p.uid, p.node.as_deref().unwrap_or("-"))),
        attachments: s.attachments.clone(),
    }
}

/// Restart counts of the pod's containers, by name.
fn restarts(bed: &Bed) -> String {
    bed.cluster
        .kubectl_ok(&[
            "get",
            "pod",
            POD,
            "-o",
            "jsonpath={range .status.containerStatuses[*]}{.name}={.restartCount} {end}",
        ])
        .unwrap_or_else(|e| panic!("restart counts: {e}\n{}", bed.diagnostics()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "ten minutes of watching: the test command runs it with --ignored in a lane of its own (e2e/tools/test-lanes.sh)"]
async fn a_busy_machine_with_no_fault_gives_no_fail_over() {
    let zone_a = Site::A.zone();
    let extra = serde_json::json!({
        "storageClass": {"preferredSite": zone_a, "failback": "Automatic"},
    });
    let Some(mut bed) = Bed::install(extra).await else {
        return;
    };
    bed.cluster
        .add_image(images::fio(&images::cache_dir()).expect("fio image"))
        .expect("fio image imported");
    let node_a = node(Site::A).node_name();

    let collector = Collector::start(bed.cluster.control_plane_ip()).await;
    let observer = Observer::start(bed.cluster.client(), APP, PVC);
    let applied = Instant::now();
    bed.cluster
        .kubectl_apply(&statefulset_with(
            APP,
            "twinvol",
            "256Mi",
            &zone_a,
            collector.addr.expect("collector address"),
            &bed.cluster.nodes_dir(),
            FIO,
        ))
        .expect("StatefulSet applied");
    let settled = observer
        .wait(
            "the pod Ready on site A, both replicas in sync, both Sites healthy",
            applied,
            Duration::from_secs(240),
            |s| {
                s.pods
                    .iter()
                    .any(|p| p.node.as_deref() == Some(node_a.as_str()) && p.ready && !p.deleting)
                    && s.in_sync.len() == 2
                    && s.sites.len() == 2
                    && s.sites.iter().all(|(_, h, f)| h == "True" && !f)
                    && s.attachments.iter().any(|(n, a)| *n == node_a && *a)
            },
        )
        .await;
    bed.wait_records(&collector, 20, "the writer at start")
        .await;
    let baseline_at = Instant::now();
    let baseline = observer.latest().expect("a sample");
    let want = steady(&baseline);
    let restarts_before = restarts(&bed);
    eprintln!(
        "settled {:.1} s after the StatefulSet was applied: {want:?}; containers {restarts_before}",
        (settled - applied).as_secs_f64()
    );

    // ----- watch ------------------------------------------------------
    let quiet = Duration::from_secs_f64(minutes() * 60.0);
    let mut next_report = baseline_at + Duration::from_secs(60);
    while baseline_at.elapsed() < quiet {
        if let Some(t) = observer.first(baseline_at, |s| steady(s) != want) {
            let (at, now) = (
                (t - baseline_at).as_secs_f64(),
                observer.latest().map(|s| steady(&s)),
            );
            panic!(
                "a fail-over (or the start of one) with no fault injected, {at:.1} s into the quiet run:\n\
                 wanted {want:?}\nnow    {now:?}\ntimeline:\n{}\n{}",
                observer.transcript(baseline_at),
                bed.diagnostics()
            );
        }
        if Instant::now() >= next_report {
            eprintln!(
                "quiet +{:.0} s: no change; {} records acknowledged; load {}",
                baseline_at.elapsed().as_secs_f64(),
                collector.count(),
                std::fs::read_to_string("/proc/loadavg")
                    .unwrap_or_default()
                    .trim()
            );
            next_report += Duration::from_secs(60);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let watched = baseline_at.elapsed();

    // ----- what it left ---------------------------------------------------
    let restarts_after = restarts(&bed);
    assert!(
        restarts_after.split_whitespace().all(|c| c.ends_with("=0")),
        "a container restarted (fio or the writer saw an error): {restarts_after}\n{}",
        bed.diagnostics()
    );
    let warnings = bed.cluster.kubectl_ok(&[
        "get",
        "events",
        "-A",
        "--field-selector",
        "type=Warning",
        "-o",
        "jsonpath={range .items[*]}{.reportingComponent}|{.source.component}|{.reason}|{.involvedObject.kind}/{.involvedObject.name}|{.message}{\"\\n\"}{end}",
    ]);
    let warnings = warnings.unwrap_or_else(|e| panic!("events: {e}"));
    // Ours are the events twinvol reports (the operator, the frontends):
    // the reporting component or the source is `twinvol-…`. The kubelet's
    // own warnings about our pods (no cluster DNS on the bed, a readiness
    // probe failing while a pod starts) are counted with the others.
    let from_twinvol = |line: &&str| {
        let mut fields = line.split('|');
        let (reporting, source) = (fields.next().unwrap_or(""), fields.next().unwrap_or(""));
        reporting.starts_with("twinvol") || source.starts_with("twinvol")
    };
    let ours: Vec<&str> = warnings.lines().filter(from_twinvol).collect();
    let others = warnings.lines().filter(|l| !from_twinvol(l)).count();
    assert!(
        ours.is_empty(),
        "the operator warned with no fault injected: {ours:#?}\n{}",
        observer.transcript(baseline_at)
    );
    let changes = observer.changes_since(baseline_at);
    let acked = all_acked(&collector, &bed.cluster.nodes_dir(), APP);
    let file = bed
        .cluster
        .kubectl_ok(&["exec", POD, "-c", "writer", "--", "cat", "/data/records"])
        .unwrap_or_else(|e| panic!("reading the records: {e}\n{}", bed.diagnostics()));
    let v = verify(&file, &acked);
    assert!(
        v.missing.is_empty(),
        "acknowledged records missing: {:?}",
        v.missing
    );
    let epoch = observer.latest().and_then(|s| s.epoch);
    eprintln!(
        "no false alarm: {:.1} min watched with no fault injected; epoch {epoch:?} (was {:?}), \
         frontend on {:?}, fail-overs 0, Site transitions 0; containers {restarts_after}; \
         {} records acknowledged, all {} found; {} changes sampled (readiness and resync \
         progress included); {others} Warning events from others (kubelet probes and the like), \
         none from twinvol; load {}",
        watched.as_secs_f64() / 60.0,
        want.epoch,
        want.frontend,
        acked.len(),
        v.found,
        changes,
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    observer.stop();
    bed.shutdown();
}
