//! One node of the cluster: its own network namespace, cgroup, containerd
//! (own root, state, socket, CNI configuration; runc from Debian), kubelet
//! (own root dir, name, IP, ports, cgroup root; cgroupfs) and kube-proxy.
//!
//! A node's directory is its disk: `containerd/` (images, snapshots),
//! `kubelet/` (its root dir, a shared bind mount so that mounts made there —
//! by CSI, by Bidirectional propagation — reach the host and containerd),
//! `shared/` (the same, for tests' hostPath volumes), `etc/` (configs,
//! kubeconfigs). `run/` is its RAM: containerd's state, sockets, runc's
//! root, the pod IP allocations. A boot always starts from "power off":
//! nothing of the node runs or is mounted, `run/` is emptied, the network
//! namespace is made anew; the disk is kept. So a node brought back after
//! a kill or a site's power loss is fresh, as after a real power cut.
//!
//! Every process is entered only into the node's network namespace
//! (`nsenter --net`), never a private mount namespace (`ip netns exec` would
//! make mounts private), except the kubelet: it runs in a mount namespace
//! of its own that keeps the host's propagation (the node's shared mounts
//! stay shared) and only covers the three host-global sysctls it insists on
//! (`vm.overcommit_memory`, `kernel.panic`, `kernel.panic_on_oops`) and the
//! device-plugin socket directory it hard-codes.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::{
    HarnessError,
    cluster::{
        cgroup::NodeCgroup,
        cmd::run,
        images::{BuiltImage, PAUSE},
        layout::{NodeId, Slot, ZONE_LABEL, cidr},
        net::{self, Link},
        sweep,
    },
    process::ManagedProcess,
};

/// Joins the cgroups named by the arguments before `--`, then execs the rest.
pub(crate) const JOIN_SCRIPT: &str =
    r#"while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@""#;

/// Covers the kubelet's host-global files in its own mount namespace, then
/// execs the rest.
const KUBELET_MOUNTS: &str = r#"mount --bind "$1" /proc/sys/vm/overcommit_memory &&
mount --bind "$2" /proc/sys/kernel/panic &&
mount --bind "$3" /proc/sys/kernel/panic_on_oops &&
mount --bind "$4" /var/lib/kubelet/device-plugins &&
shift 4 && exec "$@""#;

/// The kubelet hard-codes this path for its device-plugin socket; each
/// node's kubelet sees its own directory there.
const DEVICE_PLUGINS: &str = "/var/lib/kubelet/device-plugins";

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

fn write(path: &Path, contents: &str) -> Result<(), HarnessError> {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
    }
    fs::write(path, contents).map_err(io_error("writing", path))
}

fn mkdir(path: &Path) -> Result<(), HarnessError> {
    fs::create_dir_all(path).map_err(io_error("creating", path))
}

/// The upstream programs a node runs.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub containerd: PathBuf,
    pub ctr: PathBuf,
    pub kubelet: PathBuf,
    pub kube_proxy: PathBuf,
    /// The directory with containerd-shim-runc-v2 (put on containerd's PATH).
    pub bin_dir: PathBuf,
}

/// What a node is configured with.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub slot: Slot,
    pub id: NodeId,
    pub dir: PathBuf,
    /// The kubelet's kubeconfig (a client certificate for `system:node:<name>`).
    pub kubelet_kubeconfig: PathBuf,
    /// kube-proxy's kubeconfig (`system:kube-proxy`).
    pub proxy_kubeconfig: PathBuf,
    /// kubelet's nodeLeaseDurationSeconds (renewed every quarter of it).
    pub lease_seconds: u32,
}

