//! The processes of the volume and the faults done to them: two sites
//! (network namespaces on one bridge with the host, so that a cut link
//! separates a site from the frontend and from the other site), a replica
//! in each, a frontend on the host with a file arbiter; kill -9, SIGTERM,
//! link cuts, power cuts and arbiter stalls.
//!
//! Written apart from `common::Stack` because the harness needs what it
//! lacks: replicas started with `--peer` (for the resync) on fixed
//! addresses, and sites that reach each other (a bridge).

use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::common::{
    Proc, command, create_volume, engine_bin, run_ok, start_proc, start_proc_in, wait_until,
};
use crate::{LEASE, NAMES, PORT, RESYNC_RATE, SIZE, VOLUME};

/// For a replica to answer from the host once its link is back.
pub const REACH_DEADLINE: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------- sites --

/// Two network namespaces on a bridge with the host (10.X.Y.0/24: host .1,
/// site a .2, site b .3); removed on drop.
pub struct Sites {
    bridge: String,
    ns: [String; 2],
    host_if: [String; 2],
    ip: [String; 2],
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

impl Sites {
    fn create(tag: u32) -> Sites {
        // 10.200-249.*: apart from common::SiteNet's 10.100-199.*.
        let (x, y) = (200 + tag % 50, (tag >> 8) & 0xff);
        let t = format!("{:06x}", tag & 0xff_ffff);
        let sites = Sites {
            bridge: format!("tvf{t}br"),
            ns: NAMES.map(|n| format!("tvf-{t}-{n}")),
            host_if: NAMES.map(|n| format!("tvf{t}{n}")),
            ip: [2, 3].map(|h| format!("10.{x}.{y}.{h}")),
        };
        // From here on, Drop removes whatever exists.
        ip(&["link", "add", &sites.bridge, "type", "bridge"]);
        ip(&[
            "addr",
            "add",
            &format!("10.{x}.{y}.1/24"),
            "dev",
            &sites.bridge,
        ]);
        ip(&["link", "set", &sites.bridge, "up"]);
        for i in 0..2 {
            let (ns, host_if) = (&sites.ns[i], &sites.host_if[i]);
            let peer = format!("{host_if}p");
            ip(&["netns", "add", ns]);
            ip(&[
                "link", "add", host_if, "type", "veth", "peer", "name", &peer,
            ]);
            ip(&["link", "set", &peer, "netns", ns]);
            ip(&["link", "set", host_if, "master", &sites.bridge, "up"]);
            let addr = format!("{}/24", sites.ip[i]);
            ip(&["-n", ns, "addr", "add", &addr, "dev", &peer]);
            ip(&["-n", ns, "link", "set", &peer, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        sites
    }

    /// Cuts (`false`) or restores site `i`'s link to the host and the other site.
    pub fn set_link(&self, i: usize, up: bool) {
        ip(&[
            "link",
            "set",
            &self.host_if[i],
            if up { "up" } else { "down" },
        ]);
    }
}

impl Drop for Sites {
    fn drop(&mut self) {
        for i in 0..2 {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_if[i]])
                .output();
            let _ = Command::new("ip")
                .args(["netns", "del", &self.ns[i]])
                .output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

// -------------------------------------------------------------- cluster --

/// The processes of the volume. Drop kills them (then the sites go).
pub struct Cluster {
    replicas: [Option<Proc>; 2],
    frontend: Option<Proc>,
    frontends_started: u32,
    /// Whether each replica runs with the volatile write cache
    /// (`--storage-faults volatile`): then kill -9 is a power cut of its
    /// site, every write it has not flushed gone.
    pub volatile: [bool; 2],
    pub sites: Sites,
    secret: PathBuf,
    root: Option<tempfile::TempDir>,
}

impl Cluster {
    /// Starts the volume: replicas with volatile caches as `volatile`
    /// says, a frontend with the commit stall `stall`.
    pub fn start(tag: u32, volatile: [bool; 2], stall: Option<&str>) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("twinvol-faults-")
            .tempdir()
            .expect("tempdir");
        let secret = root.path().join("secret");
        std::fs::write(&secret, "fault-harness-secret-0123456789abcdef\n").expect("secret");
        let mut c = Cluster {
            replicas: [None, None],
            frontend: None,
            frontends_started: 0,
            volatile: [false; 2],
            sites: Sites::create(tag),
            secret,
            root: Some(root),
        };
        for name in NAMES {
            let pool = c.dir().join(format!("pool-{name}"));
            std::fs::create_dir(&pool).expect("pool dir");
            create_volume(&pool, VOLUME, &SIZE.to_string());
        }
        let arbiter = c.arbiter_path().display().to_string();
        let replicas = ["--replica", "a", "--replica", "b"];
        c.engine(&[&["arbiter", "create", "--path", &arbiter][..], &replicas].concat());
        c.start_replica(0, volatile[0]);
        c.start_replica(1, volatile[1]);
        c.start_frontend(stall);
        c
    }

    pub fn dir(&self) -> &Path {
        self.root.as_ref().expect("root until drop").path()
    }

    /// Runs `twinvol-engine ARGS`; fails the test if it fails.
    pub fn engine(&self, args: &[&str]) -> String {
        run_ok(command(engine_bin(), args), Duration::from_secs(30))
    }

    pub fn arbiter_path(&self) -> PathBuf {
        self.dir().join("arbiter.json")
    }

    pub fn addr(&self, i: usize) -> String {
        format!("{}:{PORT}", self.sites.ip[i])
    }

    pub fn pool_file(&self, i: usize, file: &str) -> PathBuf {
        self.dir()
            .join(format!("pool-{}", NAMES[i]))
            .join(VOLUME)
            .join(file)
    }

    /// (Re)starts replica `i`; with `volatile`, under the volatile write
    /// cache (its next kill -9 is a power cut).
    pub fn start_replica(&mut self, i: usize, volatile: bool) {
        let mut args = vec![
            "replica".to_owned(),
            "--pool".into(),
            self.dir()
                .join(format!("pool-{}", NAMES[i]))
                .display()
                .to_string(),
            "--listen".into(),
            self.addr(i),
            "--secret-file".into(),
            self.secret.display().to_string(),
            "--peer".into(),
            format!("{}={}", NAMES[1 - i], self.addr(1 - i)),
            "--resync-rate".into(),
            RESYNC_RATE.into(),
        ];
        if volatile {
            args.extend(["--storage-faults".into(), "volatile".into()]);
        }
        self.volatile[i] = volatile;
        let name = format!("replica-{}", NAMES[i]);
        let p = start_proc_in(&name, args, self.dir(), Some(&self.sites.ns[i]));
        self.replicas[i] = Some(p);
    }

    pub fn kill_replica(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].take() {
            p.kill();
        }
    }

    pub fn nbd_uri(&self) -> String {
        format!(
            "nbd+unix:///?socket={}",
            self.dir().join("nbd.sock").display()
        )
    }

    /// Starts a frontend (a new lease holder) and waits until it serves:
    /// after a killed one, that is after its lease expired plus the margin.
    /// `stall`: an `--arbiter-stall` spec (the file arbiter sleeps after
    /// those commits, past the frontend's deadline: the swap landed, its
    /// caller does not know).
    pub fn start_frontend(&mut self, stall: Option<&str>) {
        self.frontends_started += 1;
        let mut args: Vec<String> = [
            "frontend",
            "--volume",
            VOLUME,
            "--local",
            "a",
            "--secret-file",
        ]
        .map(str::to_owned)
        .to_vec();
        args.push(self.secret.display().to_string());
        args.extend([
            "--arbiter".into(),
            self.arbiter_path().display().to_string(),
        ]);
        args.extend([
            "--frontend-id".into(),
            format!("fe-{}", self.frontends_started),
        ]);
        for (i, name) in NAMES.iter().enumerate() {
            args.extend(["--replica".into(), format!("{name}={}", self.addr(i))]);
        }
        args.extend(LEASE.map(str::to_owned));
        if let Some(spec) = stall {
            args.extend(["--arbiter-stall".into(), spec.to_owned()]);
        }
        args.extend([
            "--nbd-unix".into(),
            self.dir().join("nbd.sock").display().to_string(),
        ]);
        let name = format!("frontend-{}", self.frontends_started);
        self.frontend = Some(start_proc(&name, args, self.dir()));
    }

    pub fn kill_frontend(&mut self) {
        if let Some(mut p) = self.frontend.take() {
            p.kill();
        }
    }

    /// SIGTERM to the frontend with writes in flight: it stops as it
    /// would on a node drain. Whether it exited by itself within
    /// `deadline` (SIGKILL after), and how long it took.
    pub fn terminate_frontend(&mut self, deadline: Duration) -> (bool, Duration) {
        let t = std::time::Instant::now();
        let clean = match self.frontend.take() {
            Some(mut p) => p.terminate(deadline),
            None => true,
        };
        (clean, t.elapsed())
    }

    /// How many commit stalls (`--arbiter-stall`) the frontends logged.
    pub fn commit_stalls(&self) -> usize {
        std::fs::read_dir(self.dir())
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().starts_with("frontend-"))
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .map(|t| t.matches("arbiter commit stalled").count())
                    .sum()
            })
            .unwrap_or(0)
    }

