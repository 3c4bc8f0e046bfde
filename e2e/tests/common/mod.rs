//! What the chart's end-to-end tests on the cluster bed share: the chart
//! installed with the bed's values (`twinvol_e2e::bed`: the images, the
//! values), `helm`, and waiting for every pod of the release to be Ready
//! and every node plugin registered. The workload and the observer are the
//! library's (`twinvol_e2e::workload`, `twinvol_e2e::observe`).
//!
//! Each test binary uses a part of this; the rest is dead code there.
#![allow(dead_code)]

#[allow(unused_imports)] // not every test binary uses both
pub use twinvol_e2e::{observe, workload};

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

pub use twinvol_e2e::bed::{BINARIES, NAMESPACE, merge, node};
use twinvol_e2e::{Cluster, ClusterOptions, UpstreamBinaries, bed, cluster::Site};

pub const TAG: &str = "chart-test";

pub fn repo() -> PathBuf {
    twinvol_e2e::source_root()
}

/// The directory with our binaries, building them when needed; None when
/// this tree has no source for them.
pub fn binaries() -> Option<PathBuf> {
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

/// Values for the bed: its zones, a pool in each site's node's shared
/// directory, the per-node kubelet roots.
pub fn bed_values(cluster: &Cluster) -> serde_json::Value {
    bed::values(cluster, TAG).expect("the bed's values")
}

/// The cluster bed with the chart installed.
pub struct Bed {
    pub home: tempfile::TempDir,
    pub cluster: Cluster,
    pub installed_at: Instant,
}

impl Bed {
    /// Starts a cluster, builds and imports the images (ours, the sidecars',
    /// the workload's), installs the chart with the bed's values and `extra`
    /// merged in, waits for every pod Ready and both node plugins
    /// registered. None when this tree cannot build our binaries.
    pub async fn install(extra: serde_json::Value) -> Option<Bed> {
        let bin_dir = binaries()?;
        bed::release_binaries(&bin_dir).expect("our release binaries");
        let mut cluster = Cluster::start(ClusterOptions::default())
            .await
            .expect("the cluster bed starts");
        let started = Instant::now();
        bed::add_images(&mut cluster, &bin_dir, TAG).expect("images built and imported");
        eprintln!(
            "images built and imported in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        let home = tempfile::tempdir().expect("helm home");
        let mut values = bed_values(&cluster);
        merge(&mut values, &extra);
        let values_file = home.path().join("values.json");
        std::fs::write(&values_file, values.to_string()).expect("values written");
        let bed = Bed {
            home,
            cluster,
            installed_at: Instant::now(),
        };
        let chart = repo().join("charts/twinvol").display().to_string();
        let values_file = values_file.display().to_string();
        bed.helm(&[
            "install",
            "twinvol",
            &chart,
            "--create-namespace",
            "-f",
            &values_file,
        ]);
        let mut bed = bed;
        bed.installed_at = Instant::now();
        let replicas = |component: &str, default: u64| {
            values[component]["replicas"].as_u64().unwrap_or(default) as usize
        };
        // The operator's and the controller's replicas, a node plugin per site.
        let expected = replicas("operator", 2) + replicas("controller", 2) + 2;
        bed.wait_pods_ready(expected, Duration::from_secs(240))
            .await;
        bed.wait_registered(Duration::from_secs(60)).await;
        Some(bed)
    }

    /// Builds twinvol's image from the same binaries under another tag and
    /// imports it into every node (what a `helm upgrade` to a new image
    /// needs: a changed image reference rolls every component).
    pub fn add_twinvol_image(&mut self, tag: &str) {
        let bin_dir = binaries().expect("our binaries");
        let bins = bed::release_binaries(&bin_dir).expect("our release binaries");
        let refs: Vec<&std::path::Path> = bins.iter().map(PathBuf::as_path).collect();
        let image = twinvol_e2e::cluster::images::twinvol(
            &twinvol_e2e::cluster::images::cache_dir(),
            tag,
            &refs,
        )
        .expect("twinvol image");
        self.cluster.add_image(image).expect("imported");
    }

    pub fn helm(&self, args: &[&str]) -> String {
        let bin = UpstreamBinaries::from_env().get("helm").expect("helm");
        let kubeconfig = self.cluster.kubeconfig().display().to_string();
        let home = self.home.path();
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

    pub fn kubectl(&self, args: &[&str]) -> String {
        self.cluster
            .kubectl_ok(args)
            .unwrap_or_else(|e| e.to_string())
    }

    /// `name ready` for every pod of the release.
    pub fn pod_states(&self) -> Vec<(String, bool)> {
        pod_states(&self.cluster)
    }

    /// Waits until `expected` pods of the release are there, all Ready.
    pub async fn wait_pods_ready(&self, expected: usize, timeout: Duration) {
        let started = Instant::now();
        let deadline = started + timeout;
        let mut states = self.pod_states();
        while !(states.len() == expected && states.iter().all(|(_, r)| *r)) {
            if Instant::now() > deadline {
                panic!(
                    "not every pod Ready after {:?}: {states:?}\n{}",
                    started.elapsed(),
                    self.diagnostics()
                );
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
            states = self.pod_states();
        }
        eprintln!(
            "every pod of the release Ready {:.1} s after helm install: {states:?}",
            self.installed_at.elapsed().as_secs_f64()
        );
    }

    /// Waits until each node's CSINode lists csi.twinvol.io.
    pub async fn wait_registered(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for site in Site::ALL {
            let name = node(site).node_name();
            loop {
                let drivers = self
                    .cluster
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
                if Instant::now() > deadline {
                    panic!(
                        "{name}'s CSINode lists {drivers:?} {timeout:?} after the pods were Ready\n{}",
                        self.diagnostics()
                    );
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        eprintln!(
            "csi.twinvol.io registered on every node {:.1} s after helm install",
            self.installed_at.elapsed().as_secs_f64()
        );
    }

    pub fn diagnostics(&self) -> String {
        diagnostics(&self.cluster)
    }

    /// Waits (up to 60 s) until `collector` has received `at_least`
    /// acknowledged records; panics naming `what` with the diagnostics.
    pub async fn wait_records(&self, collector: &workload::Collector, at_least: usize, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while collector.count() < at_least {
            assert!(
                Instant::now() < deadline,
                "{what}: {} records acknowledged in all, not {at_least} within 60 s\n{}",
                collector.count(),
                self.diagnostics()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Uninstalls the release and tears the cluster down.
    pub fn shutdown(self) {
        self.helm(&["uninstall", "twinvol", "--wait", "--timeout", "60s"]);
        self.cluster.shutdown().expect("cluster torn down");
    }
}

/// `name ready` for every pod of the release.
pub fn pod_states(cluster: &Cluster) -> Vec<(String, bool)> {
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

/// Pods, events, and the logs of the release's pods that are not Ready.
pub fn diagnostics(cluster: &Cluster) -> String {
    let mut text = cluster
        .kubectl_ok(&["get", "pods", "-A", "-o", "wide"])
        .unwrap_or_default();
    text += &cluster
        .kubectl_ok(&["get", "events", "-A", "--sort-by=.lastTimestamp"])
        .unwrap_or_default();
    text += &cluster
        .kubectl_ok(&["get", "mv,pvc,pv,volumeattachments", "-A", "-o", "wide"])
        .unwrap_or_default();
    for (pod, ready) in pod_states(cluster) {
        let tail = if ready { "--tail=15" } else { "--tail=40" };
        text += &format!("\n--- logs of {pod}\n");
        text += &cluster
            .kubectl_ok(&["-n", NAMESPACE, "logs", &pod, "--all-containers", tail])
            .unwrap_or_else(|e| e.to_string());
    }
    text
}
