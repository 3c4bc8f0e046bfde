//! Online volume expansion through CSI, on a real API server with node
//! plugins as processes in network namespaces (one replica per site): an
//! xfs volume staged and published on site A, files written,
//! ControllerExpandVolume
//! then NodeExpandVolume while a writer keeps writing and syncing files —
//! `df` shows the new size, the writer saw no error, the files are intact,
//! both replicas' data files have the new size and the same bytes; then
//! unstaged, staged on site B: the files and the new size are there. Also
//! the controller's refusals (shrink, no range, unknown volume), a raw
//! block volume grown with no filesystem step, and an ext4 volume: grown
//! online where the node plugin has CAP_SYS_RESOURCE (the kernel's
//! condition for an online ext4 resize), else refused saying so — this
//! machine's bounding set lacks it, so xfs (CAP_SYS_ADMIN) carries the
//! main case.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::client::{
    block_cap, create_request, mount_cap, node_publish_request, params, publish_request, rwo,
    stage_request,
};
use common::{Bed, Csi};
use tonic::Code;
use twinvol_csi_driver::proto::csi::volume_capability::access_mode::Mode;
use twinvol_csi_driver::proto::csi::*;

const MIB: i64 = 1 << 20;
/// xfs needs 300 MiB at least.
const SIZE: i64 = 320 * MIB;
const GROWN: i64 = 576 * MIB;

/// Whether this process (and so the node plugins it starts) has
/// CAP_SYS_RESOURCE.
fn has_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

fn body(i: usize) -> Vec<u8> {
    (0..64 * 1024).map(|j| ((i * 37 + j) % 251) as u8).collect()
}

fn write_files(dir: &Path, n: usize) {
    for i in 0..n {
        std::fs::write(dir.join(format!("file-{i}")), body(i)).expect("write a file");
    }
    let status = std::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .status();
    assert!(status.is_ok_and(|s| s.success()), "sync");
}

fn check_files(dir: &Path, n: usize) {
    for i in 0..n {
        let got = std::fs::read(dir.join(format!("file-{i}"))).expect("read a file");
        assert!(got == body(i), "file-{i} differs");
    }
}

/// `df -B1 --output=size` of `path`, in bytes.
fn df_size(path: &Path) -> i64 {
    let out = std::process::Command::new("df")
        .args(["-B1", "--output=size"])
        .arg(path)
        .output()
        .expect("df");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df output: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Writes files of 256 KiB into `dir/writer` and fsyncs each, until
/// `stop`; returns how many it wrote, or the first error.
fn writer(dir: PathBuf, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Result<usize, String>> {
    std::thread::spawn(move || {
        use std::io::Write;
        let dir = dir.join("writer");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut n = 0usize;
        while !stop.load(Ordering::SeqCst) {
            let path = dir.join(format!("w-{}", n % 64));
            let data = vec![(n % 251) as u8; 256 * 1024];
            let mut f = std::fs::File::create(&path).map_err(|e| format!("{path:?}: {e}"))?;
            f.write_all(&data).map_err(|e| format!("{path:?}: {e}"))?;
            f.sync_all().map_err(|e| format!("{path:?}: {e}"))?;
            n += 1;
        }
        Ok(n)
    })
}

fn xfs() -> VolumeCapability {
    mount_cap("xfs", Mode::SingleNodeWriter)
}

fn expand_request(id: &str, required: i64, limit: i64) -> ControllerExpandVolumeRequest {
    ControllerExpandVolumeRequest {
        volume_id: id.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: required,
            limit_bytes: limit,
        }),
        ..Default::default()
    }
}

