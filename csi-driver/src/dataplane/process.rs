//! Data-plane processes that outlive the CSI node service.
//!
//! A frontend or replica server is this same binary started with
//! `--mode frontend|replica --spec FILE`, detached: its own session
//! (`setsid`, so no signal aimed at the service's process group or
//! terminal reaches it), stdin from /dev/null and output to a log file
//! (never a pipe to the service, whose death would break it), optionally
//! moved into a cgroup of its own (so that a container runtime stopping the
//! service's container does not kill it). The service keeps nothing in
//! memory that it cannot find again: the pid is in a file next to the spec,
//! and a process is recognised as ours by its command line naming that
//! spec file, so a pid reused by an unrelated process after a reboot is
//! never taken for a frontend.

use std::fs::{File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::error::{CsiError, CsiResult};

/// Where a data-plane process keeps its files: `<dir>/<role>.json` (its
/// spec), `.pid`, `.log`, `.ready`.
#[derive(Debug, Clone)]
pub struct ProcessFiles {
    pub dir: PathBuf,
    pub role: &'static str,
    /// The log, when it lives elsewhere than `<dir>/<role>.log` (so that
    /// it outlives the directory).
    pub log_file: Option<PathBuf>,
}

impl ProcessFiles {
    pub fn new(dir: impl Into<PathBuf>, role: &'static str) -> Self {
        Self {
            dir: dir.into(),
            role,
            log_file: None,
        }
    }

    /// The same files with the log at `log`.
    pub fn with_log(mut self, log: PathBuf) -> Self {
        self.log_file = Some(log);
        self
    }

    fn file(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.role))
    }

    pub fn spec(&self) -> PathBuf {
        self.file("json")
    }

    pub fn pid(&self) -> PathBuf {
        self.file("pid")
    }

    pub fn log(&self) -> PathBuf {
        self.log_file.clone().unwrap_or_else(|| self.file("log"))
    }

    pub fn ready(&self) -> PathBuf {
        self.file("ready")
    }

    /// The pid of the running process, if one is running.
    pub fn running(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        is_ours(pid, &self.spec()).then_some(pid)
    }

    /// Writes `spec` as JSON (atomically).
    pub fn write_spec<T: serde::Serialize>(&self, spec: &T) -> CsiResult<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| CsiError::io("creating directory", &self.dir, e))?;
        let text = serde_json::to_vec_pretty(spec).map_err(|e| CsiError::Internal {
            detail: format!("cannot encode {}: {e}", self.spec().display()),
        })?;
        write_atomic(&self.spec(), &text)
    }

    pub fn read_spec<T: serde::de::DeserializeOwned>(&self) -> CsiResult<T> {
        let path = self.spec();
        let text = std::fs::read(&path).map_err(|e| CsiError::io("reading", &path, e))?;
        serde_json::from_slice(&text).map_err(|e| CsiError::Internal {
            detail: format!("{} is unreadable: {e}", path.display()),
        })
    }

    /// The `key=value` lines of the ready file, once the process wrote it.
    pub fn ready_entries(&self) -> Option<Vec<(String, String)>> {
        let text = std::fs::read_to_string(self.ready()).ok()?;
        Some(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }
}

/// Held by a running data-plane process for its whole life: an exclusive
/// `flock` on `<dir>/<role>.lock`. A second frontend of the same volume (or
/// a second replica server over the same pool) — which would fence the
/// first, or open its files twice — cannot start; the kernel releases the
/// lock when the process dies, however it dies.
#[derive(Debug)]
pub struct InstanceLock {
    _lock: nix::fcntl::Flock<File>,
}

impl InstanceLock {
    /// Takes the lock of the process whose spec is `spec`, or fails
    /// saying that another instance runs.
    pub fn take(spec: &Path) -> CsiResult<Self> {
        let path = spec.with_extension("lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| CsiError::io("opening", &path, e))?;
        match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(lock) => Ok(Self { _lock: lock }),
            Err((_, errno)) => Err(CsiError::Internal {
                detail: format!(
                    "another process holds {} ({errno}): this volume's process already runs",
                    path.display()
                ),
            }),
        }
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> CsiResult<()> {
    twinvol_engine::process::write_atomic(path, bytes).map_err(|e| CsiError::io("writing", path, e))
}

/// Whether `pid` is alive, not a zombie, and started with `spec` on its
/// command line.
pub fn is_ours(pid: u32, spec: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let spec = spec.as_os_str().as_encoded_bytes();
    let names_spec = cmdline.split(|b| *b == 0).any(|arg| arg == spec);
    names_spec && !is_zombie(pid)
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with(['Z', 'X'])
        })
        .unwrap_or(true)
}

