//! Issue 13's site-loss story on the cluster bed with the Helm chart
//! installed: real kubelets, containerd, the chart's operator, CSI
//! controller and node plugins, the chart's StorageClass.
//!
//! 1. A StatefulSet pod preferring site A claims a volume (WaitForFirstConsumer):
//!    the claim binds, the pod runs on site A with ext4 mounted; the time
//!    from the claim created to the pod Running is printed.
//! 2. The pod appends checksummed records, fsyncing each, and reports each
//!    acknowledged one to a collector in this process (the control plane's
//!    address: neither site). Site A loses power (links, then every node
//!    of it). The pod runs again on site B; every acknowledged record is in
//!    the file there, checksum intact. The time from the cut to the pod
//!    Ready on site B is printed with its parts.
//! 3. Site A's power comes back (fresh processes, old disks): the resync
//!    runs by itself and the status shows progress, the volume is in sync
//!    again, and with failback Automatic (the chart's default) and site A
//!    preferred the operator moves the pod home; the records are checked
//!    again there.

mod common;

use std::time::{Duration, Instant};

use common::observe::{Observer, Sample, between};
use common::workload::{Collector, all_acked, statefulset, verify};
use common::{Bed, node};
use twinvol_e2e::cluster::Site;

const APP: &str = "writer";
const PVC: &str = "data-writer-0";
const POD: &str = "writer-0";

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn records_file(bed: &Bed) -> String {
    bed.cluster
        .kubectl_ok(&["exec", POD, "--", "cat", "/data/records"])
        .unwrap_or_else(|e| panic!("reading the records: {e}\n{}", bed.diagnostics()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn site_a_power_cut_the_pod_moves_to_b_with_every_acked_record_and_returns() {
    let zone_a = Site::A.zone();
    let extra = serde_json::json!({
        "storageClass": {"preferredSite": zone_a, "failback": "Automatic"},
    });
    let Some(bed) = Bed::install(extra).await else {
        return;
    };
    let test_started = Instant::now();
    let node_a = node(Site::A).node_name();
    let node_b = node(Site::B).node_name();

    // ----- 1. claim, bind, mount, write ---------------------------------
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
            &bed.cluster.nodes_dir(),
        ))
        .expect("StatefulSet applied");
    let bound = observer
        .wait("the claim Bound", applied, Duration::from_secs(120), |s| {
            s.pvc_bound
        })
        .await;
    let running = observer
        .wait(
            "the pod Running on site A",
            applied,
            Duration::from_secs(180),
            |s| {
                s.pods.iter().any(|p| {
                    p.node.as_deref() == Some(node_a.as_str())
                        && p.phase.as_deref() == Some("Running")
                })
            },
        )
        .await;
    let ready = observer
        .wait(
            "the pod Ready on site A",
            applied,
            Duration::from_secs(60),
            |s| s.running_on(&node_a).is_some(),
        )
        .await;
    eprintln!(
        "STEP 1: claim Bound {} after the StatefulSet was applied, pod Running on {node_a} after {}, Ready after {}",
        between(applied, bound),
        between(applied, running),
        between(applied, ready),
    );
    let mounts = bed
        .cluster
        .kubectl_ok(&["exec", POD, "--", "grep", " /data ", "/proc/mounts"])
        .unwrap_or_else(|e| panic!("mounts: {e}\n{}", bed.diagnostics()));
    assert!(mounts.contains("ext4"), "/data is not ext4: {mounts}");
    bed.wait_records(&collector, 50, "the writer at start")
        .await;
    // What was acknowledged before the file is read (the writer goes on).
    let acked = all_acked(&collector, &bed.cluster.nodes_dir(), APP);
    let file = records_file(&bed);
    let v = verify(&file, &acked);
    assert!(
        v.missing.is_empty(),
        "acknowledged records missing on site A: {:?}",
        v.missing
    );
    eprintln!(
        "STEP 1: {} records acknowledged, {} valid in the file on {node_a} ({mounts:?})",
        acked.len(),
        v.valid
    );

    // ----- 2. site A loses power ----------------------------------------
    let before = observer.latest().expect("a sample");
    let epoch_before = before.epoch.expect("the volume's epoch");
    let old_uid = before.running_on(&node_a).expect("the pod on site A");
    // Where the leaders run: a leader lost with site A has to be replaced
    // (the operator's by its standby after its Lease; the CSI sidecars' by
    // the operator taking their Leases over).
    let holder_node = |lease: &str| {
        let holder = bed.kubectl(&[
            "-n",
            common::NAMESPACE,
            "get",
            "lease",
            lease,
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ]);
        let pod = holder.split('_').next().unwrap_or_default().to_owned();
        bed.kubectl(&[
            "-n",
            common::NAMESPACE,
            "get",
            "pod",
            &pod,
            "-o",
            "jsonpath={.spec.nodeName}",
        ])
    };
    let leader_node = holder_node("twinvol-operator");
    let attacher_node = holder_node(twinvol_e2e::bed::ATTACHER_LEASE);
    // Let it write a little longer, then cut.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut bed = bed;
    let cut = Instant::now();
    bed.cluster.power_off_site(Site::A).expect("site A off");
    let cut_done = Instant::now();
    let acked_at_cut = collector.count();
    let detected = observer
        .wait(
            "site A unhealthy",
            cut,
            Duration::from_secs(90),
            |s: &Sample| s.site_healthy(&zone_a) == Some(false),
        )
        .await;
    let ready_b = observer
        .wait(
            "the pod Ready on site B",
            cut,
            Duration::from_secs(180),
            |s| s.running_on(&node_b).is_some(),
        )
        .await;
    let new_uid = observer
        .latest()
        .expect("sample")
        .running_on(&node_b)
        .expect("pod on B");
    let bumped = observer.first(cut, |s| s.epoch.is_some_and(|e| e > epoch_before));
    let old_gone = observer.first(cut, |s| {
        !s.pods.iter().any(|p| p.uid == old_uid && !p.deleting)
    });
    let created = observer.first(cut, |s| s.pods.iter().any(|p| p.uid == new_uid));
    let scheduled = observer.first(cut, |s| {
        s.pods
            .iter()
            .any(|p| p.uid == new_uid && p.node.as_deref() == Some(node_b.as_str()))
    });
    let attached = observer.first(cut, |s| {
        s.attachments.iter().any(|(n, a)| *n == node_b && *a)
    });
    let started = observer.first(cut, |s| {
        s.pods.iter().any(|p| p.uid == new_uid && p.started)
    });
    let fenced = observer.first(cut, |s| s.site_fenced(&zone_a));
    let at = |t: Option<Instant>| t.map(|t| between(cut, t)).unwrap_or_else(|| "-".into());
    let step = |a: Option<Instant>, b: Option<Instant>| match (a, b) {
        (Some(a), Some(b)) => between(a, b),
        _ => "-".into(),
    };
    eprintln!(
        "STEP 2: power cut of site A (links and nodes down in {}; the operator's leader ran on {leader_node}, the attacher's on {attacher_node}) -> pod Ready on {node_b}: {}\n\
         \x20 detection (site A Healthy=False)     at {} \n\
         \x20 lease wait (-> epoch bumped)         at {} (+{})\n\
         \x20 site A fenced                        at {}\n\
         \x20 pod deletion (old pod gone)          at {} (+{})\n\
         \x20 new pod created                      at {} (+{})\n\
         \x20 scheduled on {node_b}                at {} (+{})\n\
         \x20 attached (VolumeAttachment)          at {} (+{})\n\
         \x20 staged+published, container started  at {} (+{})\n\
         \x20 Ready                                at {} (+{})",
        between(cut, cut_done),
        between(cut, ready_b),
        at(Some(detected)),
        at(bumped),
        step(Some(detected), bumped),
        at(fenced),
        at(old_gone),
        step(bumped, old_gone),
        at(created),
        step(old_gone, created),
        at(scheduled),
        step(created, scheduled),
        at(attached),
        step(scheduled, attached),
        at(started),
        step(attached, started),
        at(Some(ready_b)),
        step(started, Some(ready_b)),
    );
    // Every record acknowledged before (and after) the cut is on site B.
    let new_records = collector.count();
    bed.wait_records(
        &collector,
        new_records + 20,
        "the writer on site B acknowledged nothing new",
    )
    .await;
    // What was acknowledged before the file is read (the writer goes on).
    let acked = all_acked(&collector, &bed.cluster.nodes_dir(), APP);
    let file = records_file(&bed);
    let v = verify(&file, &acked);
    eprintln!(
        "STEP 2: {acked_at_cut} records acknowledged by the cut, {} in all; {} found on {node_b}, {} missing; {} valid lines, {} invalid ({:?}); incarnations {:?}",
        acked.len(),
        v.found,
        v.missing.len(),
        v.valid,
        v.invalid.len(),
        v.invalid,
        v.incarnations
    );
    assert!(
        v.missing.is_empty(),
        "acknowledged records lost in the fail-over: {:?}\n{}",
        v.missing,
        observer.transcript(cut)
    );
    assert_eq!(v.found, acked.len());

    // ----- 3. site A returns --------------------------------------------
    let power_on = Instant::now();
    bed.cluster.power_on_site(Site::A).expect("site A on");
    bed.cluster
        .wait_ready(&[node(Site::A)], Duration::from_secs(120))
        .await
        .expect("node A Ready");
    let node_ready = Instant::now();
    let unfenced = observer
        .wait("site A unfenced", power_on, Duration::from_secs(180), |s| {
            !s.site_fenced(&zone_a) && s.site_healthy(&zone_a) == Some(true)
        })
        .await;
    let progress = observer.first(power_on, |s| {
        s.replicas
            .iter()
            .any(|r| r.site == zone_a && (r.remaining.is_some() || r.state == "Resyncing"))
    });
    let in_sync = observer
        .wait(
            "site A's replica in sync again",
            power_on,
            Duration::from_secs(180),
            |s| s.in_sync.len() == 2,
        )
        .await;
    let home = observer
        .wait(
            "the pod back on site A (failback Automatic)",
            power_on,
            Duration::from_secs(180),
            |s| s.running_on(&node_a).is_some(),
        )
        .await;
    eprintln!(
        "STEP 3: site A powered on -> node Ready {}, Site unfenced {}, resync progress first shown {}, in sync {}, pod Ready on {node_a} {}",
        between(power_on, node_ready),
        between(power_on, unfenced),
        progress
            .map(|t| between(power_on, t))
            .unwrap_or_else(|| "never (resync finished between samples)".into()),
        between(power_on, in_sync),
        between(power_on, home),
    );
    // What the resync copied, against what was dirty for A when it
    // started: B's replica server (the source) publishes both in its pool
    // (engine/src/resync.rs, `ResyncStatus`).
    let kubectl = |args: &[&str]| {
        bed.cluster
            .kubectl_ok(args)
            .expect("kubectl")
            .trim()
            .to_owned()
    };
    let pv = kubectl(&[
        "-n",
        "default",
        "get",
        "pvc",
        PVC,
        "-o",
        "jsonpath={.spec.volumeName}",
    ]);
    let volume = kubectl(&["get", "pv", &pv, "-o", "jsonpath={.spec.csi.volumeHandle}"]);
    let status_file = bed
        .cluster
        .shared_dir(node(Site::B))
        .expect("node B's shared dir")
        .join("pool")
        // The replica's directory, and in it the engine's pool of that one
        // volume (csi-driver/src/node/replicas.rs).
        .join(&volume)
        .join(&volume)
        .join("resync-status.json");
    let raw = std::fs::read_to_string(&status_file)
        .unwrap_or_else(|e| panic!("{}: {e}", status_file.display()));
    let resync: serde_json::Value = serde_json::from_str(&raw).expect("resync status JSON");
    let number = |key: &str| {
        resync[key]
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {raw}"))
    };
    // This resync's own figures: dirty when its first attempt began
    // copying, copied over all its attempts (a failed attempt's copies
    // count; it also leaves the next attempt less dirty).
    let (dirty, copied) = (
        number("resync_dirty_bytes_at_start"),
        number("resync_copied_bytes"),
    );
    eprintln!(
        "STEP 3: resync of {volume} to site A: {:.2} MiB dirty at its start, {:.2} MiB copied ({:.3} of dirty), {} regions recopied, {} attempt(s), full copy: {}; volume 256 MiB",
        dirty as f64 / 1048576.0,
        copied as f64 / 1048576.0,
        copied as f64 / dirty.max(1) as f64,
        number("resync_recopied_regions"),
        number("resync_attempts"),
        resync["full_copy"].as_str().unwrap_or("no"),
    );
    // The writer goes on during the resync: what it dirties meanwhile is
    // copied too, so the ratio is a figure (benches/site-loss.sh), not a
    // bound; a full copy would be a failure.
    assert!(resync["full_copy"].is_null(), "a full copy: {raw}");
    let new_records = collector.count();
    bed.wait_records(
        &collector,
        new_records + 20,
        "the writer back on site A acknowledged nothing new",
    )
    .await;
    // What was acknowledged before the file is read (the writer goes on).
    let acked = all_acked(&collector, &bed.cluster.nodes_dir(), APP);
    let file = records_file(&bed);
    let v = verify(&file, &acked);
    eprintln!(
        "STEP 3: {} records acknowledged in all; {} found on {node_a}, {} missing, {} invalid lines",
        acked.len(),
        v.found,
        v.missing.len(),
        v.invalid.len()
    );
    assert!(
        v.missing.is_empty(),
        "acknowledged records lost on the way home: {:?}",
        v.missing
    );
    eprintln!("timeline:\n{}", observer.transcript(cut));
    observer.stop();
    eprintln!(
        "whole scenario {} (after the chart was installed)",
        secs(test_started.elapsed())
    );
    bed.shutdown();
}
