//! `helm install` of charts/twinvol on the two-site cluster bed
//! (`twinvol_e2e::Cluster`): images built from our binaries and the Go-built
//! CSI sidecars, imported into every node; the chart installed with one Site
//! per site of the bed; then every pod of the release must become Ready — the
//! two operator replicas, the CSI controller with its three sidecars, a node
//! plugin on each site's node — and each node plugin must have registered
//! with its kubelet (the CSINode lists csi.twinvol.io).
//!
//! The binaries come from `TWINVOL_BIN_DIR` (a directory holding
//! `twinvol-csi` and `twinvol-operator`), else
//! `$CARGO_TARGET_DIR/release`, built here with `cargo build --release`
//! when missing (the release profile has its own lock, so this does not
//! wait for the test's own build). A tree without those binaries' sources
//! (the CSI driver's or the operator's `main.rs`) skips the test, saying so.

mod common;

use std::time::{Duration, Instant};

use common::{Bed, NAMESPACE, node};
use twinvol_e2e::cluster::Site;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_on_the_two_site_bed_brings_every_pod_ready() {
    let Some(bed) = Bed::install(serde_json::json!({})).await else {
        return;
    };
    let started = bed.installed_at;
    let cluster = &bed.cluster;
    let states = bed.pod_states();

    // The components talk to the API with their ServiceAccounts: an
    // operator replica holds the leader Lease, each node plugin renews its
    // heartbeat Lease, and the operator counts them into each Site's status.
    let operators: Vec<String> = states
        .iter()
        .map(|(name, _)| name.clone())
        .filter(|n| n.contains("operator"))
        .collect();
    let by = Instant::now() + Duration::from_secs(60);
    let expect = |what: &str, args: &[&str], ok: &dyn Fn(&str) -> bool| {
        let mut last = String::new();
        while Instant::now() < by {
            last = cluster.kubectl_ok(args).unwrap_or_else(|e| e.to_string());
            if ok(&last) {
                return;
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        panic!("{what}: last {last:?}\n{}", bed.diagnostics());
    };
    expect(
        "the leader Lease is held by an operator pod",
        &[
            "-n",
            NAMESPACE,
            "get",
            "lease",
            "twinvol-operator",
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ],
        &|holder| operators.iter().any(|o| o == holder),
    );
    for site in Site::ALL {
        let name = node(site).node_name();
        let lease = format!("twinvol-node-{name}");
        expect(
            "the node plugin's heartbeat Lease",
            &[
                "-n",
                NAMESPACE,
                "get",
                "lease",
                &lease,
                "-o",
                "jsonpath={.spec.holderIdentity}",
            ],
            &|holder| holder == name,
        );
        expect(
            "the Site counts its node plugin, unfenced",
            &[
                "get",
                "site",
                &site.zone(),
                "-o",
                "jsonpath={.status.pluginsHeartbeating} {.status.fenced}",
            ],
            &|status| status == "1 false",
        );
    }
    eprintln!(
        "leader Lease, heartbeat Leases and Site status {:.1} s after helm install",
        started.elapsed().as_secs_f64()
    );

    bed.shutdown();
}
