//! A real stretched Kubernetes cluster on this one machine: two sites of
//! real kubelets (each node in its own network namespace, with its own
//! containerd and kube-proxy), the control plane on the host as the third
//! location, and the faults of a site as calls: kill a node, power a site
//! off and on, cut the inter-site link, cut a site off the control plane.
//!
//! [`Cluster::start`] takes a free slot (see [`layout`]), sweeps whatever a
//! crashed run left in it, lays out the network ([`net`]), starts the
//! control plane, builds and imports the images ([`images`]), boots every
//! node ([`node`]) and returns once all of them are Ready with their zone
//! labels. Dropping it kills everything and sweeps the slot ([`sweep`]),
//! also while a test panics (printing the logs' tails first).

pub mod cgroup;
pub mod cli;
pub mod cli_bed;
pub mod cmd;
pub mod images;
pub mod layout;
pub mod net;
pub mod node;
pub mod slot;
pub mod sweep;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Node as KubeNode;
use kube::{Api, Client, api::ListParams};

pub use layout::{NodeId, Site, Slot};
pub use net::Link;

use crate::{
    ControlPlane, ControlPlaneOptions, HarnessError, UpstreamBinaries,
    control_plane::write_kubeconfig, pki::CertFiles,
};
use images::BuiltImage;
use node::{Node, NodeBinaries, NodeConfig};
use slot::SlotLock;
use sweep::KeepFiles;

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub upstream: UpstreamBinaries,
    /// Nodes in each site (1 in the test command; 2 on request).
    pub nodes_per_site: u8,
    /// Deadline for the control plane, each node and all nodes Ready.
    pub start_timeout: Duration,
    /// How long the node-lifecycle controller waits without a heartbeat
    /// before a node is NotReady (upstream's default is 50 s; shorter here
    /// so fault tests stay short). Kubelets renew their lease four times
    /// within a third of it.
    pub node_monitor_grace: Duration,
    /// Where clusters keep their files ([`layout::base_dir`]).
    pub base_dir: PathBuf,
    /// Where built images are cached ([`images::cache_dir`]).
    pub image_cache: PathBuf,
    /// Keep the cluster's files (logs, configs) after teardown.
    pub keep_files: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            upstream: UpstreamBinaries::from_env(),
            nodes_per_site: 1,
            start_timeout: Duration::from_secs(180),
            node_monitor_grace: Duration::from_secs(16),
            base_dir: layout::base_dir(),
            image_cache: images::cache_dir(),
            keep_files: std::env::var_os(crate::control_plane::KEEP_ENV).is_some_and(|v| v == "1"),
        }
    }
}

/// How long each phase of [`Cluster::start`] took.
#[derive(Debug, Clone, Default)]
pub struct StartTimes {
    pub sweep: Duration,
    pub network: Duration,
    pub control_plane: Duration,
    pub images: Duration,
    pub nodes_booted: Duration,
    /// From the first node's boot to the last node Ready.
    pub nodes_ready: Duration,
    pub total: Duration,
}

/// What the cluster's processes use (see [`Cluster::usage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    pub processes: usize,
    /// User and system CPU time, summed over the live processes.
    pub cpu: Duration,
    /// Resident memory, summed (shared pages count once per process).
    pub rss_bytes: u64,
}