/// How to start a data-plane process.
#[derive(Debug, Clone)]
pub struct Launch {
    /// This binary.
    pub program: PathBuf,
    /// `frontend` or `replica`.
    pub mode: &'static str,
    /// Environment to pass on (the kubeconfig, log settings).
    pub env: Vec<(String, String)>,
    /// Move the process into this cgroup (v1: in every hierarchy; v2: the
    /// unified one), relative to the hierarchies' roots.
    pub cgroup: Option<String>,
}

/// Starts the process described by `files` (its spec already written),
/// detached. Returns its pid.
pub fn spawn(launch: &Launch, files: &ProcessFiles) -> CsiResult<u32> {
    if let Some(dir) = files.log().parent() {
        std::fs::create_dir_all(dir).map_err(|e| CsiError::io("creating directory", dir, e))?;
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.log())
        .map_err(|e| CsiError::io("opening", files.log(), e))?;
    let err = log
        .try_clone()
        .map_err(|e| CsiError::io("duplicating", files.log(), e))?;
    let _ = std::fs::remove_file(files.ready());
    let mut command = Command::new(&launch.program);
    command
        .arg("--mode")
        .arg(launch.mode)
        .arg("--spec")
        .arg(files.spec())
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .envs(launch.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    // SAFETY: setsid is async-signal-safe and touches no memory of the
    // parent; it only makes the child the leader of a new session.
    unsafe {
        command.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command
        .spawn()
        .map_err(|e| CsiError::io("starting", &launch.program, e))?;
    let pid = child.id();
    if let Err(e) = write_atomic(&files.pid(), pid.to_string().as_bytes()) {
        // Untracked, it would hold the volume's port and files while every
        // later start fails: stop it.
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    if let Some(cgroup) = &launch.cgroup
        && let Err(e) = move_to_cgroup(pid, cgroup)
    {
        // Left in the container's cgroup it would die with the container
        // at the next upgrade, unnoticed: stop it now and say why.
        let _ = child.kill();
        let _ = child.wait();
        let _ = std::fs::remove_file(files.pid());
        return Err(e);
    }
    // Reap it if it ends while this service still runs (after a restart
    // of the service, init does).
    std::thread::Builder::new()
        .name(format!("reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })
        .map_err(|e| CsiError::Internal {
            detail: format!("cannot start a reaper thread: {e}"),
        })?;
    tracing::info!(pid, mode = launch.mode, spec = %files.spec().display(), "started data-plane process");
    Ok(pid)
}

/// Moves `pid` into `cgroup` under every mounted hierarchy.
///
/// An absolute `cgroup` (`/twinvol-dataplane`) is taken from each
/// hierarchy's root. A relative one (`twinvol-dataplane`, the chart's
/// default) goes under the kubelet's cgroup root in each hierarchy — what
/// precedes the first `kubepods` component of this process's own cgroup
/// there (`/` on most nodes; a node's own group where several kubelets
/// share a host, as on the cluster bed) — so that the data plane stays
/// inside its node's tree whatever the kubelet's layout. A hierarchy the
/// kubelet does not use (this process is in no `kubepods` group there) is
/// left alone; moving into none at all is an error.
fn move_to_cgroup(pid: u32, cgroup: &str) -> CsiResult<()> {
    let root = Path::new("/sys/fs/cgroup");
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    // (hierarchy directory, its name in /proc/self/cgroup: "" for v2).
    let mut hierarchies: Vec<(PathBuf, String)> = vec![];
    if root.join("cgroup.controllers").exists() {
        hierarchies.push((root.to_owned(), String::new()));
    } else if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            let path = entry.path();
            // Skip the symlinks (cpu -> cpu,cpuacct). The v2 hierarchy of a
            // hybrid system (`unified`) counts too: the kubelet makes the
            // pod's group there as well, and cannot remove it (the old pod
            // then never finishes terminating) while a process is left in it.
            let real = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
            if real && path.join("cgroup.procs").exists() {
                let name = if path.join("cgroup.controllers").exists() {
                    String::new()
                } else {
                    entry.file_name().to_string_lossy().into_owned()
                };
                hierarchies.push((path, name));
            }
        }
    }
    let mut moved = 0;
    for (hierarchy, name) in hierarchies {
        let Some(target) = dataplane_cgroup_path(cgroup, &own, &name) else {
            continue;
        };
        let dir = hierarchy.join(target.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).map_err(|e| CsiError::io("creating cgroup", &dir, e))?;
        // cgroup v1's cpuset takes no task until the group has CPUs and
        // memory nodes: its parent's (v2 inherits them).
        if !name.is_empty() {
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let path = dir.join(file);
                let empty = std::fs::read_to_string(&path).is_ok_and(|v| v.trim().is_empty());
                let parent = dir.parent().map(|p| p.join(file));
                if let (true, Some(parent)) = (empty, parent.filter(|p| p.exists())) {
                    let value = std::fs::read_to_string(&parent)
                        .map_err(|e| CsiError::io("reading", &parent, e))?;
                    std::fs::write(&path, value.trim())
                        .map_err(|e| CsiError::io("writing", &path, e))?;
                }
            }
        }
        let procs = dir.join("cgroup.procs");
        std::fs::write(&procs, pid.to_string()).map_err(|e| CsiError::io("writing", &procs, e))?;
        moved += 1;
    }
    if moved == 0 {
        return Err(CsiError::Internal {
            detail: format!(
                "no cgroup hierarchy to move the data plane into {cgroup:?} (this process's cgroups: {})",
                own.trim().replace('\n', "; ")
            ),
        });
    }
    Ok(())
}

/// The cgroup path (from the hierarchy's root) for the data plane in the
/// hierarchy named `hierarchy` (`cpu,cpuacct`, `systemd` for
/// `name=systemd`, `""` for v2): `cgroup` itself when absolute, else under
/// the kubelet's cgroup root as read from that hierarchy's line of `own`
/// (this process's `/proc/self/cgroup`). None: the kubelet does not use
/// that hierarchy for this process (no `kubepods` group in it), or no line
/// names it.
fn dataplane_cgroup_path(cgroup: &str, own: &str, hierarchy: &str) -> Option<String> {
    if cgroup.starts_with('/') {
        return Some(cgroup.to_owned());
    }
    let line = own.lines().find_map(|line| {
        let mut fields = line.splitn(3, ':');
        let (_, names, path) = (fields.next()?, fields.next()?, fields.next()?);
        let named = names == hierarchy || names.strip_prefix("name=") == Some(hierarchy);
        named.then_some(path)
    })?;
    let parts: Vec<&str> = line.split('/').collect();
    let at = parts.iter().position(|p| p.starts_with("kubepods"))?;
    Some(format!(
        "{}/{}",
        parts[..at].join("/").trim_end_matches('/'),
        cgroup
    ))
}

/// Stops the process of `files`: SIGTERM, then SIGKILL after `grace`.
/// Returns once it is gone. Nothing running is fine.
pub async fn stop(files: &ProcessFiles, grace: Duration) -> CsiResult<()> {
    let Some(pid) = files.running() else {
        let _ = std::fs::remove_file(files.pid());
        return Ok(());
    };
    let target = Pid::from_raw(i32::try_from(pid).map_err(|_| CsiError::Internal {
        detail: format!("pid {pid} out of range"),
    })?);
    let _ = kill(target, Signal::SIGTERM);
    let deadline = Instant::now() + grace;
    while is_ours(pid, &files.spec()) {
        if Instant::now() >= deadline {
            tracing::warn!(pid, spec = %files.spec().display(), "did not stop within {grace:?}: killing it");
            let _ = kill(target, Signal::SIGKILL);
            let killed = Instant::now() + Duration::from_secs(10);
            while is_ours(pid, &files.spec()) && Instant::now() < killed {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = std::fs::remove_file(files.pid());
    Ok(())
}

/// Waits until the process wrote its ready file, failing early if it died
/// (with the end of its log) or after `timeout`.
pub async fn wait_ready(
    files: &ProcessFiles,
    timeout: Duration,
) -> CsiResult<Vec<(String, String)>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(entries) = files.ready_entries() {
            return Ok(entries);
        }
        if files.running().is_none() {
            return Err(CsiError::Internal {
                detail: format!(
                    "the {} process exited before it was ready; its log ({}) ends with: {}",
                    files.role,
                    files.log().display(),
                    log_tail(&files.log(), 8)
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(CsiError::Timeout {
                what: format!("the {} process becoming ready", files.role),
                waited: timeout,
                last: log_tail(&files.log(), 3),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The last `lines` lines of a log file.
pub fn log_tail(path: &Path, lines: usize) -> String {
    match std::fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join(" | ")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// Creates `path` as an empty file if it does not exist.
pub fn touch(path: &Path) -> CsiResult<()> {
    File::options()
        .create(true)
        .append(true)
        .open(path)
        .map(drop)
        .map_err(|e| CsiError::io("creating", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_dataplane_cgroup_goes_under_the_kubelets_root() {
        let bed = "12:pids:/tsc3-a1/kubepods/besteffort/pod1/abc\n\
                   4:cpu,cpuacct:/tsc3-a1/kubepods/besteffort/pod1/abc\n\
                   3:net_cls,net_prio:/\n\
                   1:name=systemd:/tsc3-a1/kubepods/besteffort/pod1/abc\n0::/\n";
        let path = |h: &str| dataplane_cgroup_path("twinvol-dataplane", bed, h);
        assert_eq!(path("pids").as_deref(), Some("/tsc3-a1/twinvol-dataplane"));
        assert_eq!(
            path("cpu,cpuacct").as_deref(),
            Some("/tsc3-a1/twinvol-dataplane")
        );
        assert_eq!(
            path("systemd").as_deref(),
            Some("/tsc3-a1/twinvol-dataplane")
        );
        // Hierarchies the kubelet does not use, or that no line names.
        assert_eq!(path("net_cls,net_prio"), None);
        assert_eq!(path("hugetlb"), None);
        let plain = "4:memory:/kubepods/burstable/pod2/def\n";
        assert_eq!(
            dataplane_cgroup_path("twinvol-dataplane", plain, "memory").as_deref(),
            Some("/twinvol-dataplane")
        );
        // cgroup v2, systemd driver.
        let v2 = "0::/kubepods.slice/kubepods-besteffort.slice/x.scope\n";
        assert_eq!(dataplane_cgroup_path("dp", v2, "").as_deref(), Some("/dp"));
        // Not in a pod (a test, a host service): nowhere.
        assert_eq!(dataplane_cgroup_path("dp", "0::/user.slice\n", ""), None);
        assert_eq!(
            dataplane_cgroup_path("/abs/dp", bed, "hugetlb").as_deref(),
            Some("/abs/dp"),
            "an absolute path is taken as given"
        );
    }

    #[tokio::test]
    async fn a_detached_process_is_recognised_by_its_spec_and_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ProcessFiles::new(dir.path(), "frontend");
        files
            .write_spec(&serde_json::json!({"x": 1}))
            .expect("spec");
        // A stand-in program that names the spec on its command line as
        // the real one does (`--mode frontend --spec FILE`) and stays up.
        let script = dir.path().join("prog");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 300\n").expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let launch = Launch {
            program: script,
            mode: "frontend",
            env: vec![],
            cgroup: None,
        };
        let pid = spawn(&launch, &files).expect("spawns");
        // `exec sleep` replaces the command line: the process is no longer
        // recognisably ours, exactly as a reused pid would not be.
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_ours(pid, &files.spec()) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            files.running().is_none(),
            "a pid running another program is not ours"
        );
        let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
    }

    #[test]
    fn a_second_instance_cannot_take_the_lock() {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = dir.path().join("frontend.json");
        let first = InstanceLock::take(&spec).expect("first");
        let again = InstanceLock::take(&spec);
        assert!(again.is_err(), "a second instance runs beside the first");
        drop(first);
        InstanceLock::take(&spec).expect("free once the first is gone");
    }

    #[tokio::test]
    async fn a_process_naming_the_spec_is_ours_until_stopped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let files = ProcessFiles::new(dir.path(), "replica");
        files.write_spec(&serde_json::json!({})).expect("spec");
        let script = dir.path().join("prog");
        // sh keeps its arguments: `prog --mode replica --spec FILE`.
        std::fs::write(&script, "#!/bin/sh\nwhile :; do sleep 1; done\n").expect("script");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let launch = Launch {
            program: script,
            mode: "replica",
            env: vec![],
            cgroup: None,
        };
        let pid = spawn(&launch, &files).expect("spawns");
        assert_eq!(files.running(), Some(pid));
        let sid = nix::unistd::getsid(Some(Pid::from_raw(pid as i32))).expect("sid");
        assert_eq!(sid.as_raw(), pid as i32, "leads its own session");
        stop(&files, Duration::from_secs(5)).await.expect("stops");
        assert!(files.running().is_none());
        assert!(!files.pid().exists());
    }
}