impl NodeConfig {
    pub fn netns(&self) -> String {
        self.slot.node_netns(self.id)
    }
    pub fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }
    pub fn kubelet_dir(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    /// A shared directory for tests' hostPath volumes with mount propagation.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("shared")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.run_dir().join("containerd.sock")
    }
    fn etc(&self) -> PathBuf {
        self.dir.join("etc")
    }
    fn logs(&self) -> PathBuf {
        self.dir.join("logs")
    }
    fn cni_conf_dir(&self) -> PathBuf {
        self.dir.join("cni/net.d")
    }
    fn cgroup(&self) -> NodeCgroup {
        NodeCgroup::new(&self.slot.node_cgroup(self.id))
    }

    fn containerd_toml(&self) -> String {
        let dir = self.dir.display();
        let run = self.run_dir();
        let run = run.display();
        format!(
            r#"version = 3
root = '{dir}/containerd'
state = '{run}/containerd'
imports = []
[grpc]
  address = '{run}/containerd.sock'
[ttrpc]
  address = '{run}/containerd.sock.ttrpc'
[plugins]
  [plugins.'io.containerd.cri.v1.images']
    snapshotter = 'overlayfs'
    [plugins.'io.containerd.cri.v1.images'.pinned_images]
      sandbox = '{PAUSE}'
  [plugins.'io.containerd.cri.v1.runtime']
    netns_mounts_under_state_dir = true
    restrict_oom_score_adj = true
    cdi_spec_dirs = []
    [plugins.'io.containerd.cri.v1.runtime'.containerd]
      default_runtime_name = 'runc'
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
        runtime_type = 'io.containerd.runc.v2'
        [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
          BinaryName = '/usr/sbin/runc'
          SystemdCgroup = false
          Root = '{run}/runc'
    [plugins.'io.containerd.cri.v1.runtime'.cni]
      bin_dirs = ['/usr/lib/cni']
      conf_dir = '{cni}'
  [plugins.'io.containerd.grpc.v1.cri']
    stream_server_address = '127.0.0.1'
  [plugins.'io.containerd.nri.v1.nri']
    disable = true
  [plugins.'io.containerd.internal.v1.opt']
    path = '{dir}/opt'
"#,
            cni = self.cni_conf_dir().display(),
        )
    }

    /// Flat pod IPs: no masquerading, routers route every node's pod CIDR.
    fn cni_conflist(&self) -> String {
        let (net, bits) = self.slot.pod_cidr(self.id);
        let gateway = std::net::Ipv4Addr::from(u32::from(net) + 1);
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": format!("{}pods", self.slot.prefix()),
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": "cni0",
                    "isGateway": true,
                    "ipMasq": false,
                    "hairpinMode": true,
                    "ipam": {
                        "type": "host-local",
                        "dataDir": self.run_dir().join("cni-ipam"),
                        "ranges": [[{"subnet": format!("{net}/{bits}"), "gateway": gateway}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": true}},
                {"type": "loopback"},
            ],
        })
        .to_string()
    }

    fn kubelet_yaml(&self) -> String {
        let d = |p: PathBuf| p.display().to_string();
        format!(
            r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
failSwapOn: false
protectKernelDefaults: true
authentication:
  anonymous: {{enabled: true}}
  webhook: {{enabled: false}}
authorization: {{mode: AlwaysAllow}}
address: {ip}
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
readOnlyPort: 0
containerRuntimeEndpoint: unix://{sock}
podLogsDir: {pod_logs}
volumePluginDir: {volume_plugins}
resolvConf: {resolv}
clusterDomain: cluster.local
nodeStatusUpdateFrequency: 4s
nodeLeaseDurationSeconds: {lease}
serializeImagePulls: false
# Absolute floors: the disk is the shared machine's (a 1% floor of a big, nearly
# full disk put every node under DiskPressure and evicted the chart's pods).
evictionHard: {{memory.available: "100Mi", nodefs.available: "100Mi", imagefs.available: "100Mi", nodefs.inodesFree: "1%"}}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
"#,
            cgroup_root = self.cgroup().root_path(),
            ip = self.slot.node_ip(self.id),
            sock = self.containerd_socket().display(),
            pod_logs = d(self.dir.join("pod-logs")),
            volume_plugins = d(self.dir.join("volume-plugins")),
            resolv = d(self.etc().join("resolv.conf")),
            lease = self.lease_seconds,
        )
    }

    fn kube_proxy_yaml(&self) -> String {
        format!(
            r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
mode: nftables
clusterCIDR: {cluster_cidr}
detectLocalMode: ClusterCIDR
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
nftables:
  masqueradeAll: true
"#,
            kubeconfig = self.proxy_kubeconfig.display(),
            name = self.id.node_name(),
            cluster_cidr = cidr(self.slot.cluster_cidr()),
        )
    }

    /// Writes every configuration file (idempotent).
    pub fn write_files(&self) -> Result<(), HarnessError> {
        for dir in [
            self.dir.join("containerd"),
            self.kubelet_dir(),
            self.shared_dir(),
            self.dir.join("pod-logs"),
            self.dir.join("volume-plugins"),
            self.dir.join("device-plugins"),
            self.cni_conf_dir(),
            self.logs(),
            self.etc(),
        ] {
            mkdir(&dir)?;
        }
        let etc = self.etc();
        write(&etc.join("containerd.toml"), &self.containerd_toml())?;
        write(&etc.join("kubelet.yaml"), &self.kubelet_yaml())?;
        write(&etc.join("kube-proxy.yaml"), &self.kube_proxy_yaml())?;
        write(
            &etc.join("resolv.conf"),
            "# the twinvol test cluster has no DNS\n",
        )?;
        write(
            &self.cni_conf_dir().join("10-pods.conflist"),
            &self.cni_conflist(),
        )?;
        for (file, value) in [
            ("overcommit_memory", "1"),
            ("panic", "10"),
            ("panic_on_oops", "1"),
        ] {
            write(&etc.join("sysctl").join(file), &format!("{value}\n"))?;
        }
        Ok(())
    }
}