/// A running two-site cluster.
pub struct Cluster {
    slot: Slot,
    root: PathBuf,
    opts: ClusterOptions,
    bins: NodeBinaries,
    images: Vec<BuiltImage>,
    nodes: BTreeMap<NodeId, Node>,
    plane: Option<ControlPlane>,
    start_times: StartTimes,
    // Last: the slot is free only once everything above is gone.
    lock: Option<SlotLock>,
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

impl Cluster {
    /// Starts a cluster and waits until every node is Ready.
    pub async fn start(opts: ClusterOptions) -> Result<Self, HarnessError> {
        let started = Instant::now();
        if !(1..=layout::MAX_NODES_PER_SITE).contains(&opts.nodes_per_site) {
            return Err(HarnessError::InvalidOption {
                option: "nodes_per_site",
                value: opts.nodes_per_site.to_string(),
            });
        }
        let up = &opts.upstream;
        let bins = NodeBinaries {
            containerd: up.get("containerd")?,
            ctr: up.get("ctr")?,
            kubelet: up.get("kubelet")?,
            kube_proxy: up.get("kube-proxy")?,
            bin_dir: up.dir().to_owned(),
        };
        up.get("containerd-shim-runc-v2")?;
        up.get("kube-controller-manager")?;
        up.get("kube-scheduler")?;

        let lock = SlotLock::acquire_any()?;
        let slot = lock.slot();
        let root = slot.root(&opts.base_dir);
        let mut cluster = Self {
            slot,
            root: root.clone(),
            opts: opts.clone(),
            bins,
            images: Vec::new(),
            nodes: BTreeMap::new(),
            plane: None,
            start_times: StartTimes::default(),
            lock: Some(lock),
        };
        let mut times = StartTimes::default();

        let t = Instant::now();
        sweep::sweep(slot, &root, KeepFiles::No)?;
        std::fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
        times.sweep = t.elapsed();

        let t = Instant::now();
        net::create_backbone(slot)?;
        times.network = t.elapsed();

        let t = Instant::now();
        let grace = opts.node_monitor_grace.as_secs().max(4);
        let plane = ControlPlane::start(ControlPlaneOptions {
            upstream: opts.upstream.clone(),
            controller_manager: true,
            scheduler: true,
            start_timeout: opts.start_timeout,
            bind_address: slot.control_plane_ip(),
            service_cidr: layout::cidr(slot.service_cidr()),
            extra_sans: Vec::new(),
            extra_apiserver_args: Vec::new(),
            extra_controller_manager_args: vec![
                format!("--node-monitor-grace-period={grace}s"),
                "--node-monitor-period=2s".into(),
            ],
            parent_dir: Some(root.clone()),
        })
        .await?;
        cluster.plane = Some(plane);
        times.control_plane = t.elapsed();

        let t = Instant::now();
        let cache = &opts.image_cache;
        cluster.images = vec![images::pause(cache)?, images::workload(cache)?];
        times.images = t.elapsed();

        let t = Instant::now();
        let (server, ca, proxy) = {
            let plane = cluster.plane()?;
            let pki = plane.pki();
            let proxy = pki.issue_client("kube-proxy", "system:kube-proxy", &[])?;
            (
                plane.apiserver_url().to_owned(),
                pki.ca_files.cert.clone(),
                proxy,
            )
        };
        let proxy_kubeconfig = root.join("kube-proxy.kubeconfig");
        write_kubeconfig(&proxy_kubeconfig, &server, &ca, &proxy)?;
        // Lease renewed every quarter of its duration: four renewals fit in
        // a third of the grace period.
        let lease_seconds = u32::try_from((grace / 3).clamp(4, 40)).unwrap_or(10);
        // `nodes/` is a shared mount of its own, made before any node's
        // mounts inside it: a node plugin mounts it (the directory above
        // every per-node kubelet root) with Bidirectional propagation,
        // which needs a shared source, and a shared mount made over it
        // later would hide the nodes' own mounts below from unmounting.
        node::shared_bind(&root.join("nodes"))?;
        for site in Site::ALL {
            for index in 1..=opts.nodes_per_site {
                let id = NodeId { site, index };
                let dir = root.join("nodes").join(id.node_name());
                let name = id.node_name();
                let cert: CertFiles = cluster.plane()?.pki().issue_client(
                    &name,
                    &format!("system:node:{name}"),
                    &["system:nodes"],
                )?;
                let kubeconfig = dir.join("etc/kubelet.kubeconfig");
                std::fs::create_dir_all(dir.join("etc")).map_err(io_error("creating", &dir))?;
                write_kubeconfig(&kubeconfig, &server, &ca, &cert)?;
                let config = NodeConfig {
                    slot,
                    id,
                    dir,
                    kubelet_kubeconfig: kubeconfig,
                    proxy_kubeconfig: proxy_kubeconfig.clone(),
                    lease_seconds,
                };
                cluster.nodes.insert(id, Node::new(config));
            }
        }
        let ids: Vec<NodeId> = cluster.nodes.keys().copied().collect();
        for &id in &ids {
            cluster.boot(id)?;
        }
        times.nodes_booted = t.elapsed();

        let t = Instant::now();
        cluster.wait_ready(&ids, opts.start_timeout).await?;
        times.nodes_ready = t.elapsed();
        times.total = started.elapsed();
        cluster.start_times = times;
        Ok(cluster)
    }

    fn boot(&mut self, id: NodeId) -> Result<(), HarnessError> {
        let timeout = self.opts.start_timeout;
        let bins = self.bins.clone();
        let images = self.images.clone();
        self.node_mut(id)?.boot(&bins, &images, timeout)
    }

