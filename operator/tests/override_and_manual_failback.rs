//! The operator against a real control plane, when the surviving replica
//! is not in sync: the volume does not fail over by itself (a condition and
//! an Event say why) until the audited override names the site to promote
//! and a reason; and Manual fail-back: after the site returns, the volume
//! runs away from home (a condition says so) until the move-home
//! annotation moves it.

mod support;

use std::time::Duration;

use kube::api::Api;
use serde_json::json;
use twinvol_crds::{MirroredVolume, Site};
use twinvol_e2e::wait::Poll;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn override_promotes_only_when_asked_and_manual_failback_waits_for_the_annotation() {
    let bed = Bed::start().await;
    let _operator = bed.operator("operator");
    for (site, zone) in [("north", "zone-north"), ("south", "zone-south")] {
        bed.site(site, zone).await;
    }
    for (node, zone) in [("north-1", "zone-north"), ("south-1", "zone-south")] {
        bed.node(node, zone).await;
    }
    let mut north = bed.heartbeats("heartbeats-north", &["north-1"]);
    let _south = bed.heartbeats("heartbeats-south", &["south-1"]);
    // stuck: its south replica fell out of sync before north went dark.
    // manual: both in sync, failback Manual.
    for (volume, failback) in [("stuck", "Automatic"), ("manual", "Manual")] {
        bed.volume(volume, ["north", "south"], "north", failback)
            .await;
        bed.claim(volume).await;
        bed.pod(&format!("{volume}-0"), volume, "north-1").await;
    }
    let mut frontends = vec![
        bed.frontend("stuck", "north-1"),
        bed.frontend("manual", "north-1"),
    ];
    for volume in ["stuck", "manual"] {
        bed.until("placed and served", "operator", || async {
            let mv = bed.mv(volume).await;
            ready(
                condition(&mv, "Placed").is_some_and(|c| c.0 == "True")
                    && frontend_node(&mv).as_deref() == Some("north-1"),
            )
        })
        .await;
    }
    bed.replica_lost("stuck", "south").await;
    bed.mark("stuck: the frontend on north-1 dropped south's replica (in sync: north only)");

    north.kill();
    for f in &mut frontends {
        f.kill();
    }
    bed.mark("SIGKILL north's heartbeats and frontends: north is dark");
    let sites: Api<Site> = Api::all(bed.client.clone());
    bed.until("north fenced", "operator", || async {
        ready(
            sites
                .get("north")
                .await
                .expect("site")
                .status
                .is_some_and(|s| s.fenced),
        )
    })
    .await;
    bed.mark("north fenced");
    bed.until("manual failed over", "operator", || async {
        ready(bed.pod_uid("manual-0").await.is_none())
    })
    .await;
    let manual = bed.mv("manual").await;
    assert_eq!(epoch(&manual), 2, "manual: one bump");
    bed.mark("manual: epoch 1 -> 2, pod manual-0 removed");

    // stuck must not move: wait well past the point where it would have.
    tokio::time::sleep(LEASE + MARGIN + Duration::from_secs(2)).await;
    let stuck = bed.mv("stuck").await;
    let ready_cond = condition(&stuck, "Ready").expect("a Ready condition");
    bed.mark(format!(
        "stuck: Ready={} {}: {}",
        ready_cond.0, ready_cond.1, ready_cond.2
    ));
    assert_eq!(ready_cond.1, "FailoverBlocked", "{ready_cond:?}");
    assert!(
        ready_cond.2.contains("twinvol.io/promote=south"),
        "{}",
        ready_cond.2
    );
    assert_eq!(
        epoch(&stuck),
        1,
        "no bump for a volume that does not fail over"
    );
    assert_eq!(in_sync(&stuck), vec!["north".to_owned()]);
    assert!(bed.pod_uid("stuck-0").await.is_some(), "its pod stays");
    assert!(bed.attachment_exists("csi-stuck-north-1").await);
    let described = bed
        .plane
        .kubectl_ok(&["describe", "mv", "stuck"])
        .expect("describe");
    assert!(described.contains("FailoverBlocked"), "{described}");
    let fenced = site_condition(&sites.get("north").await.expect("site"), "Fenced").expect("cond");
    assert!(
        fenced.2.contains("stuck"),
        "the Site names the volume that waits: {fenced:?}"
    );

    // An override without a reason does nothing; with one, it promotes.
    let volumes: Api<MirroredVolume> = Api::all(bed.client.clone());
    bed.annotate(&volumes, "stuck", json!({"twinvol.io/promote": "south"}))
        .await;
    bed.until("the refusal said", "operator", || async {
        let mv = bed.mv("stuck").await;
        ready(condition(&mv, "Ready").is_some_and(|c| c.2.contains("has no reason")))
    })
    .await;
    assert_eq!(epoch(&bed.mv("stuck").await), 1);
    bed.mark("stuck: override without a reason refused");
    bed.annotate(
        &volumes,
        "stuck",
        json!({"twinvol.io/promote-reason": "north flooded; accept losing south's missed writes"}),
    )
    .await;
    bed.mark("stuck: annotated twinvol.io/promote=south with a reason");
    let promoted = bed
        .until("stuck promoted", "operator", || async {
            let mv = bed.mv("stuck").await;
            if in_sync(&mv) == vec!["south".to_owned()] {
                Poll::Ready(mv)
            } else {
                Poll::Pending(format!("{:?}", mv.status))
            }
        })
        .await;
    assert_eq!(epoch(&promoted), 2, "exactly one bump for the promotion");
    bed.until(
        "stuck-0 removed after the promotion",
        "operator",
        || async { ready(bed.pod_uid("stuck-0").await.is_none()) },
    )
    .await;
    bed.until("the override annotations cleared", "operator", || async {
        let mv = bed.mv("stuck").await;
        ready(
            !mv.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("twinvol.io/promote"),
        )
    })
    .await;
    bed.mark("stuck: promoted (in sync: south, epoch 2), pod removed, annotations cleared");
    let described = bed
        .plane
        .kubectl_ok(&["describe", "mv", "stuck"])
        .expect("describe");
    assert!(
        described.contains("PromotedOutOfSync") && described.contains("north flooded"),
        "{described}"
    );

    // Manual fail-back: manual's pod restarts on south; north returns.
    bed.pod("manual-0", "manual", "south-1").await;
    let _frontend_south = bed.frontend("manual", "south-1");
    bed.until("manual served from south", "operator", || async {
        ready(frontend_node(&bed.mv("manual").await).as_deref() == Some("south-1"))
    })
    .await;
    let _north = bed.heartbeats("heartbeats-north-2", &["north-1"]);
    bed.until("north unfenced", "operator", || async {
        ready(
            sites
                .get("north")
                .await
                .expect("site")
                .status
                .is_some_and(|s| !s.fenced),
        )
    })
    .await;
    bed.resync_done("manual", "north").await;
    bed.mark("north back, unfenced; manual's north replica resynced");
    let away = bed
        .until("manual runs away from home", "operator", || async {
            let mv = bed.mv("manual").await;
            match condition(&mv, "AwayFromHome") {
                Some(c) if c.1 == "ManualFailback" => Poll::Ready(c),
                other => Poll::Pending(format!("{other:?}")),
            }
        })
        .await;
    bed.mark(format!(
        "manual: AwayFromHome={} {}: {}",
        away.0, away.1, away.2
    ));
    assert!(away.2.contains("runs away from home"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        bed.pod_uid("manual-0")
            .await
            .is_some_and(|(_, terminating)| !terminating),
        "Manual: not moved without the annotation"
    );
    bed.annotate(&volumes, "manual", json!({"twinvol.io/move-home": "true"}))
        .await;
    bed.until("manual-0 evicted", "operator", || async {
        ready(bed.pod_uid("manual-0").await.is_some_and(|(_, t)| t))
    })
    .await;
    bed.until("move-home cleared", "operator", || async {
        let mv = bed.mv("manual").await;
        ready(
            !mv.metadata
                .annotations
                .unwrap_or_default()
                .contains_key("twinvol.io/move-home"),
        )
    })
    .await;
    bed.mark("manual: annotated twinvol.io/move-home=true -> manual-0 evicted, annotation cleared");
    println!("timeline:\n{}", bed.timeline());
}
