//! Planned maintenance against a real control plane: annotating a Site
//! drains it — each volume served there moves by eviction (a
//! PodDisruptionBudget is honoured: the eviction waits while it forbids
//! it) once the other site's replica is in sync — with the progress in the
//! Site's Maintenance condition; removing the annotation brings the site
//! back and the volumes home (failback Automatic).

mod support;

use std::time::Duration;

use kube::api::Api;
use serde_json::json;
use twinvol_crds::Site;
use twinvol_e2e::wait::Poll;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_drains_by_eviction_and_restores() {
    let bed = Bed::start().await;
    let _operator = bed.operator("operator");
    for (site, zone) in [("red", "zone-red"), ("blue", "zone-blue")] {
        bed.site(site, zone).await;
    }
    for (node, zone) in [("red-1", "zone-red"), ("blue-1", "zone-blue")] {
        bed.node(node, zone).await;
    }
    let _red = bed.heartbeats("heartbeats-red", &["red-1"]);
    let _blue = bed.heartbeats("heartbeats-blue", &["blue-1"]);
    bed.volume("db", ["red", "blue"], "red", "Automatic").await;
    bed.claim("db").await;
    bed.pod("db-0", "db", "red-1").await;
    let mut frontend = bed.frontend("db", "red-1");
    bed.pdb("db-pdb", "db-0").await;
    bed.until("db served from red", "operator", || async {
        let mv = bed.mv("db").await;
        ready(
            frontend_node(&mv).as_deref() == Some("red-1")
                && condition(&mv, "Placed").is_some_and(|c| c.0 == "True"),
        )
    })
    .await;
    // Let blue be proven healthy for the recovery period first.
    tokio::time::sleep(RECOVERY + Duration::from_millis(500)).await;

    let sites: Api<Site> = Api::all(bed.client.clone());
    bed.annotate(
        &sites,
        "red",
        json!({"twinvol.io/maintenance": "UPS replacement"}),
    )
    .await;
    bed.mark("annotated Site red twinvol.io/maintenance='UPS replacement'");
    let draining = bed
        .until("red Draining", "operator", || async {
            let site = sites.get("red").await.expect("site");
            match site_condition(&site, "Maintenance") {
                Some(c) if c.1 == "Draining" => Poll::Ready(c),
                other => Poll::Pending(format!("{other:?}")),
            }
        })
        .await;
    bed.mark(format!("red Maintenance: {}", draining.2));
    assert!(draining.2.contains("db") && draining.2.contains("UPS replacement"));
    bed.until("red's node tainted for maintenance", "operator", || async {
        ready(
            bed.node_taints("red-1")
                .await
                .contains(&"twinvol.io/maintenance".to_owned()),
        )
    })
    .await;
    bed.until(
        "the eviction refused by the PodDisruptionBudget",
        "operator",
        || async {
            let d = bed
                .plane
                .kubectl_ok(&["describe", "mv", "db"])
                .unwrap_or_default();
            if d.contains("EvictionRefused") {
                Poll::Ready(())
            } else {
                Poll::Pending(d)
            }
        },
    )
    .await;
    assert!(
        bed.pod_uid("db-0").await.is_some_and(|(_, t)| !t),
        "the PDB holds the pod"
    );
    bed.mark("eviction of db-0 refused by PodDisruptionBudget db-pdb: the drain waits");
    bed.delete_pdb("db-pdb").await;
    bed.until("db-0 evicted", "operator", || async {
        ready(bed.pod_uid("db-0").await.is_some_and(|(_, t)| t))
    })
    .await;
    bed.mark("PDB removed: db-0 evicted");
    // Kubelet stops the pod, the frontend releases the volume on unstage
    // (here: its process ends, the lease runs out), the StatefulSet
    // recreates the pod and the scheduler puts it on blue.
    bed.kubelet_finishes("db-0").await;
    frontend.kill();
    bed.delete_attachment("csi-db-red-1").await;
    bed.pod("db-0", "db", "blue-1").await;
    let mut frontend_blue = bed.frontend("db", "blue-1");
    bed.until("db served from blue", "operator", || async {
        ready(frontend_node(&bed.mv("db").await).as_deref() == Some("blue-1"))
    })
    .await;
    let drained = bed
        .until("red Drained", "operator", || async {
            let site = sites.get("red").await.expect("site");
            match site_condition(&site, "Maintenance") {
                Some(c) if c.1 == "Drained" => Poll::Ready(c),
                other => Poll::Pending(format!("{other:?}")),
            }
        })
        .await;
    bed.mark(format!(
        "db-0 runs on blue-1; red Maintenance: {}",
        drained.2
    ));
    let mv = bed.mv("db").await;
    assert_eq!(
        in_sync(&mv),
        vec!["red".to_owned(), "blue".to_owned()],
        "both still in sync: nothing failed"
    );
    assert!(
        !sites
            .get("red")
            .await
            .expect("site")
            .status
            .is_some_and(|s| s.fenced),
        "a drain fences nothing"
    );

    // Maintenance over: the site comes back; db goes home.
    sites
        .patch(
            "red",
            &Default::default(),
            &kube::api::Patch::Merge(
                json!({"metadata": {"annotations": {"twinvol.io/maintenance": null}}}),
            ),
        )
        .await
        .expect("annotation removed");
    bed.mark("maintenance annotation removed");
    bed.until("red's maintenance taint removed", "operator", || async {
        ready(
            !bed.node_taints("red-1")
                .await
                .contains(&"twinvol.io/maintenance".to_owned()),
        )
    })
    .await;
    bed.until("db-0 evicted to move home", "operator", || async {
        ready(bed.pod_uid("db-0").await.is_some_and(|(_, t)| t))
    })
    .await;
    bed.mark("db-0 evicted from blue-1 to move home to red");
    bed.kubelet_finishes("db-0").await;
    frontend_blue.kill();
    bed.delete_attachment("csi-db-blue-1").await;
    bed.pod("db-0", "db", "red-1").await;
    let _frontend_red = bed.frontend("db", "red-1");
    bed.until("db served from red again", "operator", || async {
        let mv = bed.mv("db").await;
        ready(
            frontend_node(&mv).as_deref() == Some("red-1")
                && condition(&mv, "AwayFromHome").is_some_and(|c| c.0 == "False"),
        )
    })
    .await;
    bed.mark("db-0 home on red-1");
    let site = sites.get("red").await.expect("site");
    assert_eq!(
        site_condition(&site, "Maintenance").map(|c| c.1),
        Some("NotRequested".into())
    );
    println!("timeline:\n{}", bed.timeline());
}