    /// Stalls the arbiter: takes the file arbiter's lock (the one every
    /// update takes), so that every compare-and-swap from now on blocks
    /// before its commit; reads go on. A caller that gives up on a blocked
    /// update (the frontend, after its control timeout) leaves it queued:
    /// it lands when the guard is dropped — a swap that lands after its
    /// caller timed out.
    pub fn stall_arbiter(&self) -> ArbiterStall {
        let mut path = self.arbiter_path().into_os_string();
        path.push(".lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .expect("open the arbiter's lock file");
        file.lock().expect("take the arbiter's lock");
        ArbiterStall { file }
    }

    /// The arbiter's in-sync set, as `arbiter show` prints it.
    pub fn in_sync(&self) -> [bool; 2] {
        let path = self.arbiter_path().display().to_string();
        let show = self.engine(&["arbiter", "show", "--path", &path]);
        let line = show
            .lines()
            .find_map(|l| l.strip_prefix("in_sync:"))
            .unwrap_or_else(|| panic!("no in_sync line in:\n{show}"));
        let set: BTreeSet<&str> = line.split(',').map(str::trim).collect();
        NAMES.map(|n| set.contains(n))
    }

    /// Whether replica `i` accepts a TCP connection from the host (where
    /// the frontend runs) within the rejoin deadline.
    pub fn reachable(&self, i: usize) -> bool {
        let addr: std::net::SocketAddr = self.addr(i).parse().expect("replica address");
        wait_until(REACH_DEADLINE, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()
        })
        .is_some()
    }

