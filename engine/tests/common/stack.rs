//! A whole mirrored volume as real processes — two `twinvol-engine replica`
//! servers, each with its own temporary pool, and one `twinvol-engine
//! frontend` exporting the volume over NBD (unix socket, optionally TCP)
//! and optionally as a FUSE file; optionally each replica in a network
//! namespace of its own and a file-backed arbiter.
//!
//! Readiness is observed, never slept for: every process writes a ready file
//! (`--ready-file`) once it serves, and the harness waits for it with a
//! deadline, failing early with the process's log if it exits. `Drop` kills
//! every process group with SIGKILL, detaches loop devices backed by the
//! FUSE file, unmounts the FUSE directory, removes every directory, and —
//! when the test is failing — prints the tail of every log.
//!
//! Needs root for FUSE (the README's test command runs as root).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::MIB;
use super::process::{
    Proc, create_volume, engine_bin, run_with_deadline, start_proc, start_proc_in, tail,
};

/// What to start.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Volume size in bytes (a multiple of 4096).
    pub size: u64,
    /// Also export the volume as a FUSE file.
    pub fuse: bool,
    /// Also export over NBD on a loopback TCP port.
    pub nbd_tcp: bool,
    /// Start the frontend (false: only the replicas; start frontends with
    /// [`Stack::start_frontend`] or run them with [`Stack::frontend_command`]).
    pub frontend: bool,
    /// The frontend's epoch.
    pub epoch: u64,
    pub volume: String,
    /// Serve `/metrics` on every process.
    pub metrics: bool,
    /// Run each replica in its own network namespace (`tv-<random>-a/b`)
    /// behind a veth pair to the host, so that a test can cut a site's
    /// link ([`Stack::cut_site`]). Needs root.
    pub netns: bool,
    /// Create a file-backed arbiter record (`arbiter create`) and run
    /// frontends with `--arbiter` (lease, epoch, degraded operation)
    /// instead of `--epoch`.
    pub arbiter: bool,
    /// Extra arguments of every replica start (e.g. `--storage-faults
    /// volatile`: a kill is then a power cut of the replica's site).
    pub replica_args: Vec<String>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            size: 64 * MIB,
            fuse: false,
            nbd_tcp: false,
            frontend: true,
            epoch: 1,
            volume: "v1".into(),
            metrics: false,
            arbiter: false,
            netns: false,
            replica_args: vec![],
        }
    }
}

/// A replica of the stack.
pub struct Replica {
    pub name: String,
    pub pool: PathBuf,
    pub proc: Option<Proc>,
    pub addr: String,
}

/// A running mirrored volume.
pub struct Stack {
    pub opts: StackOptions,
    root: tempfile::TempDir,
    pub replicas: Vec<Replica>,
    pub frontend: Option<Proc>,
    secret: PathBuf,
    frontends_started: u32,
    /// Network namespaces of the sites (removed after the processes).
    sites: Vec<SiteNet>,
}

