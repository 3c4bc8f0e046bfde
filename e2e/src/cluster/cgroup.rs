//! A node's cgroup: one directory of the same name in every cgroup-v1
//! controller. The node's containerd, kubelet and kube-proxy are started in
//! it, the kubelet uses it as its `cgroupRoot`, and runc puts every
//! container below it; containerd's shims inherit it. So "kill the node"
//! is: freeze the tree, SIGKILL everything in it, thaw — nothing forks away
//! in between, and no process of the node survives, whatever group or
//! session it made for itself.

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::HarnessError;

/// The cgroup-v1 hierarchies (the kubelet wants its cgroup root in each).
pub const CONTROLLERS: [&str; 9] = [
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids", "systemd",
];
/// Hierarchies where runc also creates directories (hybrid mode).
const EXTRA_HIERARCHIES: [&str; 1] = ["unified"];
const ROOT: &str = "/sys/fs/cgroup";

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

/// A node's cgroup, by name (`tsc3-a1`).
#[derive(Debug, Clone)]
pub struct NodeCgroup {
    name: String,
}

impl NodeCgroup {
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The kubelet's `cgroupRoot`.
    pub fn root_path(&self) -> String {
        format!("/{}", self.name)
    }

    fn dir(&self, controller: &str) -> PathBuf {
        Path::new(ROOT).join(controller).join(&self.name)
    }

    /// Creates the directory in every controller (cpuset gets its parent's
    /// CPUs and memory nodes, without which no task may join it).
    pub fn create(&self) -> Result<(), HarnessError> {
        for controller in CONTROLLERS {
            let dir = self.dir(controller);
            fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        }
        let cpuset = self.dir("cpuset");
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = Path::new(ROOT).join("cpuset").join(file);
            let value = fs::read_to_string(&parent).map_err(io_error("reading", &parent))?;
            let path = cpuset.join(file);
            fs::write(&path, value.trim()).map_err(io_error("writing", &path))?;
        }
        Ok(())
    }

    /// The `cgroup.procs` files a process writes its pid to, to join.
    pub fn procs_files(&self) -> Vec<PathBuf> {
        CONTROLLERS
            .iter()
            .map(|c| self.dir(c).join("cgroup.procs"))
            .collect()
    }

    /// Every process anywhere in the node's tree.
    pub fn pids(&self) -> Vec<i32> {
        let mut pids = Vec::new();
        for dir in subtree(&self.dir("pids")) {
            pids.extend(read_pids(&dir.join("cgroup.procs")));
        }
        pids.sort_unstable();
        pids.dedup();
        pids
    }

    /// SIGKILLs every process of the node and waits until none is left.
    pub fn kill_all(&self, timeout: Duration) -> Result<(), HarnessError> {
        let freezer = self.dir("freezer");
        let state = freezer.join("freezer.state");
        let frozen = fs::write(&state, "FROZEN").is_ok();
        if frozen {
            // Freezing is asynchronous; wait (briefly) so nothing forks
            // between the listing and the signal.
            let deadline = Instant::now() + Duration::from_secs(5);
            while fs::read_to_string(&state).is_ok_and(|s| s.trim() == "FREEZING")
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            let pids = self.pids();
            for &pid in &pids {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            if frozen {
                // A frozen task gets its SIGKILL when thawed.
                let _ = fs::write(&state, "THAWED");
            }
            if pids.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(HarnessError::Cluster(format!(
                    "processes {pids:?} of cgroup {} survived SIGKILL for {timeout:?}",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Removes the node's directories in every hierarchy, deepest first
    /// (the kubelet's and runc's included). Processes must be gone.
    pub fn remove(&self) -> Result<(), HarnessError> {
        remove_named(&self.name)
    }
}

/// Removes `/sys/fs/cgroup/<every hierarchy>/<name>` and everything below.
pub fn remove_named(name: &str) -> Result<(), HarnessError> {
    let mut failed = Vec::new();
    for hierarchy in CONTROLLERS.iter().chain(EXTRA_HIERARCHIES.iter()) {
        let top = Path::new(ROOT).join(hierarchy).join(name);
        if !top.exists() {
            continue;
        }
        let mut dirs = subtree(&top);
        // Children before parents.
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        for dir in dirs {
            // A cgroup that just emptied can be busy for a moment.
            let mut removed = false;
            for _ in 0..50 {
                match fs::remove_dir(&dir) {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        removed = true;
                        break;
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
            if !removed {
                failed.push(dir.display().to_string());
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(HarnessError::Cluster(format!(
            "cgroups not removed: {}",
            failed.join(", ")
        )))
    }
}

/// Names of top-level cgroups (in the pids hierarchy, or any) that start with `prefix`.
pub fn names_with_prefix(prefix: &str) -> Vec<String> {
    let mut names = Vec::new();
    for hierarchy in CONTROLLERS.iter().chain(EXTRA_HIERARCHIES.iter()) {
        let Ok(entries) = fs::read_dir(Path::new(ROOT).join(hierarchy)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(prefix)
                && entry.file_type().is_ok_and(|t| t.is_dir())
                && !names.contains(&name)
            {
                names.push(name);
            }
        }
    }
    names
}

/// Every process in `/sys/fs/cgroup/pids/<name>` and below.
pub fn pids_in(name: &str) -> Vec<i32> {
    NodeCgroup::new(name).pids()
}

/// `dir` and every directory below it.
fn subtree(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        if let Ok(entries) = fs::read_dir(&d) {
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
            out.push(d);
        }
    }
    out
}

fn read_pids(path: &Path) -> Vec<i32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    /// Needs root and cgroup v1 (what the test command runs with).
    #[test]
    fn kill_all_kills_what_escaped_the_process_group() {
        let cg = NodeCgroup::new(&format!("tsc-unit-{}", std::process::id()));
        cg.create().expect("cgroup created");
        let files: Vec<String> = cg
            .procs_files()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        // A shell that joins the cgroup, then a grandchild in a new session
        // (as containerd's shims do): killpg of the shell would miss it.
        let script = "for f in \"$@\"; do echo $$ > \"$f\" || exit 125; done; \
                      setsid sleep 300 & exec sleep 300";
        let mut args = vec!["-c".to_owned(), script.to_owned(), "sh".to_owned()];
        args.extend(files);
        let mut child = Command::new("sh").args(&args).spawn().expect("spawns");
        let deadline = Instant::now() + Duration::from_secs(10);
        while cg.pids().len() < 2 {
            assert!(Instant::now() < deadline, "pids seen: {:?}", cg.pids());
            std::thread::sleep(Duration::from_millis(20));
        }
        let before = cg.pids();
        cg.kill_all(Duration::from_secs(10)).expect("all killed");
        let _ = child.wait();
        for pid in before {
            let alive = Path::new(&format!("/proc/{pid}")).exists()
                && !fs::read_to_string(format!("/proc/{pid}/stat"))
                    .unwrap_or_default()
                    .contains(") Z");
            assert!(!alive, "pid {pid} survived");
        }
        cg.remove().expect("removed");
        assert!(names_with_prefix(cg.name()).is_empty());
    }
}
