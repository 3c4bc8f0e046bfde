//! Issue 13's planned-maintenance, replica-loss and upgrade scenarios on the
//! cluster bed with the chart installed, on one bed, with two workloads
//! writing the whole time (each a StatefulSet appending checksummed records,
//! fsyncing each, reporting every acknowledged one; common/workload.rs):
//! `writer`, at home on site A, and `steady`, at home on site B.
//!
//! 1. `helm upgrade` to a changed image tag: every component of the release
//!    (operator, CSI controller, node plugins) rolls while both write. Both
//!    pods stay where they are, never restarted, and see no I/O error: the
//!    data plane (frontends, replica servers, the heartbeat renewer) outlives
//!    the node plugin's container.
//! 2. Planned maintenance of site A through the Site annotation: the
//!    operator drains `writer` to site B (an eviction, a graceful stop); no
//!    I/O error in it.
//! 3. Site A loses power while under maintenance: both pods, now on site B,
//!    have just lost their volume's replica on site A. They keep running —
//!    same pod, no container restart — and their records keep being
//!    acknowledged (the surviving frontend carries on alone).
//! 4. Site A's power returns: both volumes resync by themselves and are in
//!    sync again; `writer` stays on B while the annotation is set.
//! 5. The annotation is removed: with failback Automatic `writer` goes home
//!    to site A; `steady` stays on B (its home) in the same pod as at the
//!    start.
//!
//! At the end every record either pod acknowledged is in its volume's file,
//! checksum intact, and no pod of either workload saw an I/O error.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::observe::{Observer, Sample, between};
use common::workload::{Collector, all_acked, io_errors, statefulset, verify};
use common::{Bed, NAMESPACE, node};
use twinvol_e2e::cluster::Site;

const WRITER: &str = "writer";
const STEADY: &str = "steady";
const MAINTENANCE: &str = "twinvol.io/maintenance";
/// The tag `helm upgrade` moves the release to (same binaries, new image).
const TAG2: &str = "chart-test-2";
/// The longest a workload may go without an acknowledged record through
/// the upgrade and through the loss of its replica on A: the frontend's
/// self-fencing (5 s without a heartbeat renewal) would exceed it.
const MAX_HOLD: Duration = Duration::from_secs(5);

