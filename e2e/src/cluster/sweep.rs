//! Finding and removing everything a cluster slot left on the machine:
//! processes, mounts, loop devices, network namespaces, host interfaces,
//! cgroups and files. The same code serves a clean teardown (a test's
//! `Drop`, `cluster.sh down`) and the clean-up after a crash (the next
//! `up`), and [`find`] is what tests assert on: nothing left.
//!
//! What is ours is decided from the machine, not from bookkeeping: every
//! name carries the slot's prefix (`tsc<s>-`) and every file, socket and
//! mount lives under the slot's root directory, so a sweep of one slot
//! never touches another slot's cluster nor anyone else's namespaces,
//! loop devices or processes. Callers sweep only slots whose lock they hold.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::{
    HarnessError,
    cluster::{
        cgroup,
        cmd::{self, run},
        layout::Slot,
    },
};

/// What of a slot is still on the machine.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Leftovers {
    /// `pid: command line`
    pub processes: Vec<String>,
    pub mounts: Vec<String>,
    pub loop_devices: Vec<String>,
    pub netns: Vec<String>,
    pub links: Vec<String>,
    pub cgroups: Vec<String>,
    pub files: Vec<String>,
}

impl Leftovers {
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_empty() {
            return f.write_str("nothing");
        }
        for (what, items) in [
            ("processes", &self.processes),
            ("mounts", &self.mounts),
            ("loop devices", &self.loop_devices),
            ("network namespaces", &self.netns),
            ("host interfaces", &self.links),
            ("cgroups", &self.cgroups),
            ("files", &self.files),
        ] {
            if !items.is_empty() {
                writeln!(f, "{what}: {}", items.join(", "))?;
            }
        }
        Ok(())
    }
}

/// `root` with a trailing slash, so `/x/tsc1` never matches `/x/tsc12`.
fn under(root: &Path) -> String {
    format!("{}/", root.display())
}

/// Processes that belong to the slot: in one of its cgroups, or naming
/// its root directory on their command line (the control plane, and a
/// node's daemons even if they lost their cgroup).
fn processes(slot: Slot, root: &Path) -> Vec<(i32, String)> {
    let mut pids = BTreeSet::new();
    for name in cgroup::names_with_prefix(&slot.prefix()) {
        pids.extend(cgroup::pids_in(&name));
    }
    let marker = under(root);
    let me = std::process::id() as i32;
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cmdline = fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&marker)
                || cmdline.trim_end().ends_with(&marker[..marker.len() - 1])
            {
                pids.insert(pid);
            }
        }
    }
    pids.into_iter()
        .filter(|&pid| pid != me && !is_zombie(pid))
        .map(|pid| {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            (pid, String::from_utf8_lossy(&cmdline).replace('\0', " "))
        })
        .collect()
}

fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(true)
}

/// Mount points under `root`, in mount order (the host's mount namespace).
fn mounts(root: &Path) -> Vec<String> {
    let marker = under(root);
    let exact = root.display().to_string();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|point| point.starts_with(&marker) || *point == exact)
        .collect()
}