impl Stack {
    /// Creates the volume on two fresh pools, starts both replicas and (if
    /// asked) the frontend, each ready before this returns.
    pub fn start(opts: StackOptions) -> Stack {
        let root = tempfile::Builder::new()
            .prefix("twinvol-stack-")
            .tempdir()
            .expect("tempdir");
        let secret = root.path().join("secret");
        std::fs::write(&secret, "stack-test-secret-0123456789abcdef\n").expect("write secret");
        let mut stack = Stack {
            opts: opts.clone(),
            root,
            replicas: vec![],
            frontend: None,
            secret,
            frontends_started: 0,
            sites: vec![],
        };
        if opts.netns {
            let tag = random_tag();
            for (i, name) in ["a", "b"].into_iter().enumerate() {
                stack.sites.push(SiteNet::create(&tag, name, i as u8));
            }
        }
        for name in ["a", "b"] {
            let pool = stack.root.path().join(format!("pool-{name}"));
            std::fs::create_dir(&pool).expect("pool dir");
            create_volume(&pool, &opts.volume, &opts.size.to_string());
            stack.replicas.push(Replica {
                name: name.into(),
                pool,
                proc: None,
                addr: String::new(),
            });
        }
        if opts.arbiter {
            std::fs::create_dir(stack.root.path().join("arbiter")).expect("arbiter dir");
            let out = run_with_deadline(
                {
                    let mut c = Command::new(engine_bin());
                    c.args(["arbiter", "create", "--path"])
                        .arg(stack.arbiter_path())
                        .args(["--replica", "a", "--replica", "b"]);
                    c
                },
                Duration::from_secs(60),
            );
            assert!(
                out.status.success(),
                "arbiter create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // Addresses fixed before either starts, so that each replica is
        // told where its peer is (`--peer`, for the resync).
        for i in 0..2 {
            stack.replicas[i].addr = match stack.sites.get(i) {
                Some(site) => format!("{}:7400", site.ns_ip),
                None => format!("127.0.0.1:{}", free_port()),
            };
        }
        for i in 0..2 {
            stack.start_replica(i);
        }
        if opts.frontend {
            stack.start_frontend(opts.epoch);
        }
        stack
    }

    pub fn dir(&self) -> &Path {
        self.root.path()
    }

    pub fn secret_file(&self) -> &Path {
        &self.secret
    }

    /// (Re)starts replica `i` (0 = "a", 1 = "b") on its pool, on the same
    /// address as before if it had one.
    pub fn start_replica(&mut self, i: usize) {
        let extra = self.opts.replica_args.clone();
        self.start_replica_with(i, &extra);
    }

    /// Like [`Stack::start_replica`], with `extra` arguments instead of the
    /// stack's `replica_args`.
    pub fn start_replica_with(&mut self, i: usize, extra: &[String]) {
        let r = &self.replicas[i];
        let site = self.sites.get(i).map(|s| (s.ns.clone(), s.ns_ip.clone()));
        let listen = if !r.addr.is_empty() {
            r.addr.clone()
        } else if let Some((_, ip)) = &site {
            format!("{ip}:0")
        } else {
            "127.0.0.1:0".to_owned()
        };
        let mut args = vec![
            "replica".to_owned(),
            "--pool".into(),
            r.pool.display().to_string(),
            "--listen".into(),
            listen,
            "--secret-file".into(),
            self.secret.display().to_string(),
        ];
        if self.opts.metrics {
            args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        }
        let peer = &self.replicas[1 - i];
        if !peer.addr.is_empty() {
            args.extend(["--peer".into(), format!("{}={}", peer.name, peer.addr)]);
        }
        args.extend(extra.iter().cloned());
        let name = format!("replica-{}", r.name);
        let proc = start_proc_in(
            &name,
            args,
            self.root.path(),
            site.as_ref().map(|(ns, _)| ns.as_str()),
        );
        let r = &mut self.replicas[i];
        r.addr = proc
            .ready_value("listen")
            .expect("listen in ready file")
            .to_owned();
        r.proc = Some(proc);
    }

    /// SIGKILLs replica `i`.
    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            p.kill();
        }
    }

    /// The arguments of a frontend of this stack at `epoch`, without
    /// exports (add them) — for tests that run a frontend themselves.
    pub fn frontend_args(&self, epoch: u64) -> Vec<String> {
        let mut args = vec![
            "frontend".to_owned(),
            "--volume".into(),
            self.opts.volume.clone(),
            "--local".into(),
            "a".into(),
            "--secret-file".into(),
            self.secret.display().to_string(),
        ];
        if self.opts.arbiter {
            args.extend([
                "--arbiter".into(),
                self.arbiter_path().display().to_string(),
                "--frontend-id".into(),
                format!("fe-{}", self.frontends_started),
            ]);
        } else {
            args.extend(["--epoch".into(), epoch.to_string()]);
        }
        for r in &self.replicas {
            args.push("--replica".into());
            args.push(format!("{}={}", r.name, r.addr));
        }
        args
    }

    /// A `twinvol-engine frontend` command for this stack at `epoch`,
    /// exporting on a fresh unix socket; not started.
    pub fn frontend_command(&self, epoch: u64) -> Command {
        let mut c = Command::new(engine_bin());
        c.args(self.frontend_args(epoch))
            .arg("--nbd-unix")
            .arg(self.root.path().join(format!("extra-{epoch}.sock")))
            .env("RUST_LOG", "info");
        c
    }