/// The longest gap between two records the collector received up to `to`,
/// from the last one before `from`: how long the workload was held.
fn longest_gap(collector: &Collector, from: Instant, to: Instant) -> Duration {
    let all: Vec<Instant> = collector.arrivals().into_iter().map(|(t, _)| t).collect();
    // From the last record before `from`: a hold that began with the event
    // (a write in flight when the site went dark) spans `from` itself.
    let first = all.iter().rposition(|t| *t < from).unwrap_or(0);
    let times: Vec<Instant> = all[first..].iter().copied().filter(|t| *t <= to).collect();
    times
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

/// The images of the release's pods' twinvol containers, with the pods' names.
fn release_images(bed: &Bed) -> Vec<(String, String)> {
    let out = bed.kubectl(&[
        "-n",
        NAMESPACE,
        "get",
        "pods",
        "-o",
        "jsonpath={range .items[*]}{.metadata.name}{range .spec.containers[*]} {.image}{end}{\"\\n\"}{end}",
    ]);
    let mut images = Vec::new();
    for line in out.lines() {
        let mut words = line.split_whitespace();
        let Some(pod) = words.next() else { continue };
        for image in words.filter(|i| i.contains("/twinvol:")) {
            images.push((pod.to_owned(), image.to_owned()));
        }
    }
    images
}

/// Whether the pod `uid` is the workload's Ready one, never restarted in
/// place.
fn same_pod(s: &Sample, uid: &str) -> bool {
    s.pods
        .iter()
        .any(|p| p.uid == uid && p.restarts == 0 && p.ready && !p.deleting)
}

/// What a workload must not notice of `what` (since `since`): its pod
/// `uid` still the Ready one and never restarted, no I/O error, no pause
/// of MAX_HOLD or more between acknowledged records. Returns the longest
/// pause.
fn undisturbed(
    (app, obs, log): (&str, &Observer, &Collector),
    uid: &str,
    nodes_dir: &Path,
    since: Instant,
    what: &str,
) -> Duration {
    let last = obs.latest().expect("sample");
    assert!(
        same_pod(&last, uid),
        "{app}'s pod was restarted or replaced by {what}: {last:?}\n{}",
        obs.transcript(since)
    );
    assert_eq!(
        io_errors(nodes_dir, app),
        Vec::<String>::new(),
        "{app} saw I/O errors in {what}"
    );
    let gap = longest_gap(log, since, Instant::now());
    // A replica's loss holds writes for about the replica timeout (1 s)
    // and the in-sync update; a frontend that stopped acknowledging (its
    // heartbeat lapsed, a fail-over of the wrong site) would hold them far
    // longer.
    assert!(
        gap < MAX_HOLD,
        "{what} held {app}'s writes {gap:?}\n{}",
        obs.transcript(since)
    );
    gap
}

fn annotate_site(bed: &Bed, site: &str, value: Option<&str>) {
    let arg = match value {
        Some(v) => format!("{MAINTENANCE}={v}"),
        None => format!("{MAINTENANCE}-"),
    };
    bed.cluster
        .kubectl_ok(&["annotate", "--overwrite", "site", site, &arg])
        .unwrap_or_else(|e| panic!("annotating Site {site}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_replica_loss_and_upgrade_under_writes_without_an_io_error() {
    let zone_a = Site::A.zone();
    let zone_b = Site::B.zone();
    // The chart's StorageClass prefers A; `steady`'s volume gets a class
    // of its own preferring B (else the operator would move it "home" to A).
    let extra = serde_json::json!({
        "storageClass": {"preferredSite": zone_a, "failback": "Automatic"},
    });
    let Some(mut bed) = Bed::install(extra).await else {
        return;
    };
    let test_started = Instant::now();
    let node_a = node(Site::A).node_name();
    let node_b = node(Site::B).node_name();
    let nodes_dir = bed.cluster.nodes_dir();
    bed.cluster
        .kubectl_apply(&format!(
            r#"apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata: {{name: twinvol-b}}
provisioner: csi.twinvol.io
volumeBindingMode: WaitForFirstConsumer
allowVolumeExpansion: true
parameters: {{failback: Automatic, fsType: ext4, preferredSite: "{zone_b}"}}
"#
        ))
        .expect("StorageClass twinvol-b");

    let writer_log = Collector::start(bed.cluster.control_plane_ip()).await;
    let steady_log = Collector::start(bed.cluster.control_plane_ip()).await;
    let writer = Observer::start(bed.cluster.client(), WRITER, "data-writer-0");
    let steady = Observer::start(bed.cluster.client(), STEADY, "data-steady-0");
    let applied = Instant::now();
    for (app, class, home, log) in [
        (WRITER, "twinvol", &zone_a, &writer_log),
        (STEADY, "twinvol-b", &zone_b, &steady_log),
    ] {
        bed.cluster
            .kubectl_apply(&statefulset(
                app,
                class,
                "256Mi",
                home,
                log.addr.expect("collector address"),
                &nodes_dir,
            ))
            .expect("StatefulSet applied");
    }
    writer
        .wait(
            "writer Ready on site A",
            applied,
            Duration::from_secs(180),
            |s| s.running_on(&node_a).is_some(),
        )
        .await;
    steady
        .wait(
            "steady Ready on site B",
            applied,
            Duration::from_secs(180),
            |s| s.running_on(&node_b).is_some(),
        )
        .await;
    bed.wait_records(&writer_log, writer_log.count() + 30, "writer on A")
        .await;
    bed.wait_records(&steady_log, steady_log.count() + 30, "steady on B")
        .await;
    let writer_uid = writer
        .latest()
        .expect("sample")
        .running_on(&node_a)
        .expect("writer on A");
    let steady_uid = steady
        .latest()
        .expect("sample")
        .running_on(&node_b)
        .expect("steady on B");
    eprintln!(
        "SETUP: writer Ready on {node_a}, steady Ready on {node_b} {} after the StatefulSets were applied",
        between(applied, Instant::now())
    );

    // ----- 1. helm upgrade to a changed image ---------------------------
    bed.add_twinvol_image(TAG2);
    let expected = bed.pod_states().len();
    let upgrade = Instant::now();
    let values = bed.home.path().join("values.json").display().to_string();
    let chart = common::repo().join("charts/twinvol").display().to_string();
    bed.helm(&[
        "upgrade",
        "twinvol",
        &chart,
        "-f",
        &values,
        "--set",
        &format!("image.tag={TAG2}"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let images = release_images(&bed);
        let states = bed.pod_states();
        let rolled =
            !images.is_empty() && images.iter().all(|(_, i)| i.ends_with(&format!(":{TAG2}")));
        if rolled && states.len() == expected && states.iter().all(|(_, r)| *r) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the release did not roll to {TAG2} in 300 s: {images:?} {states:?}\n{}",
            bed.diagnostics()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rolled = Instant::now();
    bed.wait_records(
        &writer_log,
        writer_log.count() + 20,
        "writer after the upgrade",
    )
    .await;
    bed.wait_records(
        &steady_log,
        steady_log.count() + 20,
        "steady after the upgrade",
    )
    .await;
    let gaps = (
        undisturbed(
            (WRITER, &writer, &writer_log),
            &writer_uid,
            &nodes_dir,
            upgrade,
            "the upgrade",
        ),
        undisturbed(
            (STEADY, &steady, &steady_log),
            &steady_uid,
            &nodes_dir,
            upgrade,
            "the upgrade",
        ),
    );
    eprintln!(
        "STEP 1: helm upgrade to {TAG2}: every pod of the release rolled and Ready in {}; writer and steady kept their pods, no restart, no I/O error; longest gap between acknowledged records: writer {:.2} s, steady {:.2} s",
        between(upgrade, rolled),
        gaps.0.as_secs_f64(),
        gaps.1.as_secs_f64(),
    );

    // ----- 2. maintenance of site A --------------------------------------
    let drain = Instant::now();
    annotate_site(&bed, &zone_a, Some("e2e planned maintenance"));
    let moved = writer
        .wait(
            "writer Ready on site B (drained)",
            drain,
            Duration::from_secs(120),
            |s| s.running_on(&node_b).is_some(),
        )
        .await;
    let draining = writer.first(drain, |s| {
        s.condition("AwayFromHome")
            .is_some_and(|c| c.contains("Draining"))
    });
    bed.wait_records(
        &writer_log,
        writer_log.count() + 20,
        "writer on B after the drain",
    )
    .await;
    let writer_uid_b = writer
        .latest()
        .expect("sample")
        .running_on(&node_b)
        .expect("writer on B");
    assert_eq!(
        io_errors(&nodes_dir, WRITER),
        Vec::<String>::new(),
        "the drain gave writer I/O errors"
    );
    assert!(
        same_pod(&steady.latest().expect("sample"), &steady_uid),
        "steady was touched by the drain\n{}",
        steady.transcript(drain)
    );
    eprintln!(
        "STEP 2: maintenance annotation on {zone_a} -> Draining shown {}, writer Ready on {node_b} {}; longest gap between writer's acknowledged records {:.1} s; no I/O error",
        draining
            .map(|t| between(drain, t))
            .unwrap_or_else(|| "-".into()),
        between(drain, moved),
        longest_gap(&writer_log, drain, Instant::now()).as_secs_f64(),
    );

    // ----- 3. site A loses power: both pods' replica on A is lost -------
    let cut = Instant::now();
    bed.cluster.power_off_site(Site::A).expect("site A off");
    writer
        .wait("site A unhealthy", cut, Duration::from_secs(90), |s| {
            s.site_healthy(&zone_a) == Some(false)
        })
        .await;
    let dropped = |s: &Sample| !s.in_sync.contains(&zone_a);
    let w_dropped = writer
        .wait(
            "writer's replica on A out of the in-sync set",
            cut,
            Duration::from_secs(90),
            dropped,
        )
        .await;
    let s_dropped = steady
        .wait(
            "steady's replica on A out of the in-sync set",
            cut,
            Duration::from_secs(90),
            dropped,
        )
        .await;
    // Past detection, the lease wait and the fencing of site A: what a
    // fail-over would have done by now it would have done.
    let fenced = writer
        .wait("site A fenced", cut, Duration::from_secs(90), |s| {
            s.site_fenced(&zone_a)
        })
        .await;
    // Then a window of records (several seconds at one per 20 ms plus
    // its fsync) in which a wrong move of theirs would show.
    bed.wait_records(
        &writer_log,
        writer_log.count() + 150,
        "writer on B with site A off",
    )
    .await;
    bed.wait_records(
        &steady_log,
        steady_log.count() + 150,
        "steady on B with site A off",
    )
    .await;
    let what = "the loss of its replica on A";
    let gaps = (
        undisturbed(
            (WRITER, &writer, &writer_log),
            &writer_uid_b,
            &nodes_dir,
            cut,
            what,
        ),
        undisturbed(
            (STEADY, &steady, &steady_log),
            &steady_uid,
            &nodes_dir,
            cut,
            what,
        ),
    );
    eprintln!(
        "STEP 3: site A powered off -> replica A out of the in-sync set: writer {}, steady {}; site A fenced {}; both pods on {node_b} kept running (same pod, no restart, no I/O error); longest gap between acknowledged records: writer {:.1} s, steady {:.1} s",
        between(cut, w_dropped),
        between(cut, s_dropped),
        between(cut, fenced),
        gaps.0.as_secs_f64(),
        gaps.1.as_secs_f64(),
    );

    // ----- 4. site A's power returns: resync -------------------------------
    let power_on = Instant::now();
    bed.cluster.power_on_site(Site::A).expect("site A on");
    bed.cluster
        .wait_ready(&[node(Site::A)], Duration::from_secs(120))
        .await
        .expect("node A Ready");
    let both = |s: &Sample| s.in_sync.len() == 2;
    let w_sync = writer
        .wait(
            "writer's volume in sync again",
            power_on,
            Duration::from_secs(180),
            both,
        )
        .await;
    let s_sync = steady
        .wait(
            "steady's volume in sync again",
            power_on,
            Duration::from_secs(180),
            both,
        )
        .await;
    let progress = writer.first(power_on, |s| {
        s.replicas
            .iter()
            .any(|r| r.site == zone_a && (r.remaining.is_some() || r.state == "Resyncing"))
    });
    let last = writer.latest().expect("sample");
    assert!(
        last.running_on(&node_b).is_some(),
        "writer left site B while site A is still under maintenance: {last:?}"
    );
    let waiting = last
        .condition("AwayFromHome")
        .unwrap_or_default()
        .to_owned();
    eprintln!(
        "STEP 4: site A powered on -> resync progress shown {}, writer in sync {}, steady in sync {}; writer stays on {node_b} while the annotation is set ({waiting})",
        progress
            .map(|t| between(power_on, t))
            .unwrap_or_else(|| "never (between samples)".into()),
        between(power_on, w_sync),
        between(power_on, s_sync),
    );

    // ----- 5. maintenance over: fail-back ----------------------------------
    let over = Instant::now();
    annotate_site(&bed, &zone_a, None);
    let home = writer
        .wait(
            "writer back home on site A",
            over,
            Duration::from_secs(180),
            |s| s.running_on(&node_a).is_some(),
        )
        .await;
    bed.wait_records(&writer_log, writer_log.count() + 20, "writer home on A")
        .await;
    bed.wait_records(&steady_log, steady_log.count() + 20, "steady at the end")
        .await;
    eprintln!(
        "STEP 5: annotation removed -> writer Ready on {node_a} {}",
        between(over, home)
    );

    // ----- the records ----------------------------------------------------
    for (obs, app, log, pod) in [
        (&writer, WRITER, &writer_log, "writer-0"),
        (&steady, STEADY, &steady_log, "steady-0"),
    ] {
        let acked = all_acked(log, &nodes_dir, app);
        let file = bed
            .cluster
            .kubectl_ok(&["exec", pod, "--", "cat", "/data/records"])
            .unwrap_or_else(|e| panic!("reading {app}'s records: {e}\n{}", bed.diagnostics()));
        let v = verify(&file, &acked);
        let errors = io_errors(&nodes_dir, app);
        eprintln!(
            "RECORDS {app}: {} acknowledged, {} found, {} missing, {} invalid lines, incarnations {:?}, I/O errors {}",
            acked.len(),
            v.found,
            v.missing.len(),
            v.invalid.len(),
            v.incarnations,
            errors.len()
        );
        assert!(
            v.missing.is_empty(),
            "{app}: acknowledged records lost: {:?}\n{}",
            v.missing,
            obs.transcript(test_started)
        );
        assert_eq!(errors, Vec::<String>::new(), "{app} saw I/O errors");
    }
    let last = steady.latest().expect("sample");
    assert!(
        same_pod(&last, &steady_uid),
        "steady's pod changed during the test: {last:?}\n{}",
        steady.transcript(test_started)
    );
    eprintln!("timeline of writer:\n{}", writer.transcript(test_started));
    writer.stop();
    steady.stop();
    eprintln!(
        "whole scenario {} (after the chart was installed)",
        between(test_started, Instant::now())
    );
    bed.shutdown();
}