fn node_expand(id: &str, path: &Path, staging: &Path, bytes: i64) -> NodeExpandVolumeRequest {
    NodeExpandVolumeRequest {
        volume_id: id.into(),
        volume_path: path.display().to_string(),
        staging_target_path: staging.display().to_string(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        ..Default::default()
    }
}

fn data_files(bed: &Bed, id: &str) -> [PathBuf; 2] {
    [0, 1].map(|i| bed.nodes[i].pool().join(id).join(id).join("data"))
}

fn assert_replicas_identical(bed: &Bed, id: &str, size: i64) {
    use std::io::Read;
    let [a, b] = data_files(bed, id);
    for p in [&a, &b] {
        let len = std::fs::metadata(p).expect("stat").len() as i64;
        assert_eq!(len, size, "{} has the new size", p.display());
    }
    let (mut x, mut y) = (
        std::fs::File::open(&a).expect("open a"),
        std::fs::File::open(&b).expect("open b"),
    );
    let (mut p, mut q) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    let mut differ = 0usize;
    for _ in 0..size / (4 << 20) {
        x.read_exact(&mut p).expect("read a");
        y.read_exact(&mut q).expect("read b");
        differ += p.iter().zip(&q).filter(|(s, t)| s != t).count();
    }
    assert_eq!(differ, 0, "the replicas differ in {differ} bytes");
}

async fn unstage(csi: &mut Csi, id: &str, staging: &Path, target: &Path) {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_volume_grows_online_on_site_a_and_keeps_its_size_on_site_b() {
    let started = Instant::now();
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    bed.place_replicas();
    let _controller_plugin = bed.start_controller().await;
    let _node_a = bed.start_node(0).await;
    let _node_b = bed.start_node(1).await;
    let mut controller = Csi::connect(&bed.dir.path().join("controller.sock"))
        .await
        .expect("controller");
    let mut csi_a = Csi::connect(&bed.nodes[0].socket()).await.expect("node a");
    let mut csi_b = Csi::connect(&bed.nodes[1].socket()).await.expect("node b");
    let (name_a, name_b) = (bed.nodes[0].name.clone(), bed.nodes[1].name.clone());

    // What the driver advertises.
    let plugin = controller
        .identity
        .get_plugin_capabilities(GetPluginCapabilitiesRequest {})
        .await
        .expect("plugin capabilities")
        .into_inner();
    assert!(
        plugin.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(plugin_capability::Type::VolumeExpansion(v))
                if v.r#type == plugin_capability::volume_expansion::Type::Online as i32
        )),
        "online expansion is advertised: {plugin:?}"
    );

    let volume = controller
        .controller
        .create_volume(create_request(
            "pvc-grow",
            SIZE,
            params(&[("fsType", "xfs")]),
        ))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("a volume");
    let id = volume.volume_id.clone();

    // The controller's refusals.
    let code = |r: Result<tonic::Response<ControllerExpandVolumeResponse>, tonic::Status>| {
        r.err().map(|s| s.code())
    };
    let mut no_range = expand_request(&id, GROWN, 0);
    no_range.capacity_range = None;
    assert_eq!(
        code(
            controller
                .controller
                .controller_expand_volume(no_range)
                .await
        ),
        Some(Code::InvalidArgument)
    );
    assert_eq!(
        code(
            controller
                .controller
                .controller_expand_volume(expand_request("pvc-nobody", GROWN, 0))
                .await
        ),
        Some(Code::NotFound)
    );
    assert_eq!(
        code(
            controller
                .controller
                .controller_expand_volume(expand_request(&id, 64 * MIB, 64 * MIB))
                .await
        ),
        Some(Code::OutOfRange),
        "a shrink is out of range"
    );
    assert_eq!(
        code(
            controller
                .controller
                .controller_expand_volume(expand_request(&id, GROWN, GROWN - MIB))
                .await
        ),
        Some(Code::OutOfRange),
        "required above limit"
    );

    // Stage and publish on site A, write.
    let staging_a = bed.nodes[0].root.join("staging");
    let target_a = bed.nodes[0].root.join("pods/p1/mount");
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_a))
        .await
        .expect("ControllerPublish to A");
    csi_a
        .node
        .node_stage_volume(stage_request(&id, &staging_a, xfs()))
        .await
        .expect("NodeStage on A");
    csi_a
        .node
        .node_publish_volume(node_publish_request(&id, &staging_a, &target_a, xfs()))
        .await
        .expect("NodePublish on A");
    write_files(&target_a, 20);
    let before = df_size(&target_a);
    assert!(before < SIZE, "df before: {before}");

    // Grow while a writer runs.
    let stop = Arc::new(AtomicBool::new(false));
    let job = writer(target_a.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let grown = controller
        .controller
        .controller_expand_volume(expand_request(&id, GROWN, 0))
        .await
        .expect("ControllerExpand")
        .into_inner();
    assert_eq!(grown.capacity_bytes, GROWN);
    assert!(grown.node_expansion_required);
    let again = controller
        .controller
        .controller_expand_volume(expand_request(&id, GROWN, 0))
        .await
        .expect("ControllerExpand again (idempotent)")
        .into_inner();
    assert_eq!(again.capacity_bytes, GROWN);
    let smaller = controller
        .controller
        .controller_expand_volume(expand_request(&id, SIZE, 0))
        .await
        .expect("a range the volume already satisfies")
        .into_inner();
    assert_eq!(smaller.capacity_bytes, GROWN, "never shrinks");
    let node_started = Instant::now();
    let answer = csi_a
        .node
        .node_expand_volume(node_expand(&id, &target_a, &staging_a, GROWN))
        .await
        .expect("NodeExpand on A")
        .into_inner();
    let node_took = node_started.elapsed();
    assert_eq!(answer.capacity_bytes, GROWN);
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let wrote = job.join().expect("writer thread");
    let wrote = wrote.unwrap_or_else(|e| panic!("the writer failed during the expansion: {e}"));
    let after = df_size(&target_a);
    eprintln!(
        "df: {before} → {after} bytes; NodeExpand took {node_took:?}; the writer wrote {wrote} files meanwhile"
    );
    assert!(
        after - before >= (GROWN - SIZE) * 9 / 10 && after <= GROWN,
        "df shows the new size: {before} → {after}"
    );
    check_files(&target_a, 20);
    // The space past the old end is usable.
    let big = vec![0x5au8; 100 << 20];
    std::fs::write(target_a.join("big"), &big)
        .expect("a file larger than the old volume's free space");
    let status = std::process::Command::new("sync")
        .arg("-f")
        .arg(&target_a)
        .status();
    assert!(status.is_ok_and(|s| s.success()));
    let again = csi_a
        .node
        .node_expand_volume(node_expand(&id, &target_a, &staging_a, GROWN))
        .await
        .expect("NodeExpand again (idempotent)")
        .into_inner();
    assert_eq!(again.capacity_bytes, GROWN);

    // Unstage on A (the frontend's final flush reaches both): identical.
    unstage(&mut csi_a, &id, &staging_a, &target_a).await;
    assert_replicas_identical(&bed, &id, GROWN);
    controller
        .controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: name_a.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish from A");

    // Site B: the files and the new size.
    let staging_b = bed.nodes[1].root.join("staging");
    let target_b = bed.nodes[1].root.join("pods/p2/mount");
    controller
        .controller
        .controller_publish_volume(publish_request(&id, &name_b))
        .await
        .expect("ControllerPublish to B");
    csi_b
        .node
        .node_stage_volume(stage_request(&id, &staging_b, xfs()))
        .await
        .expect("NodeStage on B");
    csi_b
        .node
        .node_publish_volume(node_publish_request(&id, &staging_b, &target_b, xfs()))
        .await
        .expect("NodePublish on B");
    check_files(&target_b, 20);
    assert!(std::fs::read(target_b.join("big")).expect("big") == big);
    assert_eq!(
        df_size(&target_b),
        after,
        "df on B shows the grown filesystem"
    );
    unstage(&mut csi_b, &id, &staging_b, &target_b).await;
    controller
        .controller
        .controller_unpublish_volume(ControllerUnpublishVolumeRequest {
            volume_id: id.clone(),
            node_id: name_b.clone(),
            ..Default::default()
        })
        .await
        .expect("ControllerUnpublish from B");

    // A raw block volume: the device grows, no filesystem step.
    let block = controller
        .controller
        .create_volume(CreateVolumeRequest {
            volume_capabilities: vec![block_cap(Mode::SingleNodeWriter)],
            ..create_request("pvc-grow-block", 32 * MIB, params(&[]))
        })
        .await
        .expect("CreateVolume block")
        .into_inner()
        .volume
        .expect("volume");
    let bid = block.volume_id.clone();
    let mut publish = publish_request(&bid, &name_b);
    publish.volume_capability = Some(block_cap(Mode::SingleNodeWriter));
    controller
        .controller
        .controller_publish_volume(publish)
        .await
        .expect("ControllerPublish block");
    let staging_k = bed.nodes[1].root.join("staging-block");
    let target_k = bed.nodes[1].root.join("pods/p3/dev");
    csi_b
        .node
        .node_stage_volume(stage_request(
            &bid,
            &staging_k,
            block_cap(Mode::SingleNodeWriter),
        ))
        .await
        .expect("NodeStage block");
    csi_b
        .node
        .node_publish_volume(node_publish_request(
            &bid,
            &staging_k,
            &target_k,
            block_cap(Mode::SingleNodeWriter),
        ))
        .await
        .expect("NodePublish block");
    controller
        .controller
        .controller_expand_volume(expand_request(&bid, 96 * MIB, 0))
        .await
        .expect("ControllerExpand block");
    let answer = csi_b
        .node
        .node_expand_volume(node_expand(&bid, &target_k, &staging_k, 96 * MIB))
        .await
        .expect("NodeExpand block")
        .into_inner();
    assert_eq!(answer.capacity_bytes, 96 * MIB);
    let out = std::process::Command::new("blockdev")
        .args(["--getsize64"])
        .arg(&target_k)
        .output()
        .expect("blockdev");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (96 * MIB).to_string(),
        "the published device has the new size"
    );
    unstage(&mut csi_b, &bid, &staging_k, &target_k).await;

    // ext4, online: resize2fs needs CAP_SYS_RESOURCE.
    let e4 = controller
        .controller
        .create_volume(create_request("pvc-grow-ext4", 64 * MIB, params(&[])))
        .await
        .expect("CreateVolume ext4")
        .into_inner()
        .volume
        .expect("volume");
    let eid = e4.volume_id.clone();
    controller
        .controller
        .controller_publish_volume(publish_request(&eid, &name_b))
        .await
        .expect("ControllerPublish ext4");
    let staging_e = bed.nodes[1].root.join("staging-ext4");
    let target_e = bed.nodes[1].root.join("pods/p4/mount");
    csi_b
        .node
        .node_stage_volume(stage_request(&eid, &staging_e, rwo()))
        .await
        .expect("NodeStage ext4");
    csi_b
        .node
        .node_publish_volume(node_publish_request(&eid, &staging_e, &target_e, rwo()))
        .await
        .expect("NodePublish ext4");
    write_files(&target_e, 5);
    controller
        .controller
        .controller_expand_volume(expand_request(&eid, 128 * MIB, 0))
        .await
        .expect("ControllerExpand ext4");
    let r = csi_b
        .node
        .node_expand_volume(node_expand(&eid, &target_e, &staging_e, 128 * MIB))
        .await;
    if has_sys_resource() {
        r.expect("NodeExpand ext4");
        assert!(df_size(&target_e) > 100 * MIB, "ext4 grown online");
    } else {
        let status = r.expect_err("online ext4 growth cannot work without CAP_SYS_RESOURCE");
        assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
        assert!(status.message().contains("CAP_SYS_RESOURCE"), "{status:?}");
        eprintln!("ext4: {}", status.message());
    }
    check_files(&target_e, 5);
    unstage(&mut csi_b, &eid, &staging_e, &target_e).await;
    eprintln!("expansion test: {:?}", started.elapsed());
}
