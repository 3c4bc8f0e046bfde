//! Losing replica A while the volume is staged on site B: node A's link is
//! cut (its replica server, its node plugin and the API server are out of
//! reach), the frontend on B takes A out of the in-sync set through the
//! API — `kubectl get mv` shows it, `kubectl describe mv` has the Event —
//! and writes go on. A frontend holding the resourceVersion from before
//! that swap cannot swap again. When A's link returns, A catches up and
//! rejoins, with an Event too.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::client::{
    create_request, node_publish_request, params, publish_request, rwo, stage_request,
};
use common::{Bed, Csi, wait_for};
use twinvol_crds::NodeName;
use twinvol_csi_driver::arbiter::KubeArbiter;
use twinvol_csi_driver::proto::csi::*;
use twinvol_engine::arbiter::{Arbiter, ArbiterError, Change};
use twinvol_engine::protocol::ReplicaId;

/// Writes a file and makes it durable (both replicas, or the in-sync one).
async fn write_durably(path: PathBuf, body: Vec<u8>, within: Duration) {
    let job = tokio::task::spawn_blocking(move || {
        std::fs::write(&path, &body)?;
        std::fs::File::open(&path)?.sync_all()
    });
    match tokio::time::timeout(within, job).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => panic!("the write failed: {e}"),
        Ok(Err(e)) => panic!("the writer panicked: {e}"),
        Err(_) => panic!("the write did not complete within {within:?}: I/O did not go on"),
    }
}

fn in_sync(bed: &Bed, id: &str) -> String {
    bed.plane
        .kubectl_ok(&["get", "mv", id, "-o", "jsonpath={.status.inSync}"])
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn losing_replica_a_while_staged_on_b_takes_a_out_through_the_api() {
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    bed.place_replicas();
    let controller_plugin = bed.start_controller().await;
    let _node_a = bed.start_node(0).await;
    let node_b = bed.start_node(1).await;
    let mut controller = Csi::connect(&controller_plugin.socket)
        .await
        .expect("controller");
    let mut csi_b = Csi::connect(&node_b.socket).await.expect("node b");
    let name_b = bed.nodes[1].name.clone();

    let id = controller
        .controller
        .create_volume(create_request("pvc-loss", 128 << 20, params(&[])))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_b))
        .await
        .expect("published to B");
    let staging = bed.nodes[1].root.join("staging");
    let target = bed.nodes[1].root.join("pods/p/mount");
    csi_b
        .node
        .node_stage_volume(stage_request(&id, &staging, rwo()))
        .await
        .expect("staged on B");
    csi_b
        .node
        .node_publish_volume(node_publish_request(&id, &staging, &target, rwo()))
        .await
        .expect("published on B");
    write_durably(
        target.join("before"),
        vec![1; 1 << 20],
        Duration::from_secs(30),
    )
    .await;
    assert!(
        in_sync(&bed, &id).contains("room-a"),
        "{}",
        in_sync(&bed, &id)
    );

    // The version a frontend would hold from before the loss.
    let arbiter = KubeArbiter::new(
        bed.client(),
        id.clone(),
        NodeName::new("node-1-room-b").expect("valid"),
    );
    let before = arbiter.read().await.expect("the record");

    // Site A goes dark.
    bed.nodes[0].net.set_link(false);
    // Writes go on (held at most for the replica timeout and the swap).
    write_durably(
        target.join("during"),
        vec![2; 4 << 20],
        Duration::from_secs(60),
    )
    .await;
    let shown = wait_for(
        "kubectl to show room-a out of sync",
        Duration::from_secs(60),
        || async {
            let now = in_sync(&bed, &id);
            if now.contains("room-b") && !now.contains("room-a") {
                Ok(now)
            } else {
                Err(now)
            }
        },
    )
    .await;
    assert_eq!(shown, r#"["room-b"]"#);
    let table = bed
        .plane
        .kubectl_ok(&["get", "mv", &id])
        .expect("kubectl get mv");
    assert!(
        table.contains("[\"room-b\"]"),
        "the In-Sync column shows it:\n{table}"
    );
    wait_for(
        "the Event in kubectl describe",
        Duration::from_secs(30),
        || async {
            let text = bed
                .plane
                .kubectl_ok(&["describe", "mv", &id])
                .map_err(|e| e.to_string())?;
            if text.contains("ReplicaOutOfSync") && text.contains("room-a") {
                Ok(())
            } else {
                Err(text)
            }
        },
    )
    .await;
    let stats = csi_b
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    let condition = stats.volume_condition.expect("a condition");
    assert!(condition.abnormal, "degraded is abnormal: {condition:?}");
    assert!(
        condition.message.contains("room-a"),
        "{}",
        condition.message
    );

    // A stale resourceVersion cannot swap again.
    let b = ReplicaId::new("room-b").expect("valid");
    match arbiter
        .update(&before.version, Change::RemoveFromInSync(b))
        .await
    {
        Err(ArbiterError::Conflict { current, .. }) => {
            assert!(!current.in_sync.iter().any(|r| r.as_str() == "room-a"));
        }
        other => panic!("a stale version swapped: {other:?}"),
    }

    // More writes while A is away, then A comes back and catches up.
    write_durably(
        target.join("while-away"),
        vec![3; 8 << 20],
        Duration::from_secs(60),
    )
    .await;
    bed.nodes[0].net.set_link(true);
    wait_for(
        "room-a back in the in-sync set",
        Duration::from_secs(120),
        || async {
            let now = in_sync(&bed, &id);
            if now.contains("room-a") && now.contains("room-b") {
                Ok(())
            } else {
                Err(now)
            }
        },
    )
    .await;
    wait_for("the rejoin Event", Duration::from_secs(30), || async {
        let text = bed
            .plane
            .kubectl_ok(&["describe", "mv", &id])
            .map_err(|e| e.to_string())?;
        if text.contains("ReplicaInSync") {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    // The resync's progress reached the status: node B (the source)
    // reports it into room-a's entry.
    wait_for(
        "the resync progress in A's status entry",
        Duration::from_secs(30),
        || async {
            let done = bed
                .plane
                .kubectl_ok(&[
                    "get",
                    "mv",
                    &id,
                    "-o",
                    "jsonpath={.status.replicas[?(@.site==\"room-a\")].resyncBytesDone}",
                ])
                .unwrap_or_default();
            match done.trim().parse::<u64>() {
                Ok(n) if n > 0 => Ok(()),
                _ => Err(format!("resyncBytesDone of room-a: {done:?}")),
            }
        },
    )
    .await;
    for (file, byte, len) in [
        ("before", 1u8, 1 << 20),
        ("during", 2, 4 << 20),
        ("while-away", 3, 8 << 20),
    ] {
        let got = std::fs::read(Path::new(&target).join(file)).expect("read back");
        assert!(
            got.len() == len && got.iter().all(|b| *b == byte),
            "{file} intact"
        );
    }
}
