//! One test per gRPC code the driver maps its errors to (the one
//! `From<CsiError> for tonic::Status`), each through the real plugin
//! processes on a real API server, checking the code a sidecar or kubelet
//! would see and that the message names what was wrong.
//!
//! The tests of this file run one at a time (each starts its own control
//! plane; several at once would only fight for the machine's two cores).

mod common;

use std::time::{Duration, Instant};

use common::client::{create_request, params, publish_request, rwo, stage_request};
use common::{Bed, Csi};
use tonic::Code;
use twinvol_csi_driver::proto::csi::volume_capability::access_mode::Mode;
use twinvol_csi_driver::proto::csi::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn controller(bed: &Bed) -> (common::Plugin, Csi) {
    let plugin = bed.start_controller().await;
    let csi = Csi::connect(&plugin.socket)
        .await
        .expect("controller socket");
    (plugin, csi)
}

fn code_of<T: std::fmt::Debug>(result: Result<T, tonic::Status>) -> (Code, String) {
    match result {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(s) => (s.code(), s.message().to_owned()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_argument_names_the_bad_parameter() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bed = Bed::start(&[]).await;
    let (_p, mut csi) = controller(&bed).await;
    let cases = [
        (params(&[("sites", "room-a")]), "\"sites\""),
        (
            params(&[("sites", "room-a,room-x")]),
            "room-x does not exist",
        ),
        (params(&[("site", "room-a,room-b")]), "\"site\""),
        (params(&[("failback", "sometimes")]), "\"failback\""),
        (
            params(&[("resyncRateLimit", "fast")]),
            "\"resyncRateLimit\"",
        ),
        (params(&[("fsType", "btrfs")]), "\"fsType\""),
    ];
    for (parameters, named) in cases {
        let (code, message) = code_of(
            csi.controller
                .create_volume(create_request("pvc-bad", 64 << 20, parameters))
                .await,
        );
        assert_eq!(code, Code::InvalidArgument, "{message}");
        assert!(message.contains(named), "{message:?} should name {named}");
    }
    let mut no_name = create_request("", 64 << 20, params(&[]));
    no_name.name.clear();
    let (code, message) = code_of(csi.controller.create_volume(no_name).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("name"), "{message}");
    let mut multi_node = create_request("pvc-multi", 64 << 20, params(&[]));
    multi_node.volume_capabilities = vec![common::client::mount_cap(
        "ext4",
        Mode::MultiNodeMultiWriter,
    )];
    let (code, message) = code_of(csi.controller.create_volume(multi_node).await);
    assert_eq!(code, Code::InvalidArgument);
    assert!(message.contains("MULTI_NODE_MULTI_WRITER"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn already_exists_for_the_same_name_with_another_size() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bed = Bed::start(&[]).await;
    let (_p, mut csi) = controller(&bed).await;
    let first = create_request("pvc-size", 64 << 20, params(&[]));
    csi.controller
        .create_volume(first.clone())
        .await
        .expect("created");
    csi.controller
        .create_volume(first)
        .await
        .expect("the same request again is fine");
    let (code, message) = code_of(
        csi.controller
            .create_volume(create_request("pvc-size", 128 << 20, params(&[])))
            .await,
    );
    assert_eq!(code, Code::AlreadyExists, "{message}");
    assert!(message.contains("size"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn not_found_for_an_unknown_volume_or_node() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bed = Bed::start(&["room-a"]).await;
    let (_p, mut csi) = controller(&bed).await;
    let node = bed.nodes[0].name.clone();
    let (code, message) = code_of(
        csi.controller
            .controller_publish_volume(publish_request("pvc-nowhere", &node))
            .await,
    );
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(message.contains("pvc-nowhere"), "{message}");
    let (code, _) = code_of(
        csi.controller
            .validate_volume_capabilities(ValidateVolumeCapabilitiesRequest {
                volume_id: "pvc-nowhere".into(),
                volume_capabilities: vec![rwo()],
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::NotFound);
    csi.controller
        .create_volume(create_request("pvc-here", 64 << 20, params(&[])))
        .await
        .expect("created");
    let (code, message) = code_of(
        csi.controller
            .controller_publish_volume(publish_request("pvc-here", "no-such-node"))
            .await,
    );
    assert_eq!(code, Code::NotFound, "{message}");
    assert!(message.contains("no-such-node"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_precondition_for_a_second_node_unless_the_first_is_fenced_and_a_published_delete() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bed = Bed::start(&["room-a", "room-b"]).await;
    let (_p, mut csi) = controller(&bed).await;
    let (a, b) = (bed.nodes[0].name.clone(), bed.nodes[1].name.clone());
    csi.controller
        .create_volume(create_request("pvc-one-node", 64 << 20, params(&[])))
        .await
        .expect("created");
    csi.controller
        .controller_publish_volume(publish_request("pvc-one-node", &a))
        .await
        .expect("published to A");
    let (code, message) = code_of(
        csi.controller
            .controller_publish_volume(publish_request("pvc-one-node", &b))
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains(&a), "names the node holding it: {message}");

    // Once A's Site is fenced (by the operator, after its frontends'
    // leases ran out) and B's copy is in sync, B takes the publish over
    // without waiting for A's unpublish; A's late unpublish then leaves
    // B's record alone. B out of sync: still refused.
    let volumes: kube::Api<twinvol_crds::MirroredVolume> = kube::Api::all(bed.client());
    let in_sync =
        |sites: &[&str]| kube::api::Patch::Merge(serde_json::json!({"status": {"inSync": sites}}));
    volumes
        .patch_status(
            "pvc-one-node",
            &kube::api::PatchParams::default(),
            &in_sync(&["room-a"]),
        )
        .await
        .expect("only A in sync");
    let sites: kube::Api<twinvol_crds::Site> = kube::Api::all(bed.client());
    sites
        .patch_status(
            "room-a",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"status": {"fenced": true}})),
        )
        .await
        .expect("Site room-a fenced");
    let (code, message) = code_of(
        csi.controller
            .controller_publish_volume(publish_request("pvc-one-node", &b))
            .await,
    );
    assert_eq!(
        code,
        Code::FailedPrecondition,
        "B is not in sync: no take-over: {message}"
    );
    volumes
        .patch_status(
            "pvc-one-node",
            &kube::api::PatchParams::default(),
            &in_sync(&["room-b"]),
        )
        .await
        .expect("B in sync");
    csi.controller
        .controller_publish_volume(publish_request("pvc-one-node", &b))
        .await
        .expect("published to B, taken over from A of a fenced Site");
    csi.controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: "pvc-one-node".into(),
            node_id: a.clone(),
            ..Default::default()
        })
        .await
        .expect("A's unpublish succeeds");
    let record = volumes
        .get("pvc-one-node")
        .await
        .expect("the volume")
        .metadata
        .annotations
        .unwrap_or_default()
        .get("csi.twinvol.io/published")
        .cloned()
        .unwrap_or_default();
    assert!(
        record.contains(&b) && !record.contains(&a),
        "B's record stands after A's unpublish: {record}"
    );
    let (code, message) = code_of(
        csi.controller
            .delete_volume(DeleteVolumeRequest {
                volume_id: "pvc-one-node".into(),
                ..Default::default()
            })
            .await,
    );
    assert_eq!(code, Code::FailedPrecondition, "{message}");
    assert!(message.contains("unpublish"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn resource_exhausted_when_no_node_of_a_site_has_room() {
    let _serial = ONE_AT_A_TIME.lock().await;
    let bed = Bed::start(&["room-a"]).await;
    let (_p, mut csi) = controller(&bed).await;
    let _node = bed.start_node(0).await;
    let topology = Topology {
        segments: [("topology.twinvol.io/site".to_owned(), "room-a".to_owned())].into(),
    };
    // The node's heartbeat reaches the controller's view of capacity.
    let deadline = Instant::now() + Duration::from_secs(30);
    let free = loop {
        let capacity = csi
            .controller
            .get_capacity(GetCapacityRequest {
                accessible_topology: Some(topology.clone()),
                ..Default::default()
            })
            .await
            .expect("GetCapacity")
            .into_inner();
        if capacity.available_capacity > 0 {
            break capacity.available_capacity;
        }
        assert!(Instant::now() < deadline, "no capacity reported for room-a");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let too_big = free.saturating_mul(2).max(1 << 50);
    let (code, message) = code_of(
        csi.controller
            .create_volume(create_request(
                "pvc-huge",
                too_big,
                params(&[("sites", "room-a,room-b")]),
            ))
            .await,
    );
    assert_eq!(code, Code::ResourceExhausted, "{message}");
    assert!(message.contains("room-a"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aborted_while_another_call_on_the_volume_runs() {
    let _serial = ONE_AT_A_TIME.lock().await;
    // No replica placement: NodeStage waits for it (up to its timeout),
    // holding the volume.
    let bed = Bed::start(&["room-a"]).await;
    let (_p, mut csi) = controller(&bed).await;
    let node_plugin = bed.start_node_with(0, &["--stage-timeout", "20s"]).await;
    let node = bed.nodes[0].name.clone();
    csi.controller
        .create_volume(create_request("pvc-busy", 64 << 20, params(&[])))
        .await
        .expect("created");
    csi.controller
        .controller_publish_volume(publish_request("pvc-busy", &node))
        .await
        .expect("published");
    let staging = bed.nodes[0].root.join("staging");
    let mut first = Csi::connect(&node_plugin.socket)
        .await
        .expect("node socket");
    let mut second = first.clone();
    let request = stage_request("pvc-busy", &staging, rwo());
    let waiting = tokio::spawn({
        let request = request.clone();
        async move { first.node.node_stage_volume(request).await }
    });
    // The volume's state directory appears once the first NodeStage holds
    // the volume and waits.
    let state = bed.nodes[0].state_dir().join("volumes/pvc-busy");
    common::wait_for(
        "the first NodeStage to be waiting",
        Duration::from_secs(15),
        || async {
            if state.is_dir() {
                Ok(())
            } else {
                Err("no state directory yet".to_owned())
            }
        },
    )
    .await;
    let (code, message) = code_of(second.node.node_stage_volume(request).await);
    assert_eq!(code, Code::Aborted);
    assert!(message.contains("in progress"), "{message}");
    let (code, message) = code_of(waiting.await.expect("the first call ends"));
    assert_eq!(
        code,
        Code::Unavailable,
        "no placement within the stage timeout: {message}"
    );
    assert!(message.contains("replica"), "{message}");
}
