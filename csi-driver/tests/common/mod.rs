//! A test bed for the CSI driver: a real control plane (etcd +
//! kube-apiserver from the e2e harness) with twinvol's CRDs, two Sites
//! (`room-a`, `room-b`), Node objects labelled with their zone, and node
//! plugins as separate host processes, each in a network namespace of its
//! own (entered with `nsenter --net`, so their mounts are the host's), plus
//! the controller plugin on the host.
//!
//! Until the operator exists, [`Bed::place_replicas`] plays its placement
//! part: it writes `status.replicas[].node` (one replica per Site, on the
//! test's node of that Site) for every new MirroredVolume.
//!
//! `Drop` leaves nothing behind even when a test panics: mounts under the
//! bed's directory, loop devices over its files, every data-plane process
//! (frontends and replica servers outlive the plugins by design, so they
//! are found through their pid files), the plugins, the namespaces.

#![allow(dead_code)]

pub mod client;
pub mod net;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tempfile::TempDir;
use twinvol_crds::MirroredVolume;
use twinvol_e2e::{ControlPlane, ControlPlaneOptions};

pub use client::Csi;
pub use net::NodeNet;

pub const SITES: [&str; 2] = ["room-a", "room-b"];
pub const NAMESPACE: &str = "twinvol-system";
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const START: Duration = Duration::from_secs(120);

/// The program under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinvol-csi"))
}

/// One node of the bed.
pub struct TestNode {
    pub name: String,
    pub site: String,
    pub net: NodeNet,
    /// Its view of the API server (through the forwarder).
    pub kubeconfig: PathBuf,
    /// `--host-root`, `--state-dir`, `--kubelet-dir` live under here.
    pub root: PathBuf,
}

impl TestNode {
    pub fn state_dir(&self) -> PathBuf {
        self.root.join("state")
    }
    pub fn host_root(&self) -> PathBuf {
        self.root.join("host")
    }
    pub fn kubelet_dir(&self) -> PathBuf {
        self.root.join("kubelet")
    }
    pub fn pool(&self) -> PathBuf {
        self.host_root().join("pool")
    }
    pub fn socket(&self) -> PathBuf {
        self.root.join("csi.sock")
    }
}

/// A running plugin process.
pub struct Plugin {
    child: Child,
    pub log: PathBuf,
    pub socket: PathBuf,
}

impl Plugin {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        self.kill9();
    }
}

pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(b) => {
            let text = String::from_utf8_lossy(&b);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// The bed.
pub struct Bed {
    // Drop order matters: `Drop::drop` cleans the data plane first.
    pub nodes: Vec<TestNode>,
    pub plane: ControlPlane,
    pub dir: TempDir,
    pub secret: PathBuf,
    /// The node plugins' heartbeat flags (empty: the binary's defaults).
    pub heartbeat_flags: Vec<String>,
    placement: Option<tokio::task::JoinHandle<()>>,
}

impl Bed {
    /// A control plane with the CRDs, the namespace, both Sites, and one
    /// node per entry of `sites` (node `node-<i>-<site>`).
    pub async fn start(sites: &[&str]) -> Bed {
        let plane = ControlPlane::start(ControlPlaneOptions {
            start_timeout: START,
            ..ControlPlaneOptions::api_server_only()
        })
        .await
        .expect("control plane starts");
        plane
            .install_twinvol_crds(START)
            .await
            .expect("CRDs installed");
        let dir = tempfile::Builder::new()
            .prefix("twinvol-csi-test-")
            .tempdir()
            .expect("temp dir");
        // Like kubelet's root directory: a shared mount, so that a process
        // entering a new mount namespace (`ip netns exec`, a container)
        // while a volume is mounted gets a slave copy, which unmounting
        // here unmounts too.
        let root = dir.path().display().to_string();
        for args in [
            vec!["--bind", root.as_str(), root.as_str()],
            vec!["--make-rshared", root.as_str()],
        ] {
            let out = Command::new("mount").args(&args).output().expect("mount");
            assert!(
                out.status.success(),
                "mount {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "a-test-secret-of-32-bytes-length").expect("secret");
        let mut manifests =
            format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {NAMESPACE}\n");
        for site in SITES {
            manifests.push_str(&format!(
                "---\napiVersion: twinvol.io/v1alpha1\nkind: Site\nmetadata:\n  name: {site}\nspec:\n  nodeSelector:\n    matchLabels:\n      {ZONE_LABEL}: {site}\n  pool: /pool\n"
            ));
        }
        let tag = net::random_tag();
        let api_addr: SocketAddr = plane
            .apiserver_url()
            .trim_start_matches("https://")
            .parse()
            .expect("the API server listens on an address");
        let mut nodes = vec![];
        for (i, site) in sites.iter().enumerate() {
            let name = format!("node-{i}-{site}");
            manifests.push_str(&format!(
                "---\napiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\n  labels:\n    {ZONE_LABEL}: {site}\n    kubernetes.io/hostname: {name}\n"
            ));
            let net = NodeNet::create(&tag, u8::try_from(i).expect("few nodes"));
            let forward = net.forward_to(api_addr).await;
            let root = dir.path().join(&name);
            std::fs::create_dir_all(&root).expect("node dir");
            let kubeconfig = root.join("kubeconfig");
            write_node_kubeconfig(&plane, &kubeconfig, forward);
            nodes.push(TestNode {
                name,
                site: (*site).to_owned(),
                net,
                kubeconfig,
                root,
            });
        }
        plane
            .kubectl_ok_with_stdin(&["apply", "-f", "-"], &manifests)
            .expect("namespace, Sites and Nodes applied");
        Bed {
            nodes,
            plane,
            dir,
            secret,
            // Short, as in production: the frontends' liveness is this
            // heartbeat (renewed by a process that outlives the plugin).
            heartbeat_flags: ["--heartbeat-period", "1s", "--heartbeat-stale-after", "4s"]
                .map(str::to_owned)
                .to_vec(),
            placement: None,
        }
    }

    pub fn client(&self) -> kube::Client {
        self.plane.client()
    }

    /// Starts the controller plugin on the host.
    pub async fn start_controller(&self) -> Plugin {
        let socket = self.dir.path().join("controller.sock");
        let log = self.dir.path().join("controller.log");
        let mut command = Command::new(binary());
        command
            .args(["--mode", "controller", "--endpoint"])
            .arg(format!("unix://{}", socket.display()))
            .arg("--kubeconfig")
            .arg(self.plane.kubeconfig())
            .args(["--namespace", NAMESPACE]);
        let plugin = spawn(command, &log, socket);
        wait_probe(&plugin).await;
        plugin
    }

    /// Starts node `i`'s plugin inside its namespace.
    pub async fn start_node(&self, i: usize) -> Plugin {
        self.start_node_with(i, &[]).await
    }

    pub async fn start_node_with(&self, i: usize, extra: &[&str]) -> Plugin {
        let node = &self.nodes[i];
        let log = node.root.join(format!("node-plugin-{}.log", now_ms()));
        let mut command = Command::new("nsenter");
        command
            .arg(format!("--net={}", node.net.netns_path()))
            .arg(binary())
            .args(["--mode", "node", "--endpoint"])
            .arg(format!("unix://{}", node.socket().display()))
            .arg("--kubeconfig")
            .arg(&node.kubeconfig)
            .args(["--namespace", NAMESPACE, "--node-name", &node.name])
            .args(["--node-ip", &node.net.ns_ip])
            .arg("--state-dir")
            .arg(node.state_dir())
            .arg("--host-root")
            .arg(node.host_root())
            .arg("--kubelet-dir")
            .arg(node.kubelet_dir())
            .arg("--secret-file")
            .arg(&self.secret)
            .args(&self.heartbeat_flags)
            .args(["--health-listen", &format!("{}:0", node.net.ns_ip)])
            .args(extra);
        let plugin = spawn(command, &log, node.socket());
        wait_probe(&plugin).await;
        plugin
    }

    /// Places every MirroredVolume's replicas on the bed's node of each
    /// Site (the operator's job), until the bed is dropped.
    pub fn place_replicas(&mut self) {
        let by_site: BTreeMap<String, String> = self
            .nodes
            .iter()
            .map(|n| (n.site.clone(), n.name.clone()))
            .collect();
        let api: Api<MirroredVolume> = Api::all(self.client());
        self.placement = Some(tokio::spawn(async move {
            let mut stream = watcher::watcher(api.clone(), watcher::Config::default()).boxed();
            while let Some(event) = stream.next().await {
                let mv = match event {
                    Ok(Event::Apply(mv) | Event::InitApply(mv)) => mv,
                    Ok(_) => continue,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let placed = mv
                    .status
                    .as_ref()
                    .is_some_and(|s| s.replicas.iter().any(|r| r.node.is_some()));
                if placed || mv.metadata.deletion_timestamp.is_some() {
                    continue;
                }
                let replicas: Vec<serde_json::Value> = mv
                    .spec
                    .sites
                    .iter()
                    .filter_map(|s| {
                        let node = by_site.get(s.as_str())?;
                        Some(serde_json::json!({"site": s, "node": node, "state": "InSync"}))
                    })
                    .collect();
                let patch = serde_json::json!({
                    "apiVersion": "twinvol.io/v1alpha1",
                    "kind": "MirroredVolume",
                    "metadata": {"name": mv.name_any()},
                    "status": {"replicas": replicas},
                });
                // Retried: no further event may come for this volume if
                // one attempt fails (a slow API server under load). In a
                // task of its own, so that the retries of one volume never
                // hold up the placement of the next (csi-sanity creates
                // and deletes volumes back to back), and not retried once
                // the volume is gone: retrying deleted volumes for 10 s
                // each once left later volumes unplaced for 90 s.
                let api = api.clone();
                tokio::spawn(async move {
                    let name = mv.name_any();
                    for attempt in 1..=50 {
                        match api
                            .patch_status(
                                &name,
                                &PatchParams::apply("test-placement").force(),
                                &Patch::Apply(&patch),
                            )
                            .await
                        {
                            Ok(_) => break,
                            Err(kube::Error::Api(s)) if s.code == 404 => break,
                            Err(e) => {
                                eprintln!(
                                    "placing the replicas of {name} (attempt {attempt}): {e}"
                                );
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    }
                });
            }
        }));
    }

    /// Removes everything the data plane left (see the module doc).
    pub fn clean_data_plane(&self) {
        let root = self.dir.path();
        // Mounts under the bed, deepest first (publish targets, staging).
        let mut mounted: Vec<PathBuf> = std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
            .filter(|p| p.starts_with(root) && p != root)
            .collect();
        mounted.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for m in mounted.iter().filter(|p| !p.ends_with("fuse")) {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
        // Loop devices over the bed's FUSE files.
        if let Ok(out) = Command::new("losetup")
            .args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"])
            .output()
        {
            for line in String::from_utf8_lossy(&out.stdout).lines() {
                let mut parts = line.split_whitespace();
                if let (Some(dev), Some(back)) = (parts.next(), parts.next())
                    && Path::new(back).starts_with(root)
                {
                    let _ = Command::new("losetup").args(["-d", dev]).output();
                }
            }
        }
        // Data-plane processes, by their pid files.
        for pid_file in find_files(root, |p| p.extension().is_some_and(|e| e == "pid")) {
            if let Ok(pid) = std::fs::read_to_string(&pid_file)
                .unwrap_or_default()
                .trim()
                .parse::<i32>()
            {
                let spec = pid_file.with_extension("json");
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let ours = cmdline
                    .split(|b| *b == 0)
                    .any(|a| a == spec.as_os_str().as_encoded_bytes());
                if ours {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        // And any process of ours the pid files missed (one started in the
        // moment its plugin was killed): its command line names the bed.
        let needle = root.as_os_str().as_encoded_bytes();
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for entry in procs.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|p| p.parse::<i32>().ok())
                else {
                    continue;
                };
                let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                if pid != std::process::id() as i32
                    && cmdline
                        .split(|b| *b == 0)
                        .any(|a| a.windows(needle.len()).any(|w| w == needle))
                {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
        }
        for m in mounted.iter().filter(|p| p.ends_with("fuse")) {
            let _ = Command::new("umount").arg("-l").arg(m).output();
        }
    }

    pub fn log_tails(&self) -> String {
        let mut out = String::new();
        for log in find_files(self.dir.path(), |p| {
            p.extension().is_some_and(|e| e == "log")
        }) {
            // The plugins' own logs in full depth (what a node's replica
            // supervisor did for the minute before a failure); the
            // data-plane processes' short.
            let plugin = log
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("node-plugin") || n == "controller.log");
            out.push_str(&format!(
                "----- {} -----\n{}\n",
                log.display(),
                tail(&log, if plugin { 400 } else { 25 })
            ));
        }
        out
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        if let Some(p) = self.placement.take() {
            p.abort();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.log_tails());
        }
        self.clean_data_plane();
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
        if std::env::var_os("TWINVOL_E2E_KEEP").is_some_and(|v| v == "1") {
            eprintln!("keeping {}", self.dir.path().display());
            self.dir.disable_cleanup(true);
        }
    }
}

fn find_files(root: &Path, want: impl Fn(&Path) -> bool + Copy) -> Vec<PathBuf> {
    let mut out = vec![];
    let Ok(entries) = std::fs::read_dir(root) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            // Never descend into mounts (a dead FUSE mount hangs a walk).
            if is_mount_point(&path) {
                continue;
            }
            out.extend(find_files(&path, want));
        } else if want(&path) {
            out.push(path);
        }
    }
    out
}

fn is_mount_point(path: &Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| Path::new(m) == path)
}

fn spawn(mut command: Command, log: &Path, socket: PathBuf) -> Plugin {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("dup");
    let child = command
        .env("RUST_LOG", "info,twinvol_csi_driver=debug")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("start the plugin");
    Plugin {
        child,
        log: log.to_owned(),
        socket,
    }
}

/// Waits until the plugin's Probe says ready.
async fn wait_probe(plugin: &Plugin) {
    let deadline = Instant::now() + START;
    loop {
        if let Ok(mut csi) = Csi::connect(&plugin.socket).await
            && csi.probe().await.unwrap_or(false)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the plugin never became ready; its log:\n{}",
            plugin.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A kubeconfig reaching the API server through a node's forwarder; the
/// server's certificate is for 127.0.0.1/localhost, hence the server name.
fn write_node_kubeconfig(plane: &ControlPlane, path: &Path, server: SocketAddr) {
    let pki = plane.pki();
    let q = |p: &Path| serde_json::Value::String(p.display().to_string()).to_string();
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{server}\n    tls-server-name: localhost\n    certificate-authority: {ca}\nusers:\n- name: admin\n  user:\n    client-certificate: {cert}\n    client-key: {key}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: admin\ncurrent-context: c\n",
        ca = q(&pki.ca_files.cert),
        cert = q(&pki.admin.cert),
        key = q(&pki.admin.key),
    );
    std::fs::write(path, text).expect("node kubeconfig");
}

/// Polls `check` until it returns `Some`, failing with `what` after
/// `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) => assert!(
                Instant::now() < deadline,
                "{what} did not happen within {timeout:?}; last: {last}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