fn unescape_mountinfo(field: &str) -> String {
    field
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// Loop devices whose backing file is under `root`. The kernel names a
/// backing file by its path in the mount namespace that attached it (a
/// pod's `/host/disk.img` shows as `/disk.img`), so a device also counts as
/// ours when its backing inode is a file under `root`.
pub fn loop_devices(root: &Path) -> Vec<String> {
    let marker = under(root);
    let Ok(out) = run(
        "losetup",
        &[
            "--list",
            "--json",
            "--output",
            "NAME,BACK-FILE,BACK-INO,BACK-MAJ:MIN",
        ],
    ) else {
        return Vec::new();
    };
    let Ok(list) = serde_json::from_str::<serde_json::Value>(&out) else {
        return Vec::new();
    };
    let mut ours = Vec::new();
    let mut by_inode = Vec::new();
    for device in list["loopdevices"].as_array().into_iter().flatten() {
        let name = device["name"].as_str().unwrap_or_default().to_owned();
        let file = device["back-file"].as_str().unwrap_or_default();
        if file.starts_with(&marker) {
            ours.push(name);
            continue;
        }
        let inode = match &device["back-ino"] {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        let dev = device["back-maj:min"]
            .as_str()
            .and_then(|m| m.trim().split_once(':'))
            .and_then(|(maj, min)| Some((maj.trim().parse().ok()?, min.trim().parse().ok()?)))
            .map(|(maj, min): (u64, u64)| nix::sys::stat::makedev(maj, min));
        if let (Some(inode), Some(dev)) = (inode, dev) {
            by_inode.push((name, dev, inode));
        }
    }
    if !by_inode.is_empty()
        && let Ok(meta) = fs::metadata(root)
    {
        let wanted: BTreeSet<(u64, u64)> = by_inode
            .iter()
            .filter(|(_, dev, _)| *dev == meta.dev())
            .map(|(_, dev, ino)| (*dev, *ino))
            .collect();
        let found = files_with_inodes(root, meta.dev(), &wanted);
        for (name, dev, ino) in by_inode {
            if found.contains(&(dev, ino)) {
                ours.push(name);
            }
        }
    }
    ours.sort();
    ours
}

/// Which of `wanted` (device, inode) are regular files under `dir`, on
/// `dev` only.
fn files_with_inodes(dir: &Path, dev: u64, wanted: &BTreeSet<(u64, u64)>) -> BTreeSet<(u64, u64)> {
    let mut found = BTreeSet::new();
    if wanted.is_empty() {
        return found;
    }
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.dev() != dev {
                continue;
            }
            if meta.is_dir() {
                stack.push(entry.path());
            } else if meta.is_file() && wanted.contains(&(dev, meta.ino())) {
                found.insert((dev, meta.ino()));
                if found.len() == wanted.len() {
                    return found;
                }
            }
        }
    }
    found
}

fn netns(slot: Slot) -> Vec<String> {
    let prefix = slot.prefix();
    let mut names: Vec<String> = fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

fn links(slot: Slot) -> Vec<String> {
    let prefix = slot.prefix();
    let Ok(out) = run("ip", &["-o", "link", "show"]) else {
        return Vec::new();
    };
    out.lines()
        .filter_map(|line| line.split(": ").nth(1))
        .map(|name| name.split('@').next().unwrap_or(name).to_owned())
        .filter(|name| name.starts_with(&prefix))
        .collect()
}

/// Host-global files the cluster's components leave outside its root:
/// the kubelets' container-log symlinks, libcni's result cache entries
/// for the slot's pod network, and the root directory itself.
fn files(slot: Slot, root: &Path) -> Vec<String> {
    let marker = under(root);
    let mut found = Vec::new();
    if let Ok(entries) = fs::read_dir("/var/log/containers") {
        for entry in entries.flatten() {
            if fs::read_link(entry.path()).is_ok_and(|t| t.starts_with(&marker)) {
                found.push(entry.path().display().to_string());
            }
        }
    }
    let network = format!("{}pods-", slot.prefix());
    if let Ok(entries) = fs::read_dir("/var/lib/cni/results") {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(&network) {
                found.push(entry.path().display().to_string());
            }
        }
    }
    if root.exists() {
        found.push(root.display().to_string());
    }
    found.sort();
    found
}

/// Everything of `slot` still on the machine.
pub fn find(slot: Slot, root: &Path) -> Leftovers {
    Leftovers {
        processes: processes(slot, root)
            .into_iter()
            .map(|(pid, cmd)| format!("{pid}: {cmd}"))
            .collect(),
        mounts: mounts(root),
        loop_devices: loop_devices(root),
        netns: netns(slot),
        links: links(slot),
        cgroups: cgroup::names_with_prefix(&slot.prefix()),
        files: files(slot, root),
    }
}