    /// Starts the stack's frontend at `epoch` (stopping a previous one
    /// first) and waits until its exports serve.
    pub fn start_frontend(&mut self, epoch: u64) {
        let epoch_args = [];
        self.start_frontend_inner(epoch, &epoch_args);
    }

    /// Starts the stack's frontend (with `arbiter`: its epoch comes from
    /// the lease) with `extra` arguments, as [`Stack::start_frontend`].
    pub fn start_frontend_with(&mut self, extra: &[&str]) {
        let epoch = self.opts.epoch;
        self.start_frontend_inner(epoch, extra);
    }

    fn start_frontend_inner(&mut self, epoch: u64, extra: &[&str]) {
        self.kill_frontend();
        self.frontends_started += 1;
        let mut args = self.frontend_args(epoch);
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args.push("--nbd-unix".into());
        args.push(self.nbd_socket().display().to_string());
        if self.opts.nbd_tcp {
            args.extend(["--nbd-tcp".into(), "127.0.0.1:0".into()]);
        }
        if self.opts.fuse {
            args.extend([
                "--fuse-dir".into(),
                self.fuse_dir().display().to_string(),
                "--fuse-file-name".into(),
                "volume".into(),
            ]);
        }
        if self.opts.metrics {
            args.extend(["--metrics-listen".into(), "127.0.0.1:0".into()]);
        }
        let name = format!("frontend-{}", self.frontends_started);
        self.frontend = Some(start_proc(&name, args, self.root.path()));
    }

    /// SIGTERMs the frontend and waits for its clean exit (final flush,
    /// unmount); returns whether it exited by itself within `deadline`.
    /// Loop devices still attached to the FUSE file are detached first.
    pub fn stop_frontend(&mut self, deadline: Duration) -> bool {
        self.detach_loops();
        let clean = match self.frontend.take() {
            Some(mut p) => p.terminate(deadline),
            None => true,
        };
        self.unmount_fuse();
        clean
    }

    /// SIGKILLs the frontend (and cleans up its FUSE mount).
    pub fn kill_frontend(&mut self) {
        self.detach_loops();
        if let Some(mut p) = self.frontend.take() {
            p.kill();
        }
        self.unmount_fuse();
    }

    /// The arbiter record file (with `arbiter`).
    pub fn arbiter_path(&self) -> PathBuf {
        self.root.path().join("arbiter").join("v1.json")
    }

