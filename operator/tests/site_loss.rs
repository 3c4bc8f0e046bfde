//! The operator against a real control plane: placement and what a
//! kubectl user sees; a site going dark (its node plugins and frontends
//! killed with SIGKILL) and the fail-over with its timeline (the CSI
//! sidecars' leader Lease held there taken over first); the site
//! coming back and the automatic fail-back home.

mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Pod;
use kube::api::Api;
use serde_json::json;
use twinvol_crds::Site;
use twinvol_e2e::wait::Poll;

use support::*;

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placement_site_loss_and_automatic_failback() {
    let bed = Bed::start().await;
    bed.mark("control plane up, CRDs installed");
    let _operator = bed.operator("operator");

    for (site, zone) in [("east", "zone-east"), ("west", "zone-west")] {
        bed.site(site, zone).await;
    }
    for (node, zone) in [
        ("east-1", "zone-east"),
        ("east-2", "zone-east"),
        ("west-1", "zone-west"),
    ] {
        bed.node(node, zone).await;
    }
    // The CSI controller's two replicas, one per site (no kubelet: pods
    // bound to nodes, as the scheduler leaves them), and the sidecars'
    // leader Leases: the attacher's held on east, the provisioner's on west.
    let pods: Api<Pod> = Api::namespaced(bed.client.clone(), NS);
    let leases: Api<Lease> = Api::namespaced(bed.client.clone(), NS);
    for (pod, node) in [("controller-east", "east-1"), ("controller-west", "west-1")] {
        bed.create(
            &pods,
            json!({"metadata": {"name": pod},
                   "spec": {"nodeName": node, "automountServiceAccountToken": false,
                            "containers": [{"name": "csi-attacher", "image": "busybox", "imagePullPolicy": "Never"}]}}),
        )
        .await;
    }
    for (lease, holder) in [
        ("external-attacher-leader-csi-twinvol-io", "controller-east"),
        ("csi-twinvol-io", "controller-west"),
    ] {
        bed.create(
            &leases,
            json!({"metadata": {"name": lease},
                   "spec": {"holderIdentity": holder, "leaseDurationSeconds": 3600}}),
        )
        .await;
    }
    let mut east = bed.heartbeats("heartbeats-east", &["east-1", "east-2"]);
    let _west = bed.heartbeats("heartbeats-west", &["west-1"]);
    bed.volume("vol-1", ["east", "west"], "east", "Automatic")
        .await;
    bed.claim("vol-1").await;
    let pod_uid = bed.pod("app-0", "vol-1", "east-1").await;
    let mut frontend = bed.frontend("vol-1", "east-1");
    bed.mark(
        "Sites east (east-1, east-2) and west (west-1), MirroredVolume vol-1, pod app-0 on east-1",
    );

    // Placement: one replica per site on a ready node; the frontend's lease.
    let mv = bed
        .until("placement and the frontend lease", "operator", || async {
            let mv = bed.mv("vol-1").await;
            let placed = condition(&mv, "Placed").is_some_and(|c| c.0 == "True");
            let serving = condition(&mv, "Ready").is_some_and(|c| c.0 == "True");
            if placed && serving {
                Poll::Ready(mv)
            } else {
                Poll::Pending(format!("{:?}", mv.status))
            }
        })
        .await;
    let status = mv.status.clone().expect("a status");
    let placed: Vec<(String, String)> = status
        .replicas
        .iter()
        .map(|r| {
            (
                r.site.to_string(),
                r.node.as_ref().map(ToString::to_string).unwrap_or_default(),
            )
        })
        .collect();
    bed.mark(format!(
        "placed: {placed:?}, epoch {}, frontend {:?}",
        epoch(&mv),
        frontend_node(&mv)
    ));
    assert!(
        placed
            .iter()
            .any(|(s, n)| s == "east" && n.starts_with("east-")),
        "{placed:?}"
    );
    assert!(
        placed.contains(&("west".into(), "west-1".into())),
        "{placed:?}"
    );
    assert_eq!(frontend_node(&mv).as_deref(), Some("east-1"));
    assert_eq!(epoch(&mv), 1);
    assert!(
        mv.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"twinvol.io/replica-data".to_owned())
    );

    // What a kubectl user sees.
    let table = bed
        .plane
        .kubectl_ok(&["get", "mirroredvolumes", "vol-1"])
        .expect("kubectl get mv");
    println!("$ kubectl get mirroredvolumes vol-1\n{table}");
    let row = table.lines().nth(1).expect("a row");
    for want in ["vol-1", "1Gi", "east", "1", "east-1", "True"] {
        assert!(row.contains(want), "{want} missing from: {row}");
    }
    let sites = bed
        .until("Site east Healthy", "operator", || async {
            let t = bed.plane.kubectl_ok(&["get", "sites"]).unwrap_or_default();
            if t.lines()
                .any(|l| l.starts_with("east") && l.contains("True") && l.contains(" 2 "))
            {
                Poll::Ready(t)
            } else {
                Poll::Pending(t)
            }
        })
        .await;
    println!("$ kubectl get sites\n{sites}");
    let described = bed
        .plane
        .kubectl_ok(&["describe", "mirroredvolume", "vol-1"])
        .expect("describe");
    assert!(
        described.contains("Placed"),
        "no Placed event:\n{described}"
    );

    // Site east goes dark: its node plugins and the frontend die at once.
    let before = bed.mv("vol-1").await;
    let last_renewal = before
        .status
        .as_ref()
        .and_then(|s| s.frontend.as_ref())
        .and_then(|f| f.renew_time.as_ref())
        .map(|t| t.0.as_millisecond() as u64)
        .expect("a renewed lease");
    east.kill();
    frontend.kill();
    let dark = Instant::now();
    let dark_wall = wall_ms();
    bed.mark("SIGKILL east's heartbeats and vol-1's frontend on east-1: east is dark");

    let sites_api: Api<Site> = Api::all(bed.client.clone());
    bed.until("east Healthy=False", "operator", || async {
        let site = sites_api.get("east").await.expect("site");
        ready(site_condition(&site, "Healthy").is_some_and(|c| c.0 == "False"))
    })
    .await;
    let unhealthy = dark.elapsed();
    bed.mark(format!(
        "east Healthy=False after {:.2}s (threshold {:?})",
        unhealthy.as_secs_f64(),
        STALENESS
    ));
    assert!(unhealthy >= STALENESS, "stale before the threshold");
    assert!(
        unhealthy <= STALENESS + Duration::from_secs(4),
        "too slow: {unhealthy:?}"
    );

    // The sidecar Lease held on east is taken over (its holder cannot renew
    // it; its standby would wait out the hour), before the epoch bump.
    bed.until(
        "the attacher's Lease held on east deleted",
        "operator",
        || async {
            ready(
                leases
                    .get_opt("external-attacher-leader-csi-twinvol-io")
                    .await
                    .expect("lease")
                    .is_none(),
            )
        },
    )
    .await;
    bed.mark(format!(
        "the attacher's leader Lease (held by controller-east) deleted after {:.2}s",
        dark.elapsed().as_secs_f64()
    ));

    let bumped = bed.epoch_bumped("vol-1", "operator").await;
    let bump_wall = wall_ms();
    assert!(
        leases
            .get_opt("csi-twinvol-io")
            .await
            .expect("lease")
            .is_some(),
        "the Lease held on west was deleted"
    );
    let log = bed.operator_log("operator");
    let took_over = log
        .find("took over a leader Lease held on a lost site")
        .expect("the take-over logged");
    let fenced_at = log
        .find("fenced the frontend of a lost site: epoch bumped")
        .expect("the bump logged");
    assert!(
        took_over < fenced_at,
        "the Lease was taken over only after the epoch bump"
    );
    bed.mark(format!(
        "vol-1 epoch 1 -> {} after {:.2}s; in sync: {:?}; frontend: {:?}",
        epoch(&bumped),
        dark.elapsed().as_secs_f64(),
        in_sync(&bumped),
        frontend_node(&bumped)
    ));
    assert_eq!(epoch(&bumped), 2, "exactly one bump");
    assert!(
        bump_wall >= last_renewal + (LEASE + MARGIN).as_millis() as u64,
        "bumped at {bump_wall} ms, before the lease renewed at {last_renewal} ms expired plus the margin"
    );
    assert!(bump_wall >= dark_wall, "bumped after the blackout");
    assert_eq!(in_sync(&bumped), vec!["west".to_owned()]);
    assert_eq!(frontend_node(&bumped), None);

    bed.until("east fenced", "operator", || async {
        let site = sites_api.get("east").await.expect("site");
        ready(site.status.as_ref().is_some_and(|s| s.fenced))
    })
    .await;
    bed.mark(format!(
        "east fenced after {:.2}s",
        dark.elapsed().as_secs_f64()
    ));
    bed.until("app-0 force-deleted", "operator", || async {
        ready(bed.pod_uid("app-0").await.is_none())
    })
    .await;
    let pod_gone = dark.elapsed();
    bed.mark(format!(
        "pod app-0 (uid {pod_uid}) gone after {:.2}s",
        pod_gone.as_secs_f64()
    ));
    bed.until(
        "the VolumeAttachment to east-1 deleted",
        "operator",
        || async { ready(!bed.attachment_exists("csi-vol-1-east-1").await) },
    )
    .await;
    bed.mark(format!(
        "VolumeAttachment csi-vol-1-east-1 gone after {:.2}s",
        dark.elapsed().as_secs_f64()
    ));
    bed.until("east's nodes tainted", "operator", || async {
        ready(
            bed.node_taints("east-1")
                .await
                .contains(&"twinvol.io/fenced".to_owned()),
        )
    })
    .await;
    let described = bed
        .plane
        .kubectl_ok(&["describe", "mirroredvolume", "vol-1"])
        .expect("describe");
    println!(
        "$ kubectl describe mirroredvolume vol-1 (events)\n{}",
        described
            .lines()
            .skip_while(|l| !l.starts_with("Events"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    for event in ["FailedOver", "PodDeleted"] {
        assert!(described.contains(event), "no {event} event:\n{described}");
    }

    // What Prometheus and a liveness probe see.
    let (status, _) = bed.http_get("operator", "/healthz");
    assert!(status.contains("200"), "{status}");
    let (status, metrics) = bed.http_get("operator", "/metrics");
    assert!(status.contains("200"), "{status}");
    for line in [
        "twinvol_operator_failovers_total 1",
        "twinvol_operator_leader 1",
        "twinvol_operator_sites_fenced 1",
        "twinvol_operator_volumes{state=\"Degraded\"} 1",
        "twinvol_operator_reconcile_runs_total{controller=\"site\"}",
    ] {
        assert!(
            metrics.contains(line),
            "{line} missing from /metrics:\n{metrics}"
        );
    }

    // The StatefulSet controller recreates the pod; the scheduler puts it
    // on west (east is tainted); its frontend starts there.
    bed.pod("app-0", "vol-1", "west-1").await;
    let _frontend_west = bed.frontend("vol-1", "west-1");
    bed.until("the frontend on west-1", "operator", || async {
        let mv = bed.mv("vol-1").await;
        ready(frontend_node(&mv).as_deref() == Some("west-1"))
    })
    .await;
    let mv = bed.mv("vol-1").await;
    bed.mark(format!(
        "app-0 recreated on west-1; its frontend holds the lease at epoch {}",
        epoch(&mv)
    ));
    bed.until("AwayFromHome=True", "operator", || async {
        let mv = bed.mv("vol-1").await;
        ready(condition(&mv, "AwayFromHome").is_some_and(|c| c.0 == "True"))
    })
    .await;

    // east returns: unfenced after the recovery period; resync; home.
    let _east = bed.heartbeats("heartbeats-east-2", &["east-1", "east-2"]);
    let back = Instant::now();
    bed.mark("east's node plugins are back");
    bed.until("east unfenced", "operator", || async {
        let site = sites_api.get("east").await.expect("site");
        ready(site.status.as_ref().is_some_and(|s| !s.fenced))
    })
    .await;
    let unfenced = back.elapsed();
    bed.mark(format!(
        "east unfenced after {:.2}s (recovery {:?})",
        unfenced.as_secs_f64(),
        RECOVERY
    ));
    assert!(unfenced >= RECOVERY, "unfenced before the recovery period");
    bed.until("east's fenced taint removed", "operator", || async {
        ready(
            !bed.node_taints("east-1")
                .await
                .contains(&"twinvol.io/fenced".to_owned()),
        )
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        bed.pod_uid("app-0").await.is_some_and(|(_, t)| !t),
        "not moved home before east is in sync"
    );
    bed.resync_done("vol-1", "east").await;
    bed.mark("east's replica resynced: back in the in-sync set");
    let (_, terminating) = bed
        .until("app-0 evicted to move home", "operator", || async {
            match bed.pod_uid("app-0").await {
                Some((uid, true)) => Poll::Ready((uid, true)),
                other => Poll::Pending(format!("{other:?}")),
            }
        })
        .await;
    assert!(terminating);
    bed.mark("app-0 evicted from west-1 (Automatic fail-back, east preferred)");
    bed.kubelet_finishes("app-0").await;
    bed.delete_attachment("csi-vol-1-west-1").await;
    bed.pod("app-0", "vol-1", "east-1").await;
    bed.mark("app-0 recreated on east-1");
    let described = bed
        .plane
        .kubectl_ok(&["describe", "mirroredvolume", "vol-1"])
        .expect("describe");
    assert!(described.contains("EvictedToMoveHome"), "{described}");
    println!("timeline:\n{}", bed.timeline());
}

/// The operator's leader is lost with the site (half of all site losses:
/// it runs on one of them). The standby has watched the heartbeats and the
/// frontends all along (operator/src/standby.rs), so when it takes over it
/// fails the volume over as soon as the site's heartbeats are stale —
/// counted from the last change it saw, before it led — instead of
/// starting to watch then and waiting a whole threshold again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_taking_over_from_a_leader_lost_with_the_site_does_not_wait_again() {
    // Long enough a threshold to tell the two apart on a loaded machine:
    // bumped ~6.5 s after the blackout when the standby's observations
    // count, ≥ 10 s when it starts watching at its takeover (killed at +3 s,
    // taking over ≤ 3 s later, then a whole 6 s threshold).
    const THRESHOLD: Duration = Duration::from_secs(6);
    let timings = [
        ("--staleness-threshold", "6s"),
        ("--leader-lease-duration", "3s"),
        ("--leader-lease-grace", "1s"),
    ];
    let bed = Bed::start().await;
    let mut first = bed.operator_with("operator-1", &timings);
    for (site, zone) in [("east", "zone-east"), ("west", "zone-west")] {
        bed.site(site, zone).await;
    }
    for (node, zone) in [("east-1", "zone-east"), ("west-1", "zone-west")] {
        bed.node(node, zone).await;
    }
    let mut east = bed.heartbeats("heartbeats-east", &["east-1"]);
    let _west = bed.heartbeats("heartbeats-west", &["west-1"]);
    bed.volume("vol-1", ["east", "west"], "east", "Manual")
        .await;
    bed.claim("vol-1").await;
    bed.pod("app-0", "vol-1", "east-1").await;
    let mut frontend = bed.frontend("vol-1", "east-1");
    bed.until(
        "the frontend lease, operator-1 leading",
        "operator-1",
        || async {
            let mv = bed.mv("vol-1").await;
            ready(condition(&mv, "Ready").is_some_and(|c| c.0 == "True"))
        },
    )
    .await;
    let _second = bed.operator_with("operator-2", &timings);
    // The standby sees the heartbeats change for a while.
    tokio::time::sleep(Duration::from_secs(3)).await;
    bed.mark("operator-1 leads, operator-2 stands by; vol-1 served from east-1");

    east.kill();
    frontend.kill();
    let dark = Instant::now();
    bed.mark("east dark (heartbeats and frontend SIGKILLed)");
    tokio::time::sleep(Duration::from_secs(3)).await;
    first.kill();
    bed.mark("operator-1, the leader, SIGKILLed with the site 3 s later");

    let bumped = bed.epoch_bumped("vol-1", "operator-2").await;
    let took = dark.elapsed();
    bed.mark(format!(
        "vol-1 epoch 1 -> {} {:.2}s after the blackout",
        epoch(&bumped),
        took.as_secs_f64()
    ));
    println!("timeline:\n{}", bed.timeline());
    assert_eq!(epoch(&bumped), 2, "exactly one bump");
    assert!(took >= THRESHOLD, "bumped before the threshold: {took:?}");
    assert!(
        took < THRESHOLD + Duration::from_millis(3500),
        "the new leader waited a threshold of its own: bumped {took:?} after the blackout\n{}",
        bed.operator_log("operator-2")
    );
}
