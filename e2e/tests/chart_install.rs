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

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use twinvol_e2e::{
    Cluster, ClusterOptions, UpstreamBinaries,
    cluster::{NodeId, Site, images, layout},
};

const NAMESPACE: &str = "twinvol-system";
const TAG: &str = "chart-test";
/// The sidecars' versions: the chart's defaults, as in e2e/tools/versions.env.
const SIDECARS: [(&str, &str); 3] = [
    ("csi-provisioner", "v6.4.0"),
    ("csi-attacher", "v4.13.0"),
    ("csi-resizer", "v2.3.0"),
];
const BINARIES: [&str; 2] = ["twinvol-csi", "twinvol-operator"];

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The directory with our binaries, building them when needed; None when
/// this tree has no source for them.
fn binaries() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("TWINVOL_BIN_DIR").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let sources = ["csi-driver/src/main.rs", "operator/src/main.rs"];
    if let Some(missing) = sources.iter().find(|s| !repo().join(s).exists()) {
        eprintln!(
            "SKIPPED: {missing} is not in this tree (no twinvol-csi/twinvol-operator to install)"
        );
        return None;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target"));
    let dir = target.join("release");
    let status = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
        .args([
            "build",
            "--release",
            "--bin",
            BINARIES[0],
            "--bin",
            BINARIES[1],
        ])
        .current_dir(repo())
        .status()
        .expect("cargo runs");
    assert!(
        status.success(),
        "cargo build --release of {BINARIES:?} failed"
    );
    Some(dir)
}

fn node(site: Site) -> NodeId {
    NodeId::new(site, 1).expect("index 1 exists")
}

fn helm(cluster: &Cluster, home: &Path, args: &[&str]) -> String {
    let bin = UpstreamBinaries::from_env().get("helm").expect("helm");
    let kubeconfig = cluster.kubeconfig().display().to_string();
    let output = Command::new(bin)
        .args(args)
        .args(["--kubeconfig", &kubeconfig, "--namespace", NAMESPACE])
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("helm runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "helm {args:?}: {text}");
    text
}

/// Values for the bed: its zones, a pool in each site's node's shared
/// directory, the per-node kubelet roots.
fn bed_values(cluster: &Cluster) -> String {
    let a = node(Site::A);
    let kubelet = cluster.kubelet_dir(a).expect("kubelet dir");
    let per_node = kubelet
        .display()
        .to_string()
        .replace(&a.node_name(), "$(NODE_NAME)");
    let sites: Vec<serde_json::Value> = Site::ALL
        .iter()
        .map(|site| {
            let pool = cluster
                .shared_dir(node(*site))
                .expect("shared dir")
                .join("pool");
            serde_json::json!({
                "name": site.zone(),
                "nodeSelector": {layout::ZONE_LABEL: site.zone()},
                "pool": pool.display().to_string(),
            })
        })
        .collect();
    serde_json::json!({
        "image": {"tag": TAG, "pullPolicy": "Never"},
        "sites": sites,
        "kubeletDir": per_node,
        "operator": {"logFormat": "text"},
        // external-resizer exits at start: it asks the controller plugin for
        // node capabilities, which `twinvol-csi --mode controller` does not
        // serve (Unimplemented), and the driver does not advertise
        // expansion yet.
        "sidecars": {"pullPolicy": "Never", "resizer": {"enabled": false}},
    })
    .to_string()
}

/// The bed's `nodes/` directory bound onto itself as an rshared mount for
/// the test's length: the node plugin mounts it (the directory above every
/// per-node kubelet root) with Bidirectional propagation, which needs a
/// shared mount as its source. Each node's `kubelet/` inside is a shared
/// mount already. Undone on drop, also on panic.
struct SharedNodesDir(PathBuf);

impl SharedNodesDir {
    fn new(dir: PathBuf) -> Self {
        let path = dir.display().to_string();
        for args in [vec!["--rbind", &path, &path], vec!["--make-rshared", &path]] {
            let status = Command::new("mount")
                .args(&args)
                .status()
                .expect("mount runs");
            assert!(status.success(), "mount {args:?} failed");
        }
        Self(dir)
    }
}

impl Drop for SharedNodesDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `component=ready/total` for every pod of the release.
fn pod_states(cluster: &Cluster) -> Vec<(String, bool)> {
    let out = cluster
        .kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}",
        ])
        .unwrap_or_default();
    out.lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(name, ready)| (name.to_owned(), ready == "True"))
        .collect()
}