/// A node and the processes it runs.
pub struct Node {
    pub config: NodeConfig,
    processes: Vec<ManagedProcess>,
    boots: u32,
    /// When the last boot started (for time-to-Ready).
    booted_at: Option<Instant>,
    /// The same on the wall clock, to tell a kubelet's first status after
    /// the boot from the last one before it (one machine, one clock).
    booted_wall: Option<std::time::SystemTime>,
}

impl Node {
    pub fn new(config: NodeConfig) -> Self {
        Self {
            config,
            processes: Vec::new(),
            boots: 0,
            booted_at: None,
            booted_wall: None,
        }
    }

    pub fn id(&self) -> NodeId {
        self.config.id
    }

    pub fn is_running(&self) -> bool {
        !self.processes.is_empty()
    }

    pub fn boots(&self) -> u32 {
        self.boots
    }

    pub fn booted_at(&self) -> Option<Instant> {
        self.booted_at
    }

    /// Seconds since the epoch of the last boot.
    pub fn booted_epoch_seconds(&self) -> Option<i64> {
        let since = self
            .booted_wall?
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?;
        i64::try_from(since.as_secs()).ok()
    }

    /// Process ids of the node's daemons (containerd, kubelet, kube-proxy).
    pub fn daemon_pids(&self) -> Vec<(String, u32)> {
        self.processes
            .iter()
            .map(|p| (p.name().to_owned(), p.pid()))
            .collect()
    }

    /// Every process in the node's cgroup (daemons, shims, containers).
    pub fn all_pids(&self) -> Vec<i32> {
        self.config.cgroup().pids()
    }

    pub fn log_tails(&self, lines: usize) -> String {
        self.processes
            .iter()
            .map(|p| {
                format!(
                    "----- last {lines} lines of {} {} ({}) -----\n{}\n",
                    self.config.id,
                    p.name(),
                    p.log_path().display(),
                    p.log_tail(lines)
                )
            })
            .collect()
    }

    /// Power off: SIGKILL everything in the node's cgroup; then what a power
    /// cut also takes: the node's mounts, its loop devices, its RAM (`run/`).
    pub fn power_off(&mut self) -> Result<(), HarnessError> {
        let cgroup = self.config.cgroup();
        let result = cgroup.kill_all(Duration::from_secs(30));
        for process in &mut self.processes {
            process.kill();
        }
        self.processes.clear();
        result?;
        sweep::unmount_below(&self.config.dir)?;
        for device in sweep::loop_devices(&self.config.dir) {
            run("losetup", &["-d", &device])?;
        }
        Ok(())
    }

    /// Kill -9 of the node's every process, and nothing else (mounts stay
    /// until the node is brought back).
    pub fn kill(&mut self) -> Result<(), HarnessError> {
        let result = self.config.cgroup().kill_all(Duration::from_secs(30));
        for process in &mut self.processes {
            process.kill();
        }
        self.processes.clear();
        result
    }

