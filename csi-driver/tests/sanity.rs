//! csi-sanity (kubernetes-csi/csi-test, built by e2e/tools/build-upstream.sh)
//! against the controller plugin and a node plugin, on a real API server,
//! with real staging: frontends, loop devices over their FUSE files, ext4
//! made and mounted, bind mounts — for the mount and the block access type.
//! Zero failures; the skipped specs (capabilities not advertised) are
//! printed, and every one must be in the expected list, so that a spec
//! newly skipped for another reason fails the test.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{Bed, wait_for};
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;

/// Specs csi-sanity skips, each for a reason that is not a failure:
/// capabilities the driver does not advertise (snapshots, group snapshots,
/// clones, modify/volume attribute classes, ControllerGetVolume,
/// an attach limit per node), RPCs newer than the CSI spec v1.12 the
/// driver is built on (the volume/storage health calls of v1.13), and the
/// pagination spec csi-sanity itself disables (`XIt`).
const EXPECTED_SKIPS: [&str; 11] = [
    "napshot",
    "GroupController",
    "source volume",
    "ModifyVolume",
    "volume attribute class",
    "ControllerGetVolume",
    "attach limit",
    "VolumeHealth",
    "StorageHealth",
    "ListVolumeHealth",
    "pagination should detect volumes added between pages",
];

fn sanity_binary() -> std::path::PathBuf {
    twinvol_e2e::UpstreamBinaries::from_env()
        .get("csi-sanity")
        .expect("csi-sanity is built by e2e/tools/build-upstream.sh")
}

/// The names of the skipped specs in a JUnit report.
fn skipped(junit: &str) -> Vec<String> {
    let mut out = vec![];
    for case in junit.split("<testcase ").skip(1) {
        let body = case.split("</testcase>").next().unwrap_or("");
        if body.contains("<skipped") {
            let name = case
                .split("name=\"")
                .nth(1)
                .and_then(|s| s.split('"').next())
                .unwrap_or("?");
            out.push(name.replace("&#39;", "'").replace("&quot;", "\""));
        }
    }
    out
}

fn run_sanity(bed: &Bed, access: &str) {
    let node = &bed.nodes[0];
    let work = node.root.join(format!("sanity-{access}"));
    std::fs::create_dir_all(&work).expect("sanity dir");
    let junit = work.join("junit.xml");
    let mut command = Command::new(sanity_binary());
    // TWINVOL_SANITY_FOCUS=regexp runs only the matching specs (debugging).
    if let Ok(focus) = std::env::var("TWINVOL_SANITY_FOCUS") {
        command.arg(format!("--ginkgo.focus={focus}"));
    }
    let out = command
        .arg(format!("--csi.endpoint=unix://{}", node.socket().display()))
        .arg(format!(
            "--csi.controllerendpoint=unix://{}",
            bed.dir.path().join("controller.sock").display()
        ))
        .arg(format!("--csi.mountdir={}", work.join("mnt").display()))
        .arg(format!(
            "--csi.stagingdir={}",
            work.join("staging").display()
        ))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!("--csi.testvolumeaccesstype={access}"))
        .arg(format!("--ginkgo.junit-report={}", junit.display()))
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.timeout=30m")
        .output()
        .expect("run csi-sanity");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = stdout
        .lines()
        .filter(|l| l.contains("Passed") || l.starts_with("Ran ") || l.contains("FAIL"))
        .collect();
    eprintln!("csi-sanity ({access}): {}", summary.join(" / "));
    let report = std::fs::read_to_string(&junit).unwrap_or_default();
    let skips = skipped(&report);
    eprintln!("csi-sanity ({access}) skipped {} specs:", skips.len());
    for s in &skips {
        eprintln!("  skip: {s}");
    }
    assert!(
        out.status.success(),
        "csi-sanity ({access}) failed:\n{}\n{}",
        &stdout[stdout.len().saturating_sub(20_000)..],
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("0 Failed"),
        "no failure summary in csi-sanity's output"
    );
    if std::env::var_os("TWINVOL_SANITY_FOCUS").is_some() {
        return;
    }
    let unexpected: Vec<&String> = skips
        .iter()
        .filter(|s| !EXPECTED_SKIPS.iter().any(|w| s.contains(w)))
        .collect();
    assert!(
        unexpected.is_empty(),
        "specs skipped for no advertised reason: {unexpected:#?}"
    );
    let leftover = mounts_under(&work);
    assert!(
        leftover.is_empty(),
        "csi-sanity ({access}) left mounts: {leftover:?}"
    );
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
async fn csi_sanity_passes_for_mount_and_block_volumes() {
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    bed.place_replicas();
    let _controller = bed.start_controller().await;
    let _node_a = bed.start_node(0).await;
    let _node_b = bed.start_node(1).await;
    // Both nodes' heartbeats carry their pool space (GetCapacity).
    let leases: Api<Lease> = Api::namespaced(bed.client(), common::NAMESPACE);
    for node in &bed.nodes {
        let name = format!("twinvol-node-{}", node.name);
        wait_for("a heartbeat Lease", Duration::from_secs(30), || async {
            match leases.get_opt(&name).await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!("no Lease {name}")),
                Err(e) => Err(e.to_string()),
            }
        })
        .await;
    }
    let bed_ref = &bed;
    tokio::task::block_in_place(|| {
        run_sanity(bed_ref, "mount");
        run_sanity(bed_ref, "block");
    });
}