fn diagnostics(cluster: &Cluster) -> String {
    let mut text = cluster
        .kubectl_ok(&["-n", NAMESPACE, "get", "pods", "-o", "wide"])
        .unwrap_or_default();
    text += &cluster
        .kubectl_ok(&["-n", NAMESPACE, "get", "events", "--sort-by=.lastTimestamp"])
        .unwrap_or_default();
    for (pod, ready) in pod_states(cluster) {
        if !ready {
            text += &format!("\n--- logs of {pod}\n");
            text += &cluster
                .kubectl_ok(&[
                    "-n",
                    NAMESPACE,
                    "logs",
                    &pod,
                    "--all-containers",
                    "--tail=30",
                ])
                .unwrap_or_else(|e| e.to_string());
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn helm_install_on_the_two_site_bed_brings_every_pod_ready() {
    let Some(bin_dir) = binaries() else {
        return;
    };
    let bins: Vec<PathBuf> = BINARIES.iter().map(|b| bin_dir.join(b)).collect();
    for b in &bins {
        assert!(b.is_file(), "{} missing", b.display());
    }
    let mut cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("the cluster bed starts");
    let cache = images::cache_dir();
    let upstream = UpstreamBinaries::from_env();
    let refs: Vec<&Path> = bins.iter().map(PathBuf::as_path).collect();
    let started = Instant::now();
    cluster
        .add_image(images::twinvol(&cache, TAG, &refs).expect("twinvol image"))
        .expect("imported");
    for (binary, version) in SIDECARS {
        let image = images::sidecar(&cache, &upstream, binary, version).expect("sidecar image");
        cluster.add_image(image).expect("imported");
    }
    eprintln!(
        "images built and imported in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let nodes_dir = cluster
        .kubelet_dir(node(Site::A))
        .expect("kubelet dir")
        .parent()
        .and_then(Path::parent)
        .expect("nodes/<node>/kubelet")
        .to_path_buf();
    let shared = SharedNodesDir::new(nodes_dir);

    let home = tempfile::tempdir().expect("helm home");
    let values = home.path().join("values.json");
    std::fs::write(&values, bed_values(&cluster)).expect("values written");
    let chart = repo().join("charts/twinvol").display().to_string();
    let values = values.display().to_string();
    let started = Instant::now();
    helm(
        &cluster,
        home.path(),
        &[
            "install",
            "twinvol",
            &chart,
            "--create-namespace",
            "-f",
            &values,
        ],
    );

    // 2 operator replicas, 1 controller, 1 node plugin per site.
    let expected = 5;
    let deadline = started + Duration::from_secs(240);
    let mut states = pod_states(&cluster);
    while !(states.len() == expected && states.iter().all(|(_, r)| *r)) {
        if Instant::now() > deadline {
            panic!(
                "not every pod Ready after {:?}: {states:?}\n{}",
                started.elapsed(),
                diagnostics(&cluster)
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        states = pod_states(&cluster);
    }
    eprintln!(
        "every pod Ready {:.1} s after helm install: {states:?}",
        started.elapsed().as_secs_f64()
    );

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
        panic!("{what}: last {last:?}\n{}", diagnostics(&cluster));
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

    // Each node plugin registered with its kubelet: kubelet wrote the
    // driver into the node's CSINode.
    let registered_by = Instant::now() + Duration::from_secs(60);
    for site in Site::ALL {
        let name = node(site).node_name();
        loop {
            let drivers = cluster
                .kubectl_ok(&[
                    "get",
                    "csinode",
                    &name,
                    "-o",
                    "jsonpath={.spec.drivers[*].name}",
                ])
                .unwrap_or_default();
            if drivers.contains("csi.twinvol.io") {
                break;
            }
            if Instant::now() > registered_by {
                panic!(
                    "{name}'s CSINode lists {drivers:?} 60 s after the pods were Ready\n{}",
                    diagnostics(&cluster)
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    eprintln!(
        "csi.twinvol.io registered on every node {:.1} s after helm install",
        started.elapsed().as_secs_f64()
    );

    helm(&cluster, home.path(), &["uninstall", "twinvol", "--wait"]);
    drop(shared);
    cluster.shutdown().expect("cluster torn down");
}