    /// How often the running frontend logged a reconnection to replica `i`.
    pub fn reconnects(&self, i: usize) -> usize {
        let Some(fe) = &self.frontend else { return 0 };
        let addr = format!("addr={}", self.addr(i));
        std::fs::read_to_string(&fe.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("reconnected to replica") && l.contains(&addr))
            .count()
    }

    /// The `state` of replica `i`'s resync status file (`None`: no file).
    pub fn resync_state(&self, i: usize) -> Option<(String, u64)> {
        let text = std::fs::read_to_string(self.pool_file(i, "resync-status.json")).ok()?;
        let v: serde_json::Value = serde_json::from_str(&text).ok()?;
        let state = match &v["state"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Object(o) => o.keys().next().cloned().unwrap_or_default(),
            other => other.to_string(),
        };
        Some((
            state.to_lowercase(),
            v["remaining_bytes"].as_u64().unwrap_or(0),
        ))
    }

    pub fn log_tails(&self, lines: usize) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir())
            .map(|d| d.filter_map(Result::ok).map(|e| e.path()).collect())
            .unwrap_or_default();
        logs.retain(|p| p.extension().is_some_and(|x| x == "log"));
        logs.sort();
        logs.iter()
            .map(|l| {
                format!(
                    "----- {} -----\n{}\n",
                    l.display(),
                    crate::common::tail(l, lines)
                )
            })
            .collect()
    }
}

/// The arbiter's lock, held by the harness (see [`Cluster::stall_arbiter`]).
pub struct ArbiterStall {
    file: File,
}

impl Drop for ArbiterStall {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("fault harness failed; logs:\n{}", self.log_tails(40));
        }
        self.kill_frontend();
        self.kill_replica(0);
        self.kill_replica(1);
        if std::env::var_os("TWINVOL_FAULT_KEEP").is_some()
            && let Some(root) = self.root.take()
        {
            eprintln!("kept {}", root.keep().display());
        }
    }
}
