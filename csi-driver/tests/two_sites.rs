//! A volume moves between sites: created through CreateVolume, staged and
//! published on a node of site A (one replica on each site's node, node
//! plugins as separate processes in separate network namespaces), files
//! written, unpublished and unstaged, then staged on a node of site B — and
//! the same files read back there. Checks along the way what a user would:
//! the MirroredVolume's status (`kubectl get mv`), that unstaging leaves no
//! mount, loop device or frontend process, the heartbeat Leases, kubelet
//! registration and `/healthz`.

mod common;

use std::path::Path;
use std::time::Duration;

use common::client::{
    create_request, node_publish_request, params, publish_request, rwo, stage_request,
};
use common::{Bed, Csi, NAMESPACE, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use twinvol_crds::MirroredVolume;
use twinvol_csi_driver::proto::csi::*;
use twinvol_csi_driver::proto::registration::InfoRequest;
use twinvol_csi_driver::proto::registration::registration_client::RegistrationClient;

const SIZE: i64 = 256 << 20;

fn write_files(dir: &Path) {
    for i in 0..20 {
        let body: Vec<u8> = (0..64 * 1024).map(|j| ((i * 31 + j) % 251) as u8).collect();
        std::fs::write(dir.join(format!("file-{i}")), body).expect("write a file");
    }
    std::fs::write(dir.join("hello.txt"), "written on site A\n").expect("write");
    // Make the data durable through the filesystem: a flush reaches both
    // replicas before this returns.
    let status = std::process::Command::new("sync")
        .arg("-f")
        .arg(dir.join("hello.txt"))
        .status();
    assert!(status.is_ok_and(|s| s.success()), "sync");
}

fn check_files(dir: &Path) {
    for i in 0..20 {
        let want: Vec<u8> = (0..64 * 1024).map(|j| ((i * 31 + j) % 251) as u8).collect();
        let got = std::fs::read(dir.join(format!("file-{i}"))).expect("read a file");
        assert!(got == want, "file-{i} differs after the move");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("hello.txt")).expect("read"),
        "written on site A\n"
    );
}