    /// Boots the node from "power off": fresh network namespace, empty
    /// `run/`, the node's shared mounts, then containerd (images imported
    /// unless already on the node's disk), the kubelet and kube-proxy.
    pub fn boot(
        &mut self,
        bins: &NodeBinaries,
        images: &[BuiltImage],
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        self.power_off()?;
        let config = self.config.clone();
        let (slot, id) = (config.slot, config.id);
        self.boots += 1;
        self.booted_at = Some(Instant::now());
        self.booted_wall = Some(std::time::SystemTime::now());

        // The network namespace anew (kernel state — bridges, kube-proxy's
        // rules, conntrack — does not survive a power cut). A cut of the
        // node's link stays cut.
        let link = Link::Node(id);
        let was_cut = Path::new("/run/netns").join(config.netns()).exists()
            && net::is_cut(slot, link).unwrap_or(false);
        if Path::new("/run/netns").join(config.netns()).exists() {
            net::restore(slot, link)?;
            net::remove_node(slot, id)?;
        }
        net::add_node(slot, id)?;
        if was_cut {
            net::cut(slot, link)?;
        }

        let run_dir = config.run_dir();
        sweep::remove_tree(&run_dir)?;
        mkdir(&run_dir)?;
        config.write_files()?;
        for dir in [config.kubelet_dir(), config.shared_dir()] {
            shared_bind(&dir)?;
        }
        mkdir(Path::new(DEVICE_PLUGINS))?;
        let cgroup = config.cgroup();
        cgroup.create()?;

        let logs = config.logs();
        let boot = self.boots;
        let containerd = self.spawn(
            "containerd",
            &[
                "env".into(),
                format!(
                    "PATH={}:/usr/sbin:/usr/bin:/sbin:/bin",
                    bins.bin_dir.display()
                ),
                bins.containerd.display().to_string(),
                "--config".into(),
                config.etc().join("containerd.toml").display().to_string(),
            ],
            &logs.join(format!("containerd.{boot}.log")),
            false,
        )?;
        self.processes.push(containerd);
        self.wait_containerd(bins, timeout)?;
        self.import(bins, images)?;

        let kubelet = self.spawn(
            "kubelet",
            &[
                bins.kubelet.display().to_string(),
                format!("--config={}", config.etc().join("kubelet.yaml").display()),
                format!("--root-dir={}", config.kubelet_dir().display()),
                format!("--cert-dir={}", config.kubelet_dir().join("pki").display()),
                format!("--kubeconfig={}", config.kubelet_kubeconfig.display()),
                format!("--hostname-override={}", id.node_name()),
                format!("--node-ip={}", slot.node_ip(id)),
                format!("--node-labels={ZONE_LABEL}={}", id.site.zone()),
                "--v=1".into(),
            ],
            &logs.join(format!("kubelet.{boot}.log")),
            true,
        )?;
        self.processes.push(kubelet);
        let proxy = self.spawn(
            "kube-proxy",
            &[
                bins.kube_proxy.display().to_string(),
                format!(
                    "--config={}",
                    config.etc().join("kube-proxy.yaml").display()
                ),
                "--v=1".into(),
            ],
            &logs.join(format!("kube-proxy.{boot}.log")),
            false,
        )?;
        self.processes.push(proxy);
        Ok(())
    }

    /// Starts `args` in the node's cgroup and network namespace (and, for
    /// the kubelet, its own mount namespace).
    fn spawn(
        &self,
        name: &str,
        args: &[String],
        log: &Path,
        own_mount_namespace: bool,
    ) -> Result<ManagedProcess, HarnessError> {
        let config = &self.config;
        let mut full: Vec<String> = vec!["-c".into(), JOIN_SCRIPT.into(), "sh".into()];
        full.extend(
            config
                .cgroup()
                .procs_files()
                .iter()
                .map(|p| p.display().to_string()),
        );
        full.push("--".into());
        if own_mount_namespace {
            let sysctl = config.etc().join("sysctl");
            full.extend(
                [
                    "unshare",
                    "--mount",
                    "--propagation",
                    "unchanged",
                    "--",
                    "sh",
                    "-c",
                    KUBELET_MOUNTS,
                    "sh",
                ]
                .map(String::from),
            );
            for file in ["overcommit_memory", "panic", "panic_on_oops"] {
                full.push(sysctl.join(file).display().to_string());
            }
            full.push(config.dir.join("device-plugins").display().to_string());
        }
        full.push("nsenter".into());
        full.push(format!("--net=/run/netns/{}", config.netns()));
        full.push("--".into());
        full.extend(args.iter().cloned());
        let process = ManagedProcess::spawn(name, Path::new("/bin/sh"), &full, log)?;
        Ok(process)
    }