/// The unix sockets under containerd's hard-coded shim directory
/// (`/run/containerd/s/`) that processes of the slot hold open: a shim
/// killed with SIGKILL leaves its socket file behind.
fn shim_sockets(pids: &[i32]) -> Vec<PathBuf> {
    let mut inodes = BTreeSet::new();
    for pid in pids {
        let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = fs::read_link(fd.path()) {
                let target = target.display().to_string();
                if let Some(inode) = target
                    .strip_prefix("socket:[")
                    .and_then(|t| t.strip_suffix(']'))
                {
                    inodes.insert(inode.to_owned());
                }
            }
        }
    }
    let mut paths = Vec::new();
    for table in ["/proc/net/unix"] {
        for line in fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
        {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if let (Some(inode), Some(path)) = (fields.get(6), fields.get(7))
                && inodes.contains(*inode)
                && path.starts_with("/run/containerd/s/")
            {
                paths.push(PathBuf::from(path));
            }
        }
    }
    paths
}

/// Unmounts everything mounted at or below `root` (deepest and latest
/// first, detaching so a busy mount cannot stop the sweep).
pub fn unmount_below(root: &Path) -> Result<(), HarnessError> {
    for _ in 0..20 {
        let points = mounts(root);
        if points.is_empty() {
            return Ok(());
        }
        for point in points.iter().rev() {
            let _ = nix::mount::umount2(point.as_str(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let left = mounts(root);
    if left.is_empty() {
        Ok(())
    } else {
        Err(HarnessError::Cluster(format!(
            "mounts under {} survive unmounting: {}",
            root.display(),
            left.join(", ")
        )))
    }
}

/// Removes `dir` and everything in it without ever leaving its filesystem
/// (a mount that appeared under it is left alone rather than emptied).
pub fn remove_tree(dir: &Path) -> Result<(), HarnessError> {
    let Ok(meta) = fs::symlink_metadata(dir) else {
        return Ok(());
    };
    remove_tree_on(dir, meta.dev())
}

fn remove_tree_on(path: &Path, dev: u64) -> Result<(), HarnessError> {
    let io = |action, source| HarnessError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("inspecting", e)),
    };
    if meta.is_dir() {
        if meta.dev() != dev {
            return Err(HarnessError::Cluster(format!(
                "{} is another filesystem (still mounted): not removing it",
                path.display()
            )));
        }
        for entry in fs::read_dir(path).map_err(|e| io("listing", e))? {
            let entry = entry.map_err(|e| io("listing", e))?;
            remove_tree_on(&entry.path(), dev)?;
        }
        match fs::remove_dir(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", e)),
        }
    } else {
        match fs::remove_file(path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io("removing", e)),
        }
    }
}

/// How the sweep ends: with the root directory gone, or kept (for debugging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepFiles {
    No,
    Yes,
}