fn loops_over(dir: &Path) -> Vec<String> {
    let out = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
        .output()
        .expect("losetup");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|b| Path::new(b).starts_with(dir))
        })
        .map(str::to_owned)
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| Path::new(m).starts_with(dir))
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_written_on_site_a_reads_back_on_site_b() {
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    bed.place_replicas();
    let _controller_plugin = bed.start_controller().await;
    let mut node_a = bed.start_node(0).await;
    let mut node_b = bed.start_node(1).await;
    let mut controller = Csi::connect(&bed.dir.path().join("controller.sock"))
        .await
        .expect("controller");
    let mut csi_a = Csi::connect(&node_a.socket).await.expect("node a");
    let mut csi_b = Csi::connect(&node_b.socket).await.expect("node b");
    let (name_a, name_b) = (bed.nodes[0].name.clone(), bed.nodes[1].name.clone());

    // Topology: each node reports its own Site.
    let info = csi_a
        .node
        .node_get_info(NodeGetInfoRequest {})
        .await
        .expect("info")
        .into_inner();
    assert_eq!(info.node_id, name_a);
    assert_eq!(
        info.accessible_topology.expect("topology").segments["topology.twinvol.io/site"],
        "room-a"
    );

    // Kubelet's view: the registration socket answers GetInfo.
    let reg_socket = bed.nodes[0]
        .kubelet_dir()
        .join("plugins_registry/csi.twinvol.io-reg.sock");
    let mut reg = RegistrationClient::new(
        common::client::channel(&reg_socket)
            .await
            .expect("registration socket"),
    );
    let plugin_info = reg
        .get_info(InfoRequest {})
        .await
        .expect("GetInfo")
        .into_inner();
    assert_eq!(plugin_info.r#type, "CSIPlugin");
    assert_eq!(plugin_info.name, "csi.twinvol.io");
    assert_eq!(
        plugin_info.endpoint,
        bed.nodes[0].socket().display().to_string()
    );
    assert_eq!(plugin_info.supported_versions, ["1.0.0"]);

    // The heartbeat Lease of each node, as the operator reads it.
    let leases: Api<Lease> = Api::namespaced(bed.client(), NAMESPACE);
    for node in &bed.nodes {
        let lease = wait_for(
            "the node's heartbeat Lease",
            Duration::from_secs(30),
            || async {
                leases
                    .get_opt(&format!("twinvol-node-{}", node.name))
                    .await
                    .map_err(|e| e.to_string())?
                    .ok_or_else(|| "no Lease yet".to_owned())
            },
        )
        .await;
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some(node.name.as_str()));
        // The bed's `--heartbeat-stale-after 4s`.
        assert_eq!(spec.lease_duration_seconds, Some(4));
        assert_eq!(
            lease.metadata.labels.as_ref().expect("labels")["twinvol.io/node"],
            node.name
        );
    }

    // Create through the controller, with WaitForFirstConsumer's topology:
    // the pod's site (A) preferred.
    let mut request = create_request("pvc-two-sites", SIZE, params(&[("failback", "Manual")]));
    request.accessibility_requirements = Some(TopologyRequirement {
        requisite: vec![],
        preferred: vec![Topology {
            segments: [("topology.twinvol.io/site".to_owned(), "room-a".to_owned())].into(),
        }],
    });
    let volume = controller
        .controller
        .create_volume(request.clone())
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("a volume");
    assert_eq!(volume.volume_id, "pvc-two-sites");
    assert_eq!(volume.capacity_bytes, SIZE);
    assert_eq!(
        volume.accessible_topology.len(),
        2,
        "accessible from both sites"
    );
    let again = controller
        .controller
        .create_volume(request)
        .await
        .expect("idempotent")
        .into_inner();
    assert_eq!(again.volume.expect("volume").volume_id, "pvc-two-sites");
    let id = volume.volume_id.clone();

    // Stage and publish on site A.
    let staging_a = bed.nodes[0].root.join("staging");
    let target_a = bed.nodes[0].root.join("pods/p1/mount");
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_a))
        .await
        .expect("ControllerPublish to A");
    csi_a
        .node
        .node_stage_volume(stage_request(&id, &staging_a, rwo()))
        .await
        .expect("NodeStage on A");
    csi_a
        .node
        .node_publish_volume(node_publish_request(&id, &staging_a, &target_a, rwo()))
        .await
        .expect("NodePublish on A");
    write_files(&target_a);

    // kubectl shows the frontend on A with both sites in sync, and each
    // replica's address.
    let mvs: Api<MirroredVolume> = Api::all(bed.client());
    let mv = mvs.get(&id).await.expect("the MirroredVolume");
    let status = mv.status.expect("status");
    assert_eq!(
        status.frontend.as_ref().map(|f| f.node.to_string()),
        Some(name_a.clone())
    );
    assert_eq!(status.in_sync.len(), 2, "{:?}", status.in_sync);
    assert!(
        status.replicas.iter().all(|r| r.address.is_some()),
        "{:?}",
        status.replicas
    );
    let table = bed
        .plane
        .kubectl_ok(&["get", "mv", &id])
        .expect("kubectl get mv");
    assert!(table.contains(&name_a), "{table}");

    let stats = csi_a
        .node
        .node_get_volume_stats(NodeGetVolumeStatsRequest {
            volume_id: id.clone(),
            volume_path: target_a.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("stats")
        .into_inner();
    assert!(
        stats.usage[0].used > 0 && stats.usage[0].total > 0,
        "{stats:?}"
    );
    assert_eq!(stats.volume_condition.map(|c| c.abnormal), Some(false));

    // Unpublish and unstage on A: nothing left behind.
    csi_a
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target_a.display().to_string(),
        })
        .await
        .expect("NodeUnpublish on A");
    assert!(!target_a.exists(), "the target is removed");
    csi_a
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_a.display().to_string(),
        })
        .await
        .expect("NodeUnstage on A");
    assert!(
        mounts_under(&bed.nodes[0].root).is_empty(),
        "{:?}",
        mounts_under(&bed.nodes[0].root)
    );
    assert!(
        loops_over(&bed.nodes[0].root).is_empty(),
        "{:?}",
        loops_over(&bed.nodes[0].root)
    );
    assert!(
        !bed.nodes[0].state_dir().join("volumes").join(&id).exists(),
        "the frontend's state (and process) is gone"
    );
    controller
        .controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: name_a.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish from A");

    // Stage on B: the same files.
    let staging_b = bed.nodes[1].root.join("staging");
    let target_b = bed.nodes[1].root.join("pods/p2/mount");
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_b))
        .await
        .expect("ControllerPublish to B");
    csi_b
        .node
        .node_stage_volume(stage_request(&id, &staging_b, rwo()))
        .await
        .expect("NodeStage on B");
    csi_b
        .node
        .node_publish_volume(node_publish_request(&id, &staging_b, &target_b, rwo()))
        .await
        .expect("NodePublish on B");
    check_files(&target_b);
    let mv = mvs.get(&id).await.expect("the MirroredVolume");
    let status = mv.status.expect("status");
    assert_eq!(
        status.frontend.as_ref().map(|f| f.node.to_string()),
        Some(name_b.clone())
    );

    csi_b
        .node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target_b.display().to_string(),
        })
        .await
        .expect("NodeUnpublish on B");
    csi_b
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging_b.display().to_string(),
        })
        .await
        .expect("NodeUnstage on B");
    controller
        .controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: name_b.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish from B");

    // Delete: the object goes once both node plugins removed their data.
    controller
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    wait_for(
        "the MirroredVolume to be gone",
        Duration::from_secs(60),
        || async {
            match mvs.get_opt(&id).await {
                Ok(None) => Ok(()),
                Ok(Some(mv)) => Err(format!(
                    "still there, finalizers {:?}",
                    mv.metadata.finalizers
                )),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
    for node in &bed.nodes {
        assert!(
            !node.pool().join(&id).exists(),
            "replica data removed on {}",
            node.name
        );
    }
    controller
        .controller
        .delete_volume(DeleteVolumeRequest {
            volume_id: id.clone(),
            ..Default::default()
        })
        .await
        .expect("deleting again is fine");
    assert!(node_a.alive() && node_b.alive(), "node plugins still up");

    // xfs by StorageClass parameter: made on first use, mounted as xfs.
    let xfs = controller
        .controller
        .create_volume(create_request(
            "pvc-xfs",
            320 << 20,
            params(&[("fsType", "xfs")]),
        ))
        .await
        .expect("CreateVolume xfs")
        .into_inner()
        .volume
        .expect("volume");
    assert_eq!(
        xfs.volume_context.get("fsType").map(String::as_str),
        Some("xfs")
    );
    controller
        .controller
        .controller_publish_volume(publish_request(&xfs.volume_id, &name_b))
        .await
        .expect("ControllerPublish xfs");
    let staging_x = bed.nodes[1].root.join("staging-xfs");
    let mut stage = stage_request(
        &xfs.volume_id,
        &staging_x,
        common::client::mount_cap(
            "",
            twinvol_csi_driver::proto::csi::volume_capability::access_mode::Mode::SingleNodeWriter,
        ),
    );
    stage.volume_context = xfs.volume_context.clone();
    csi_b
        .node
        .node_stage_volume(stage)
        .await
        .expect("NodeStage xfs");
    let fs = std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(staging_x.to_str().unwrap_or("")))
        .and_then(|l| {
            l.split(" - ")
                .nth(1)
                .and_then(|r| r.split(' ').next())
                .map(str::to_owned)
        });
    assert_eq!(fs.as_deref(), Some("xfs"), "the staging mount is xfs");
    csi_b
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: xfs.volume_id.clone(),
            staging_target_path: staging_x.display().to_string(),
        })
        .await
        .expect("NodeUnstage xfs");
}