    fn ctr(&self, bins: &NodeBinaries, args: &[&str]) -> Result<String, HarnessError> {
        let socket = self.config.containerd_socket().display().to_string();
        let ctr = bins.ctr.display().to_string();
        let mut full = vec!["-a", socket.as_str(), "-n", "k8s.io"];
        full.extend_from_slice(args);
        run(&ctr, &full)
    }

    fn wait_containerd(
        &mut self,
        bins: &NodeBinaries,
        timeout: Duration,
    ) -> Result<(), HarnessError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(process) = self.processes.last_mut()
                && let Some(status) = process.exited()
            {
                return Err(process.exited_early(status));
            }
            let last = match self.ctr(bins, &["version"]) {
                Ok(_) => return Ok(()),
                Err(e) => e.to_string(),
            };
            if Instant::now() >= deadline {
                return Err(HarnessError::NotReady {
                    what: format!("containerd of {}", self.config.id),
                    waited: timeout,
                    last,
                    log_tail: self.log_tails(30),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Imports `images` into the node's containerd, skipping those its disk
    /// already has (a marker per content key, next to containerd's root).
    pub fn import(&self, bins: &NodeBinaries, images: &[BuiltImage]) -> Result<(), HarnessError> {
        let markers = self.config.dir.join("imported");
        mkdir(&markers)?;
        for image in images {
            let marker = markers.join(&image.key);
            if marker.exists() {
                continue;
            }
            self.ctr(
                bins,
                &["images", "import", &image.archive.display().to_string()],
            )?;
            write(&marker, &format!("{}\n", image.reference))?;
        }
        Ok(())
    }

    /// Checks that no daemon of the node died.
    pub fn check_alive(&mut self) -> Result<(), HarnessError> {
        for process in &mut self.processes {
            if let Some(status) = process.exited() {
                return Err(process.exited_early(status));
            }
        }
        Ok(())
    }
}

/// `dir` bind-mounted onto itself and made shared (once), so that mounts
/// below it propagate between the host, containerd and the kubelet.
pub(crate) fn shared_bind(dir: &Path) -> Result<(), HarnessError> {
    use nix::mount::{MsFlags, mount};
    mkdir(dir)?;
    let as_error = |action: &'static str| {
        move |errno: nix::errno::Errno| HarnessError::Io {
            action,
            path: dir.to_owned(),
            source: std::io::Error::from(errno),
        }
    };
    mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
        .map_err(as_error("bind-mounting"))?;
    mount(
        None::<&str>,
        dir,
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .map_err(as_error("making shared"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::layout::Site;

    fn config() -> NodeConfig {
        NodeConfig {
            slot: Slot::new(3).expect("valid"),
            id: NodeId::new(Site::B, 2).expect("valid"),
            dir: PathBuf::from("/var/lib/twinvol-cluster/tsc3/nodes/node-b2"),
            kubelet_kubeconfig: PathBuf::from("/k/kubelet"),
            proxy_kubeconfig: PathBuf::from("/k/proxy"),
            lease_seconds: 10,
        }
    }

    #[test]
    fn containerd_and_kubelet_keep_to_the_node_s_own_paths() {
        let c = config();
        let toml = c.containerd_toml();
        for line in toml.lines().filter(|l| l.contains('/')) {
            assert!(
                line.contains("/var/lib/twinvol-cluster/tsc3/nodes/node-b2")
                    || line.contains("/usr/")
                    || line.contains("twinvol.local/"),
                "containerd path outside the node: {line}"
            );
        }
        let kubelet = c.kubelet_yaml();
        assert!(kubelet.contains("cgroupRoot: /tsc3-b2"), "{kubelet}");
        assert!(kubelet.contains("failCgroupV1: false"));
        assert!(kubelet.contains("address: 10.250.50.12"), "{kubelet}");
    }

    #[test]
    fn the_cni_config_uses_the_node_s_pod_cidr_without_masquerading() {
        let c = config();
        let conf: serde_json::Value = serde_json::from_str(&c.cni_conflist()).expect("JSON");
        let range = &conf["plugins"][0]["ipam"]["ranges"][0][0];
        assert_eq!(range["subnet"], "10.251.57.0/24");
        assert_eq!(range["gateway"], "10.251.57.1");
        assert_eq!(conf["plugins"][0]["ipMasq"], false);
        assert_eq!(conf["name"], "tsc3-pods");
    }
}