    fn node_mut(&mut self, id: NodeId) -> Result<&mut Node, HarnessError> {
        self.nodes
            .get_mut(&id)
            .ok_or_else(|| HarnessError::Cluster(format!("no node {id} in this cluster")))
    }

    fn node(&self, id: NodeId) -> Result<&Node, HarnessError> {
        self.nodes
            .get(&id)
            .ok_or_else(|| HarnessError::Cluster(format!("no node {id} in this cluster")))
    }

    fn plane(&self) -> Result<&ControlPlane, HarnessError> {
        self.plane
            .as_ref()
            .ok_or_else(|| HarnessError::Cluster("the control plane is not running".into()))
    }

    /// The control plane (kubectl, the admin client, its logs).
    pub fn control_plane(&self) -> &ControlPlane {
        self.plane
            .as_ref()
            .expect("a started cluster has its control plane until dropped")
    }

    pub fn client(&self) -> Client {
        self.control_plane().client()
    }

    pub fn kubeconfig(&self) -> &Path {
        self.control_plane().kubeconfig()
    }

    pub fn kubectl_ok(&self, args: &[&str]) -> Result<String, HarnessError> {
        self.control_plane().kubectl_ok(args)
    }

    pub fn kubectl_apply(&self, manifest: &str) -> Result<String, HarnessError> {
        self.control_plane()
            .kubectl_ok_with_stdin(&["apply", "-f", "-"], manifest)
    }

    pub fn slot(&self) -> Slot {
        self.slot
    }

    /// The cluster's directory (nodes' disks, the control plane, logs).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn start_times(&self) -> &StartTimes {
        &self.start_times
    }

