//! Issue 13's partition scenario on the cluster bed with the chart: both
//! sites stay up, but the link between them is cut and site A is cut off
//! from the control plane (the API is reachable from site B only).
//!
//! The StatefulSet's pod on site A appends checksummed records (fsync each)
//! and logs every acknowledged one on its node's disk (and to the
//! collector, which A cannot reach after the cut). Site A's frontend can
//! neither reach replica B nor renew its lease: it must stop acknowledging
//! and self-fence. The operator fails the volume over to B; the pod runs
//! there. Then the partition heals. At the end every record acknowledged
//! anywhere — on A before or after the cut, on B — is in the volume's file,
//! and the volume is one history: no record acknowledged on A after the
//! epoch moved to B (no split brain).

mod common;

use std::time::{Duration, Instant};

use common::observe::{Observer, between};
use common::workload::{Collector, acked_log, acked_on_nodes, all_acked, statefulset, verify};
use common::{Bed, node};
use twinvol_e2e::cluster::Site;

const APP: &str = "writer";
const PVC: &str = "data-writer-0";
const POD: &str = "writer-0";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_a_partitioned_self_fences_and_loses_no_acknowledged_record() {
    let zone_a = Site::A.zone();
    let extra = serde_json::json!({
        "storageClass": {"preferredSite": zone_a, "failback": "Manual"},
    });
    let Some(bed) = Bed::install(extra).await else {
        return;
    };
    let node_a = node(Site::A).node_name();
    let node_b = node(Site::B).node_name();
    let nodes_dir = bed.cluster.nodes_dir();
    let collector = Collector::start(bed.cluster.control_plane_ip()).await;
    let observer = Observer::start(bed.cluster.client(), APP, PVC);
    let applied = Instant::now();
    bed.cluster
        .kubectl_apply(&statefulset(
            APP,
            "twinvol",
            "256Mi",
            &zone_a,
            collector.addr.expect("collector address"),
            &nodes_dir,
        ))
        .expect("StatefulSet applied");
    observer
        .wait(
            "the pod Ready on site A",
            applied,
            Duration::from_secs(180),
            |s| s.running_on(&node_a).is_some(),
        )
        .await;
    bed.wait_records(&collector, 50, "the writer at start")
        .await;
    let epoch_before = observer.latest().and_then(|s| s.epoch).expect("epoch");

    // ----- the partition -------------------------------------------------
    let cut = Instant::now();
    bed.cluster.cut_intersite().expect("inter-site link cut");
    bed.cluster
        .partition(Site::A)
        .expect("site A cut off the API");
    let acked_a_at_cut = acked_on_nodes(&nodes_dir, APP).len();
    let ready_b = observer
        .wait(
            "the pod Ready on site B",
            cut,
            Duration::from_secs(180),
            |s| s.running_on(&node_b).is_some(),
        )
        .await;
    let bumped = observer.first(cut, |s| s.epoch.is_some_and(|e| e > epoch_before));
    // What site A's pod acknowledged after the cut: its node log only
    // grows while its frontend acknowledges.
    let log_a = acked_log(&nodes_dir, &node_a, APP);
    let a_lines = |()| {
        std::fs::read_to_string(&log_a)
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let a_at_ready_b = a_lines(());
    let b_start = collector.count();
    bed.wait_records(
        &collector,
        b_start + 30,
        "the writer on site B acknowledged nothing",
    )
    .await;
    let a_later = a_lines(());
    eprintln!(
        "PARTITION: cut -> epoch bumped {}, pod Ready on {node_b} {}; site A's pod acknowledged {} records by the cut, {} by the pod Ready on B, {} while B wrote on",
        bumped
            .map(|t| between(cut, t))
            .unwrap_or_else(|| "-".into()),
        between(cut, ready_b),
        acked_a_at_cut,
        a_at_ready_b,
        a_later,
    );
    assert_eq!(
        a_at_ready_b, a_later,
        "site A's pod went on acknowledging records while site B served the volume: split brain"
    );

    // ----- heal ----------------------------------------------------------
    let healed = Instant::now();
    bed.cluster.heal(Site::A).expect("healed");
    bed.cluster.restore_intersite().expect("link restored");
    let in_sync = observer
        .wait(
            "site A's replica in sync again",
            healed,
            Duration::from_secs(180),
            |s| s.in_sync.len() == 2,
        )
        .await;
    let away = observer
        .wait(
            "AwayFromHome=True (ManualFailback) with the pod staying on B",
            healed,
            Duration::from_secs(60),
            |s| {
                s.condition("AwayFromHome")
                    .is_some_and(|c| c.contains("ManualFailback"))
                    && s.running_on(&node_b).is_some()
            },
        )
        .await;
    // The old pod's container on A is gone once A's kubelet hears again.
    let acked = all_acked(&collector, &nodes_dir, APP);
    let file = bed
        .cluster
        .kubectl_ok(&["exec", POD, "--", "cat", "/data/records"])
        .unwrap_or_else(|e| panic!("reading the records: {e}\n{}", bed.diagnostics()));
    let v = verify(&file, &acked);
    eprintln!(
        "PARTITION: healed -> in sync {}, Manual failback reported {}; {} records acknowledged in all ({} on A), {} found, {} missing, {} invalid lines; incarnations {:?}",
        between(healed, in_sync),
        between(healed, away),
        acked.len(),
        acked_on_nodes(&nodes_dir, APP)
            .iter()
            .filter(|l| l.contains(&node_a))
            .count(),
        v.found,
        v.missing.len(),
        v.invalid.len(),
        v.incarnations
    );
    assert!(
        v.missing.is_empty(),
        "acknowledged records lost in the partition: {:?}\n{}",
        v.missing,
        observer.transcript(cut)
    );
    // Still Manual: the pod stays on B.
    let last = observer.latest().expect("sample");
    assert!(last.running_on(&node_b).is_some(), "{last:?}");
    observer.stop();
    bed.shutdown();
}