/// Removes every leftover of `slot` (whose lock the caller holds). Returns
/// what was found before; fails with what could not be removed.
pub fn sweep(slot: Slot, root: &Path, keep: KeepFiles) -> Result<Leftovers, HarnessError> {
    let before = find(slot, root);
    if before.is_empty() {
        return Ok(before);
    }
    // 1. Processes: whole node cgroups first (freeze, kill, thaw), then
    //    whatever else names the root directory.
    let pids: Vec<i32> = processes(slot, root).into_iter().map(|(p, _)| p).collect();
    let sockets = shim_sockets(&pids);
    for name in cgroup::names_with_prefix(&slot.prefix()) {
        let _ = cgroup::NodeCgroup::new(&name).kill_all(Duration::from_secs(20));
    }
    for _ in 0..100 {
        let left = processes(slot, root);
        if left.is_empty() {
            break;
        }
        for (pid, _) in left {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for socket in sockets {
        let _ = fs::remove_file(socket);
    }
    // 2. Mounts (their loop devices are free only afterwards).
    let mut errors = Vec::new();
    if let Err(e) = unmount_below(root) {
        errors.push(e.to_string());
    }
    // 3. Loop devices.
    for device in loop_devices(root) {
        if let Err(e) = run("losetup", &["-d", &device]) {
            errors.push(e.to_string());
        }
    }
    // 4. Network namespaces (their veths go with them), then host interfaces.
    for ns in netns(slot) {
        if let Err(e) = run("ip", &["netns", "delete", &ns]) {
            errors.push(e.to_string());
        }
    }
    // A veth whose peer was in a deleted namespace goes away by itself,
    // asynchronously: only one still there after the attempt is an error.
    for link in links(slot) {
        if let Err(e) = run("ip", &["link", "delete", &link])
            && links(slot).contains(&link)
        {
            errors.push(e.to_string());
        }
    }
    // 5. Cgroups, once empty.
    for name in cgroup::names_with_prefix(&slot.prefix()) {
        if let Err(e) = cgroup::remove_named(&name) {
            errors.push(e.to_string());
        }
    }
    // 6. Files.
    for file in files(slot, root) {
        let path = Path::new(&file);
        if path == root {
            if keep == KeepFiles::No
                && let Err(e) = remove_tree(root)
            {
                errors.push(e.to_string());
            }
        } else if let Err(e) = fs::remove_file(path)
            // Gone meanwhile (listed, then removed by its kubelet or by
            // another sweep, as a cold test command's run saw): what the
            // sweep wants.
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {file}: {e}"));
        }
    }
    let mut after = find(slot, root);
    if keep == KeepFiles::Yes {
        after.files.retain(|f| Path::new(f) != root);
    }
    if errors.is_empty() && after.is_empty() {
        Ok(before)
    } else {
        Err(HarnessError::Cluster(format!(
            "sweeping slot {} left:\n{after}\nerrors: {}",
            slot.number(),
            errors.join("; ")
        )))
    }
}

/// Sweeps every slot no live process holds: the leftovers of crashed runs.
/// Returns the slots that had something.
pub fn sweep_abandoned(base: &Path) -> Result<Vec<(Slot, Leftovers)>, HarnessError> {
    let mut swept = Vec::new();
    for slot in Slot::all() {
        let root = slot.root(base);
        if find(slot, &root).is_empty() {
            continue;
        }
        if let Some(_lock) = crate::cluster::slot::SlotLock::try_acquire(slot)? {
            let found = sweep(slot, &root, KeepFiles::No)?;
            if !found.is_empty() {
                swept.push((slot, found));
            }
        }
    }
    Ok(swept)
}

/// Whether `ping` is there (the fault checks need it).
pub fn have_ping() -> bool {
    cmd::output("ping", &["-V"]).is_ok_and(|o| o.status.success())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remove_tree_removes_files_links_and_directories() {
        let dir = tempfile::tempdir().expect("temp dir");
        let root = dir.path().join("tree");
        fs::create_dir_all(root.join("a/b")).expect("dirs");
        fs::write(root.join("a/b/file"), b"x").expect("file");
        std::os::unix::fs::symlink("/etc", root.join("a/etc-link")).expect("symlink");
        remove_tree(&root).expect("removed");
        assert!(!root.exists());
        assert!(Path::new("/etc/hostname").exists() || Path::new("/etc").exists());
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo("/a\\040b"), "/a b");
    }

    #[test]
    fn an_unused_slot_root_has_no_leftovers() {
        let dir = tempfile::tempdir().expect("temp dir");
        // A slot number nobody uses in this unit test: names are prefix-based,
        // so only check the root-based parts.
        let root = dir.path().join("no-such-cluster");
        assert!(mounts(&root).is_empty());
        assert!(loop_devices(&root).is_empty());
        assert!(files(Slot::new(15).expect("valid"), &root).is_empty());
    }
}