    /// `twinvol-engine arbiter show` of the stack's record.
    pub fn arbiter_show(&self) -> String {
        let mut c = Command::new(engine_bin());
        c.args(["arbiter", "show", "--path"])
            .arg(self.arbiter_path());
        let out = run_with_deadline(c, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "arbiter show failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Cuts (`up = false`) or restores site `i`'s link: the host side of
    /// its veth goes down or up (with `netns`).
    pub fn set_site_link(&self, i: usize, up: bool) {
        let site = self.sites.get(i).expect("stack started with netns");
        ip(&["link", "set", &site.host_if, if up { "up" } else { "down" }]);
    }

    /// Makes site `i` silent the way a power cut does: every packet into
    /// its namespace is dropped there (nftables, input hook), so the host
    /// sees no refusal and no error — a connection attempt just waits —
    /// while the link itself stays up (with `netns`). Removed with the
    /// namespace.
    pub fn silence_site(&self, i: usize) {
        let site = self.sites.get(i).expect("stack started with netns");
        let netns = format!("--net=/run/netns/{}", site.ns);
        for rule in [
            "add table inet twinvol_cut",
            "add chain inet twinvol_cut input { type filter hook input priority 0 ; policy drop ; }",
        ] {
            let mut args = vec![netns.as_str(), "nft"];
            args.extend(rule.split(' '));
            let out = Command::new("nsenter")
                .args(&args)
                .output()
                .expect("nsenter nft");
            assert!(
                out.status.success(),
                "nft {rule} in {}: {}",
                site.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// While `on`, drops every packet from the host (the frontend) into
    /// site `i`'s namespace (nftables, input hook, matched on the host
    /// side's address), and only those: the other site's packets (its
    /// resync copies and their answers) pass. The frontend's requests sent
    /// meanwhile come in when it is lifted, as TCP retransmissions, after
    /// the other replica has had them for a while (with `netns`).
    pub fn drop_host_packets_into(&self, i: usize, on: bool) {
        let site = self.sites.get(i).expect("stack started with netns");
        let host_ip = match site.ns_ip.rsplit_once('.') {
            Some((net, _)) => format!("{net}.1"),
            None => panic!("address {}", site.ns_ip),
        };
        let netns = format!("--net=/run/netns/{}", site.ns);
        let rules: Vec<String> = if on {
            vec![
                "add table inet twinvol_late".into(),
                "add chain inet twinvol_late input { type filter hook input priority 0 ; policy accept ; }".into(),
                format!("add rule inet twinvol_late input ip saddr {host_ip} drop"),
            ]
        } else {
            vec!["delete table inet twinvol_late".into()]
        };
        for rule in &rules {
            let mut args = vec![netns.as_str(), "nft"];
            args.extend(rule.split(' '));
            let out = Command::new("nsenter")
                .args(&args)
                .output()
                .expect("nsenter nft");
            assert!(
                out.status.success(),
                "nft {rule} in {}: {}",
                site.ns,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Limits what the host sends into site `i` (the frontend's requests to
    /// its replica, the other site's resync) to `rate` (`tc` syntax, e.g.
    /// `40mbit`) with a token bucket on the host side of its veth (with
    /// `netns`): a slow inter-site link, on which requests queue. Removed
    /// with the veth.
    pub fn throttle_site_link(&self, i: usize, rate: &str) {
        let site = self.sites.get(i).expect("stack started with netns");
        let out = Command::new("tc")
            .args(["qdisc", "replace", "dev", &site.host_if, "root", "tbf"])
            .args(["rate", rate, "burst", "64kb", "latency", "500ms"])
            .output()
            .expect("run tc");
        assert!(
            out.status.success(),
            "tc qdisc replace on {}: {}",
            site.host_if,
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The running frontend's pid (for SIGSTOP/SIGCONT).
    pub fn frontend_pid(&self) -> Option<i32> {
        self.frontend.as_ref().map(Proc::pid)
    }

    pub fn nbd_socket(&self) -> PathBuf {
        self.root.path().join("nbd.sock")
    }

    /// `nbd+unix:///?socket=PATH`, for qemu-io, nbdcopy, fio.
    pub fn nbd_uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.nbd_socket().display())
    }

    /// `HOST:PORT` of the NBD TCP export, if started with `nbd_tcp`.
    pub fn nbd_tcp_addr(&self) -> Option<String> {
        self.frontend
            .as_ref()
            .and_then(|p| p.ready_value("nbd_tcp"))
            .map(str::to_owned)
    }

    pub fn fuse_dir(&self) -> PathBuf {
        self.root.path().join("fuse")
    }

    /// The volume as a file, if started with `fuse`.
    pub fn fuse_file(&self) -> Option<PathBuf> {
        self.frontend
            .as_ref()
            .and_then(|p| p.ready_value("fuse_file"))
            .map(PathBuf::from)
    }

    /// `HOST:PORT` of a process's metrics endpoint (with `metrics`).
    pub fn frontend_metrics_addr(&self) -> Option<String> {
        self.frontend
            .as_ref()
            .and_then(|p| p.ready_value("metrics"))
            .map(str::to_owned)
    }

    /// The data file of each replica (exactly the volume's bytes).
    pub fn replica_data_paths(&self) -> Vec<PathBuf> {
        self.replicas
            .iter()
            .map(|r| r.pool.join(&self.opts.volume).join("data"))
            .collect()
    }

    pub fn replica_log_paths(&self) -> Vec<PathBuf> {
        self.replicas
            .iter()
            .map(|r| self.root.path().join(format!("replica-{}.log", r.name)))
            .collect()
    }

    pub fn frontend_log_path(&self) -> Option<PathBuf> {
        self.frontend.as_ref().map(|p| p.log.clone())
    }

    /// The frontend's log so far (empty if there is none yet).
    pub fn frontend_log(&self) -> String {
        self.frontend_log_path()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// The last lines of every log of the stack.
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.root.path())
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "log"))
                    .collect()
            })
            .unwrap_or_default();
        logs.sort();
        for log in logs {
            out.push_str(&format!(
                "----- {} -----\n{}\n",
                log.display(),
                tail(&log, lines)
            ));
        }
        out
    }

    fn detach_loops(&self) {
        let Some(file) = self
            .frontend
            .as_ref()
            .and_then(|p| p.ready_value("fuse_file"))
        else {
            return;
        };
        let Ok(out) = Command::new("losetup").args(["-j", file]).output() else {
            return;
        };
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            if let Some((dev, _)) = line.split_once(':') {
                let _ = Command::new("losetup").args(["-d", dev]).status();
            }
        }
    }

    fn unmount_fuse(&self) {
        let dir = self.fuse_dir();
        let mounted = std::fs::read_to_string("/proc/self/mountinfo")
            .map(|m| {
                m.lines()
                    .any(|l| l.split(' ').nth(4) == Some(&*dir.display().to_string()))
            })
            .unwrap_or(false);
        if mounted {
            let _ = Command::new("umount").arg("-l").arg(&dir).status();
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test failed; logs of the stack:\n{}", self.log_tails(30));
        }
        self.kill_frontend();
        for i in 0..self.replicas.len() {
            self.kill_replica(i);
        }
    }
}

/// One site's network namespace and veth pair; removed on drop.
pub struct SiteNet {
    pub ns: String,
    pub host_if: String,
    pub ns_ip: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn random_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{:06x}",
        (nanos ^ std::process::id().rotate_left(12)) & 0xff_ffff
    )
}

impl SiteNet {
    /// `tv-<tag>-<name>` with a veth `tv<tag><name>` on the host, and a
    /// /30 of 10.<x>.<y>.0 derived from the tag.
    fn create(tag: &str, name: &str, index: u8) -> SiteNet {
        let n = u32::from_str_radix(tag, 16).unwrap_or(0);
        let x = 100 + (n % 100) as u8;
        let y = ((n >> 8) as u8 & 0x7f) * 2 + index;
        let site = SiteNet {
            ns: format!("tv-{tag}-{name}"),
            host_if: format!("tv{tag}{name}"),
            ns_ip: format!("10.{x}.{y}.2"),
        };
        let peer = format!("tv{tag}{name}p");
        ip(&["netns", "add", &site.ns]);
        // From here on, Drop removes what exists.
        ip(&[
            "link",
            "add",
            &site.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
        ]);
        ip(&["link", "set", &peer, "netns", &site.ns]);
        ip(&[
            "addr",
            "add",
            &format!("10.{x}.{y}.1/30"),
            "dev",
            &site.host_if,
        ]);
        ip(&["link", "set", &site.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut a = vec!["netns", "exec", &site.ns, "ip"];
            a.extend_from_slice(args);
            ip(&a);
        };
        inside(&["addr", "add", &format!("{}/30", site.ns_ip), "dev", &peer]);
        inside(&["link", "set", &peer, "up"]);
        inside(&["link", "set", "lo", "up"]);
        // The sites reach each other through the host (the resync goes
        // from one replica to the other): a default route, and forwarding
        // on this veth only (not the host's global switch).
        inside(&["route", "add", "default", "via", &format!("10.{x}.{y}.1")]);
        let forwarding = format!("/proc/sys/net/ipv4/conf/{}/forwarding", site.host_if);
        std::fs::write(&forwarding, "1").expect("enable forwarding on the site's veth");
        site
    }
}

impl Drop for SiteNet {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
    }
}

/// The `pause_ms=N` of a frontend log's "writes resumed on the survivor"
/// line: how long writes were held at a replica's loss.
pub fn failover_pause_ms(frontend_log: &str) -> Option<u64> {
    let line = frontend_log
        .lines()
        .find(|l| l.contains("writes resumed on the survivor"))?;
    let at = line.find("pause_ms=")? + "pause_ms=".len();
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Sets the value that follows `flag` in `args` (from
/// [`Stack::frontend_args`]), for a test that runs a frontend differing from
/// the stack's in one flag.
pub fn set_flag(args: &mut [String], flag: &str, value: impl Into<String>) {
    let at = args
        .iter()
        .position(|a| a == flag)
        .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
    args[at + 1] = value.into();
}

/// A loopback port free now (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}