    pub fn nodes(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    pub fn nodes_of(&self, site: Site) -> Vec<NodeId> {
        self.nodes
            .keys()
            .copied()
            .filter(|n| n.site == site)
            .collect()
    }

    /// The node's network namespace (`nsenter --net=/run/netns/<it>`).
    pub fn netns(&self, id: NodeId) -> String {
        self.slot.node_netns(id)
    }

    pub fn node_ip(&self, id: NodeId) -> std::net::Ipv4Addr {
        self.slot.node_ip(id)
    }

    /// The node's kubelet root dir (what the CSI node plugin's hostPath
    /// volumes point at: the chart's `kubeletDir`).
    pub fn kubelet_dir(&self, id: NodeId) -> Result<PathBuf, HarnessError> {
        Ok(self.node(id)?.config.kubelet_dir())
    }

    /// The directory holding every node's directory (`nodes/`): a shared
    /// mount, so that a Bidirectional mount of it in a pod (the node
    /// plugin's, with a per-node kubelet root below) propagates both ways.
    pub fn nodes_dir(&self) -> PathBuf {
        self.root.join("nodes")
    }

    /// A shared directory of the node for hostPath volumes with mount
    /// propagation.
    pub fn shared_dir(&self, id: NodeId) -> Result<PathBuf, HarnessError> {
        Ok(self.node(id)?.config.shared_dir())
    }

    /// The address pods and nodes reach the API server at.
    pub fn control_plane_ip(&self) -> std::net::Ipv4Addr {
        self.slot.control_plane_ip()
    }

    /// The `kubernetes` Service's ClusterIP.
    pub fn kubernetes_service_ip(&self) -> std::net::Ipv4Addr {
        self.slot.kubernetes_service_ip()
    }

    /// Every process of the node (daemons, shims, containers).
    pub fn node_pids(&self, id: NodeId) -> Result<Vec<i32>, HarnessError> {
        Ok(self.node(id)?.all_pids())
    }

    /// The node's daemons (containerd, kubelet, kube-proxy) by name.
    pub fn node_daemons(&self, id: NodeId) -> Result<Vec<(String, u32)>, HarnessError> {
        Ok(self.node(id)?.daemon_pids())
    }

    /// Process ids of the control plane's components.
    pub fn control_plane_pids(&self) -> Vec<(String, u32)> {
        self.plane
            .as_ref()
            .map(ControlPlane::pids)
            .unwrap_or_default()
    }

    /// CPU time used so far and memory held now by every process of the
    /// cluster (the control plane's components, and everything in the
    /// nodes' cgroups: daemons, shims, containers).
    pub fn usage(&self) -> Usage {
        let mut pids: Vec<i32> = self
            .control_plane_pids()
            .iter()
            .filter_map(|(_, pid)| i32::try_from(*pid).ok())
            .collect();
        for node in self.nodes.values() {
            pids.extend(node.all_pids());
        }
        pids.sort_unstable();
        pids.dedup();
        let mut usage = Usage {
            processes: 0,
            cpu: Duration::ZERO,
            rss_bytes: 0,
        };
        // Clock ticks: 100 per second on Linux.
        const TICKS: u64 = 100;
        for pid in pids {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            // After the command: state is field 3, utime 14 and stime 15.
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i).and_then(|v| v.parse::<u64>().ok()))
                .sum();
            let rss_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .unwrap_or_default()
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .unwrap_or(0);
            usage.processes += 1;
            usage.cpu += Duration::from_millis(ticks * 1000 / TICKS);
            usage.rss_bytes += rss_kib * 1024;
        }
        usage
    }

    /// Builds (cached) and imports `image` into every node, and into every
    /// node booted later.
    pub fn add_image(&mut self, image: BuiltImage) -> Result<(), HarnessError> {
        for node in self.nodes.values().filter(|n| n.is_running()) {
            node.import(&self.bins, std::slice::from_ref(&image))?;
        }
        if !self.images.contains(&image) {
            self.images.push(image);
        }
        Ok(())
    }

    /// Waits until every node in `ids` is Ready, as its kubelet reported
    /// since the node's last boot, and carries its zone label.
    pub async fn wait_ready(
        &mut self,
        ids: &[NodeId],
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        let api: Api<KubeNode> = Api::all(self.client());
        // A Ready reported before the node's last boot does not count.
        let mut booted = BTreeMap::new();
        for id in ids {
            booted.insert(*id, self.node(*id)?.booted_epoch_seconds());
        }
        loop {
            for id in ids {
                self.node_mut(*id)?.check_alive()?;
            }
            let last = match api.list(&ListParams::default()).await {
                Ok(list) => {
                    let pending: Vec<String> = ids
                        .iter()
                        .filter_map(|id| {
                            let node = list
                                .items
                                .iter()
                                .find(|n| n.metadata.name.as_deref() == Some(&id.node_name()));
                            match node {
                                None => Some(format!("{id} not registered")),
                                Some(n) if !node_ready(n) => Some(format!("{id} not Ready")),
                                Some(n)
                                    if ready_since(n)
                                        < booted.get(id).copied().flatten().map(|s| s - 1) =>
                                {
                                    Some(format!("{id} Ready only from before its boot"))
                                }
                                Some(n) if zone_of(n).as_deref() != Some(&id.site.zone()) => {
                                    Some(format!("{id} has zone {:?}", zone_of(n)))
                                }
                                Some(_) => None,
                            }
                        })
                        .collect();
                    if pending.is_empty() {
                        return Ok(());
                    }
                    pending.join(", ")
                }
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                let mut tails = String::new();
                for id in ids {
                    tails.push_str(&self.node(*id)?.log_tails(25));
                }
                return Err(HarnessError::NotReady {
                    what: "nodes Ready".into(),
                    waited: timeout,
                    last,
                    log_tail: tails,
                });
            }
            tokio::time::sleep(crate::wait::POLL).await;
        }
    }

    // ----- faults ---------------------------------------------------------

    /// kill -9 of every process of the node: kubelet, containerd, kube-proxy,
    /// shims, containers (its whole cgroup). The node stays down until
    /// [`Self::start_node`].
    pub fn kill_node(&mut self, id: NodeId) -> Result<(), HarnessError> {
        self.node_mut(id)?.kill()
    }

    /// Brings a node back fresh (new processes, old disk). Does not wait
    /// for Ready: see [`Self::wait_ready`].
    pub fn start_node(&mut self, id: NodeId) -> Result<(), HarnessError> {
        self.boot(id)
    }

    /// A room losing power: every node of `site` dies at once with its
    /// mounts, and the site's links (to the other site and to the control
    /// plane) go dark.
    pub fn power_off_site(&mut self, site: Site) -> Result<(), HarnessError> {
        net::cut(self.slot, Link::InterSite)?;
        net::cut(self.slot, Link::Uplink(site))?;
        for id in self.nodes_of(site) {
            self.node_mut(id)?.power_off()?;
        }
        Ok(())
    }

    /// Power back: links restored (the inter-site link only if the other
    /// site's end is up), every node of `site` booted fresh. Does not wait
    /// for Ready.
    pub fn power_on_site(&mut self, site: Site) -> Result<(), HarnessError> {
        net::restore(self.slot, Link::Uplink(site))?;
        net::restore(self.slot, Link::InterSite)?;
        for id in self.nodes_of(site) {
            self.boot(id)?;
        }
        Ok(())
    }

    pub fn cut(&self, link: Link) -> Result<(), HarnessError> {
        net::cut(self.slot, link)
    }

    pub fn restore(&self, link: Link) -> Result<(), HarnessError> {
        net::restore(self.slot, link)
    }

    pub fn is_cut(&self, link: Link) -> Result<bool, HarnessError> {
        net::is_cut(self.slot, link)
    }

    /// Limits the inter-site link's bandwidth (Mbit/s each way; `None`:
    /// unlimited).
    pub fn limit_intersite(&self, mbit: Option<u32>) -> Result<(), HarnessError> {
        net::limit_intersite(self.slot, mbit)
    }

    /// Cuts the link between the two sites.
    pub fn cut_intersite(&self) -> Result<(), HarnessError> {
        self.cut(Link::InterSite)
    }

    pub fn restore_intersite(&self) -> Result<(), HarnessError> {
        self.restore(Link::InterSite)
    }

    /// Cuts `site` off the control plane (it still reaches the other site).
    pub fn partition(&self, site: Site) -> Result<(), HarnessError> {
        self.cut(Link::Uplink(site))
    }

    pub fn heal(&self, site: Site) -> Result<(), HarnessError> {
        self.restore(Link::Uplink(site))
    }

    /// One line per node and link, for `cluster.sh status` and test output.
    pub fn describe(&self) -> String {
        let mut out = format!(
            "cluster slot {} in {}\napi server {} (kubeconfig {})\n",
            self.slot.number(),
            self.root.display(),
            self.plane
                .as_ref()
                .map(|p| p.apiserver_url().to_owned())
                .unwrap_or_default(),
            self.plane
                .as_ref()
                .map(|p| p.kubeconfig().display().to_string())
                .unwrap_or_default(),
        );
        for (id, node) in &self.nodes {
            out.push_str(&format!(
                "{id}: {} ip {} netns {} boots {} processes {}\n",
                id.site,
                self.slot.node_ip(*id),
                self.slot.node_netns(*id),
                node.boots(),
                node.all_pids().len(),
            ));
        }
        let mut links = vec![
            Link::InterSite,
            Link::Uplink(Site::A),
            Link::Uplink(Site::B),
        ];
        links.extend(self.nodes.keys().map(|&id| Link::Node(id)));
        for link in links {
            let state = match net::is_cut(self.slot, link) {
                Ok(true) => "CUT",
                Ok(false) => "up",
                Err(_) => "unknown",
            };
            out.push_str(&format!("link {link}: {state}\n"));
        }
        out
    }

    /// Stops everything and sweeps the slot; what [`Drop`] does, with the
    /// error returned instead of printed.
    pub fn shutdown(mut self) -> Result<(), HarnessError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<(), HarnessError> {
        let Some(lock) = self.lock.take() else {
            return Ok(());
        };
        for node in self.nodes.values_mut() {
            let _ = node.kill();
        }
        self.plane = None;
        let keep = if self.opts.keep_files {
            KeepFiles::Yes
        } else {
            KeepFiles::No
        };
        let result = sweep::sweep(self.slot, &self.root, keep).map(drop);
        drop(lock);
        result
    }

    /// The tails of every node's and the control plane's logs.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        if let Some(plane) = &self.plane {
            out.push_str(&plane.log_tails(lines));
        }
        for node in self.nodes.values() {
            out.push_str(&node.log_tails(lines));
        }
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "cluster in {} (slot {}):\n{}\n{}",
                self.root.display(),
                self.slot.number(),
                self.describe(),
                self.log_tails(30)
            );
        }
        if self.opts.keep_files {
            eprintln!("keeping {}", self.root.display());
        }
        if let Err(e) = self.teardown() {
            eprintln!("tearing the cluster down: {e}");
        }
    }
}

/// Whether the node's Ready condition is True.
pub fn node_ready(node: &KubeNode) -> bool {
    node_condition(node, "Ready").as_deref() == Some("True")
}

/// The status of the node's condition `kind` (`True`, `False`, `Unknown`).
pub fn node_condition(node: &KubeNode, kind: &str) -> Option<String> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

/// When the kubelet last reported the Ready condition (epoch seconds).
fn ready_since(node: &KubeNode) -> Option<i64> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?
        .last_heartbeat_time
        .as_ref()
        .map(|t| t.0.as_second())
}

fn zone_of(node: &KubeNode) -> Option<String> {
    node.metadata
        .labels
        .as_ref()?
        .get(layout::ZONE_LABEL)
        .cloned()
}
