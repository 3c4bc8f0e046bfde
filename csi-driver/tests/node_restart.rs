//! The data plane outlives the CSI node service.
//!
//! 1. kill -9 of the node service while fio writes with verification
//!    through a staged, mounted volume, the service staying dead for more
//!    than twice the heartbeat's duration (the frontends' liveness): fio
//!    sees no error (the frontend, replica server and heartbeat renewer are
//!    processes of their own), the heartbeat Lease keeps being renewed,
//!    the volume's record is not touched (no fail-over, no renewal write),
//!    and the restarted service re-adopts them (same pids) and unpublishes
//!    and unstages cleanly: no mount, loop device or frontend left.
//! 2. A node restarted from nothing — every process of the node killed,
//!    its mounts and loop devices gone, only its disks (state and pool
//!    directories) left, as after a power cut — stages the volume again
//!    and finds the data written before.
//! 3. A filesystem still mounted in another mount namespace is never torn
//!    down under it: unstage refuses, naming the process, until it is gone.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::client::{
    create_request, node_publish_request, params, publish_request, rwo, stage_request,
};
use common::{Bed, Csi, TestNode, wait_for};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use twinvol_csi_driver::proto::csi::*;

fn pid_in(file: &Path) -> Option<i32> {
    std::fs::read_to_string(file).ok()?.trim().parse().ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn frontend_pid(node: &TestNode, id: &str) -> Option<i32> {
    pid_in(
        &node
            .state_dir()
            .join("volumes")
            .join(id)
            .join("frontend.pid"),
    )
}

fn heartbeat_pid(node: &TestNode) -> Option<i32> {
    pid_in(&node.state_dir().join("heartbeat").join("heartbeat.pid"))
}

fn replica_pid(node: &TestNode, id: &str) -> Option<i32> {
    pid_in(&node.pool().join(id).join("replica.pid"))
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

fn loops_over(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
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
        .map(|l| l.split_whitespace().next().unwrap_or("").to_owned())
        .collect()
}

async fn stage_and_publish(csi: &mut Csi, id: &str, staging: &Path, target: &Path) {
    csi.node
        .node_stage_volume(stage_request(id, staging, rwo()))
        .await
        .expect("NodeStage");
    csi.node
        .node_publish_volume(node_publish_request(id, staging, target, rwo()))
        .await
        .expect("NodePublish");
}

async fn unpublish_and_unstage(csi: &mut Csi, id: &str, staging: &Path, target: &Path) {
    csi.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.into(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublish");
    csi.node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstage");
}

/// fio writing random 4 KiB blocks with direct I/O and verifying them as
/// it goes (`verify_backlog`), failing on the first bad block.
fn start_fio(file: &Path, runtime_s: u32, out: &Path) -> std::process::Child {
    Command::new("fio")
        .args([
            "--name=verify",
            &format!("--filename={}", file.display()),
            "--size=48M",
            "--bs=4k",
            "--rw=randwrite",
            "--ioengine=psync",
            "--direct=1",
            "--verify=crc32c",
            "--verify_backlog=512",
            "--verify_fatal=1",
            // No verify state file in the working directory (the crate).
            "--verify_state_save=0",
            "--time_based",
            &format!("--runtime={runtime_s}"),
            &format!("--output={}", out.display()),
        ])
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("start fio")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_data_plane_outlives_the_node_service() {
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    bed.place_replicas();
    let controller_plugin = bed.start_controller().await;
    let mut node_a = bed.start_node(0).await;
    let _node_b = bed.start_node(1).await;
    let mut controller = Csi::connect(&controller_plugin.socket)
        .await
        .expect("controller");
    let name_a = bed.nodes[0].name.clone();
    let id = controller
        .controller
        .create_volume(create_request("pvc-restart", 128 << 20, params(&[])))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume")
        .volume_id;
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_a))
        .await
        .expect("published to A");
    let staging = bed.nodes[0].root.join("staging");
    let target = bed.nodes[0].root.join("pods/p/mount");
    let mut csi = Csi::connect(&node_a.socket).await.expect("node a");
    stage_and_publish(&mut csi, &id, &staging, &target).await;
    let frontend = frontend_pid(&bed.nodes[0], &id).expect("a frontend pid");
    let replica = replica_pid(&bed.nodes[0], &id).expect("a replica pid");

    // 1. kill -9 of the node service under fio.
    let fio_out = bed.nodes[0].root.join("fio.out");
    let mut fio = start_fio(&target.join("fio.dat"), 14, &fio_out);
    wait_for("fio to be writing", Duration::from_secs(30), || async {
        match std::fs::metadata(target.join("fio.dat")) {
            Ok(m) if m.len() > 0 => Ok(()),
            _ => Err("no data file yet".to_owned()),
        }
    })
    .await;
    // The fault comes a moment into the run, while writes are in flight.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let renewer = heartbeat_pid(&bed.nodes[0]).expect("a heartbeat renewer pid");
    let volumes: kube::Api<twinvol_crds::MirroredVolume> = kube::Api::all(bed.client());
    let leases: kube::Api<k8s_openapi::api::coordination::v1::Lease> =
        kube::Api::namespaced(bed.client(), common::NAMESPACE);
    let lease_name = format!("twinvol-node-{name_a}");
    let rv = |o: Option<String>| o.unwrap_or_default();
    let record_before = volumes.get(&id).await.expect("the volume");
    let beat_before = rv(leases
        .get(&lease_name)
        .await
        .expect("the heartbeat Lease")
        .metadata
        .resource_version);
    node_a.kill9();
    let killed = std::time::Instant::now();
    assert!(alive(frontend), "the frontend survives the node service");
    assert!(
        alive(renewer),
        "the heartbeat renewer survives the node service"
    );
    let status = tokio::task::spawn_blocking(move || fio.wait())
        .await
        .expect("join")
        .expect("fio ran");
    let dead_for = killed.elapsed();
    // The heartbeat's duration here is 4 s (the bed's flags).
    assert!(
        dead_for > Duration::from_secs(8),
        "the node service was dead only {dead_for:?}: not longer than twice the heartbeat's duration"
    );
    let beat_after = rv(leases
        .get(&lease_name)
        .await
        .expect("the heartbeat Lease")
        .metadata
        .resource_version);
    assert_ne!(
        beat_after, beat_before,
        "the heartbeat was not renewed while the node service was dead"
    );
    let record_after = volumes.get(&id).await.expect("the volume");
    let frontend_of = |mv: &twinvol_crds::MirroredVolume| {
        mv.status.as_ref().map(|s| {
            (
                s.epoch.get(),
                format!("{:?}", s.frontend),
                s.in_sync.clone(),
            )
        })
    };
    assert_eq!(
        frontend_of(&record_after),
        frontend_of(&record_before),
        "the volume's record changed while only the node service was down (fail-over or per-volume renewal)"
    );
    assert_eq!(
        record_after.metadata.resource_version, record_before.metadata.resource_version,
        "the volume's status was written in steady state"
    );
    let report = std::fs::read_to_string(&fio_out).unwrap_or_default();
    assert!(
        status.success(),
        "fio failed after the node service died:\n{report}"
    );
    assert!(report.contains("err= 0"), "fio reported errors:\n{report}");
    assert!(
        !report.contains("verify: bad"),
        "fio found a bad block:\n{report}"
    );

    let node_a = bed.start_node(0).await;
    let mut csi = Csi::connect(&node_a.socket).await.expect("node a again");
    assert_eq!(
        frontend_pid(&bed.nodes[0], &id),
        Some(frontend),
        "the frontend is re-adopted"
    );
    assert_eq!(
        heartbeat_pid(&bed.nodes[0]),
        Some(renewer),
        "the heartbeat renewer is re-adopted"
    );
    // The replica supervisor finds its server still running.
    wait_for(
        "the replica server re-adopted",
        Duration::from_secs(30),
        || async {
            let log = common::tail(&node_a.log, 400);
            if log.contains("adopted the running replica server") {
                Ok(())
            } else {
                Err(log)
            }
        },
    )
    .await;
    assert_eq!(
        replica_pid(&bed.nodes[0], &id),
        Some(replica),
        "the replica server is re-adopted"
    );
    // Staging again is a no-op on what runs.
    csi.node
        .node_stage_volume(stage_request(&id, &staging, rwo()))
        .await
        .expect("NodeStage again");
    assert_eq!(frontend_pid(&bed.nodes[0], &id), Some(frontend));
    let checksum_before = sha(&target.join("fio.dat"));
    unpublish_and_unstage(&mut csi, &id, &staging, &target).await;
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
    assert!(!alive(frontend), "unstage stops the frontend");

    // 2. Power cut of node A: everything of it dies, mounts and loops go.
    stage_and_publish(&mut csi, &id, &staging, &target).await;
    assert_eq!(
        sha(&target.join("fio.dat")),
        checksum_before,
        "fio's file survived the restage"
    );
    let marker = target.join("marker");
    std::fs::write(&marker, "durable before the power cut\n").expect("marker");
    std::fs::File::open(&marker)
        .and_then(|f| f.sync_all())
        .expect("fsync");
    let mut node_a = node_a;
    node_a.kill9();
    for pid in [
        frontend_pid(&bed.nodes[0], &id),
        replica_pid(&bed.nodes[0], &id),
        heartbeat_pid(&bed.nodes[0]),
    ]
    .into_iter()
    .flatten()
    {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    for m in [&target, &staging] {
        let _ = Command::new("umount").arg("-l").arg(m).output();
    }
    for dev in loops_over(&bed.nodes[0].root) {
        let _ = Command::new("losetup").args(["-d", &dev]).output();
    }
    let fuse: PathBuf = bed.nodes[0]
        .state_dir()
        .join("volumes")
        .join(&id)
        .join("fuse");
    let _ = Command::new("umount").arg("-l").arg(&fuse).output();

    let node_a = bed.start_node(0).await;
    let mut csi = Csi::connect(&node_a.socket)
        .await
        .expect("node a after the power cut");
    stage_and_publish(&mut csi, &id, &staging, &target).await;
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the marker is back"),
        "durable before the power cut\n"
    );
    assert_eq!(sha(&target.join("fio.dat")), checksum_before);

    // 3. A process that entered a private mount namespace while the volume
    //    was mounted keeps a copy of the mount: unmounting here does not
    //    flush it, so unstaging must refuse (naming it) and keep the
    //    frontend serving it, and succeed once it is gone.
    let mut holder = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sleep", "300"])
        .spawn()
        .expect("unshare");
    let holder_pid = holder.id();
    wait_for(
        "the copy of the mount in the new namespace",
        Duration::from_secs(10),
        || async {
            let text = std::fs::read_to_string(format!("/proc/{holder_pid}/mountinfo"))
                .unwrap_or_default();
            if text.contains(&staging.display().to_string()) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        },
    )
    .await;
    std::fs::write(target.join("late"), "written before the refused unstage\n").expect("late file");
    csi.node
        .node_unpublish_volume(NodeUnpublishVolumeRequest {
            volume_id: id.clone(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublish");
    let refused = csi
        .node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect_err("unstage while another namespace mounts the filesystem");
    assert_eq!(
        refused.code(),
        tonic::Code::FailedPrecondition,
        "{}",
        refused.message()
    );
    assert!(
        refused.message().contains("sleep"),
        "names the holder: {}",
        refused.message()
    );
    let serving = frontend_pid(&bed.nodes[0], &id).expect("the frontend pid");
    assert!(
        alive(serving),
        "the frontend keeps serving the other namespace's copy"
    );
    let _ = holder.kill();
    let _ = holder.wait();
    csi.node
        .node_unstage_volume(NodeUnstageVolumeRequest {
            volume_id: id.clone(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstage once the other namespace is gone");
    assert!(
        mounts_under(&bed.nodes[0].root).is_empty(),
        "{:?}",
        mounts_under(&bed.nodes[0].root)
    );
    assert!(loops_over(&bed.nodes[0].root).is_empty());
    assert!(!alive(serving));
    // Nothing written before was lost: stage once more and read it.
    stage_and_publish(&mut csi, &id, &staging, &target).await;
    assert_eq!(
        std::fs::read_to_string(target.join("late")).expect("the late file"),
        "written before the refused unstage\n"
    );
    assert_eq!(sha(&target.join("fio.dat")), checksum_before);
    unpublish_and_unstage(&mut csi, &id, &staging, &target).await;
    assert!(loops_over(&bed.nodes[0].root).is_empty());
}

/// The SHA-256 of a file (or why it cannot be read).
fn sha(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    if !out.status.success() {
        return format!(
            "unreadable: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned()
}
