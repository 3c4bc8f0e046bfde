//! The mount table (`/proc/self/mountinfo`) and mounting, bind-mounting and
//! unmounting with the standard tools.
//!
//! The node plugin runs in the host's mount namespace (a DaemonSet with
//! `mountPropagation: Bidirectional`, or a host process entered with
//! `nsenter --net` only), so its view of the table is the one kubelet and
//! the container runtime see.

use std::path::{Path, PathBuf};

use crate::error::{CsiError, CsiResult};

use super::command;

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `major:minor` of the mounted filesystem's device.
    pub device: String,
    /// The path inside the filesystem that is mounted (`/` unless a bind
    /// mount of a subdirectory).
    pub root: String,
    pub mount_point: PathBuf,
    pub fs_type: String,
    pub source: String,
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(v) = field
                .get(i + 1..i + 4)
                .and_then(|d| u8::from_str_radix(d, 8).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                device: (*left.get(2)?).to_owned(),
                root: unescape(left.get(3)?),
                mount_point: PathBuf::from(unescape(left.get(4)?)),
                fs_type: (*right.first()?).to_owned(),
                source: unescape(right.get(1).copied().unwrap_or("")),
            })
        })
        .collect()
}

/// The current mount table.
pub fn table() -> CsiResult<Vec<Mount>> {
    let path = "/proc/self/mountinfo";
    std::fs::read_to_string(path)
        .map(|t| parse(&t))
        .map_err(|e| CsiError::io("reading", path, e))
}

/// The last (topmost) mount at `path`, if any.
pub fn mounted_at(path: &Path) -> CsiResult<Option<Mount>> {
    Ok(table()?.into_iter().rev().find(|m| m.mount_point == path))
}

/// Mounts the filesystem on `device` at `target` (created if missing).
pub async fn mount(
    device: &str,
    target: &Path,
    fs_type: &str,
    options: &[String],
) -> CsiResult<()> {
    create_dir(target)?;
    let target = path_str(target)?;
    let mut args = vec!["-t", fs_type];
    let joined = options.join(",");
    if !joined.is_empty() {
        args.extend(["-o", joined.as_str()]);
    }
    args.extend([device, target]);
    command::run("mount", &args).await.map(drop)
}

/// Bind-mounts `source` at `target` (which must exist), read-only if asked.
pub async fn bind(
    source: &Path,
    target: &Path,
    read_only: bool,
    options: &[String],
) -> CsiResult<()> {
    let (s, t) = (path_str(source)?, path_str(target)?);
    command::run("mount", &["--bind", s, t]).await?;
    let mut remount: Vec<String> = vec!["remount".into(), "bind".into()];
    if read_only {
        remount.push("ro".into());
    }
    remount.extend(options.iter().filter(|o| *o != "bind").cloned());
    if remount.len() > 2 {
        let opts = remount.join(",");
        if let Err(e) = command::run("mount", &["-o", &opts, t]).await {
            // Never leave a writable bind mount behind a read-only request.
            let _ = command::run("umount", &[t]).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts every mount stacked at `target`; nothing mounted is fine.
pub async fn unmount_all(target: &Path) -> CsiResult<()> {
    while mounted_at(target)?.is_some() {
        command::run("umount", &[path_str(target)?]).await?;
    }
    Ok(())
}

/// Detaches a mount whose server is gone (a FUSE mount of a dead
/// frontend: "Transport endpoint is not connected").
pub async fn unmount_lazy(target: &Path) -> CsiResult<()> {
    while mounted_at(target)?.is_some() {
        command::run("umount", &["-l", path_str(target)?]).await?;
    }
    Ok(())
}

/// Processes (`pid (name) at mountpoint`, one per mount namespace) whose
/// mount namespace mounts the device `major:minor` — other than ours.
pub fn namespaces_mounting(dev: &str) -> Vec<String> {
    let own = std::fs::read_link("/proc/self/ns/mnt").ok();
    let mut seen = std::collections::HashSet::new();
    let mut out = vec![];
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in procs.flatten() {
        let pid = entry.file_name();
        let Some(pid) = pid
            .to_str()
            .filter(|p| p.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if Some(&ns) == own.as_ref() || !seen.insert(ns) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        if let Some(m) = parse(&text).into_iter().find(|m| m.device == dev) {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            out.push(format!(
                "pid {pid} ({}) at {}",
                comm.trim(),
                m.mount_point.display()
            ));
        }
    }
    out
}

pub fn create_dir(path: &Path) -> CsiResult<()> {
    std::fs::create_dir_all(path).map_err(|e| CsiError::io("creating directory", path, e))
}

pub fn path_str(path: &Path) -> CsiResult<&str> {
    path.to_str().ok_or_else(|| CsiError::Internal {
        detail: format!("path {} is not UTF-8", path.display()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
35 22 0:31 / /tmp/fuse\\040dir rw,nosuid,nodev,relatime shared:20 - fuse twinvol /dev/fuse rw,user_id=0
36 22 7:3 / /var/lib/kubelet/plugins/stage rw,relatime shared:21 - ext4 /dev/loop3 rw
37 22 7:3 / /var/lib/kubelet/pods/x/mount rw,relatime shared:21 - ext4 /dev/loop3 rw
38 22 0:5 /loop3 /var/lib/kubelet/pods/y/dev rw shared:2 - devtmpfs udev rw,size=10g
";

    #[test]
    fn mountinfo_lines_are_parsed_with_escapes() {
        let mounts = parse(SAMPLE);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[1].mount_point, PathBuf::from("/tmp/fuse dir"));
        assert_eq!(mounts[1].fs_type, "fuse");
        assert_eq!(mounts[2].source, "/dev/loop3");
        assert_eq!(mounts[2].device, "7:3");
        assert_eq!(mounts[4].root, "/loop3");
        assert_eq!(unescape("a\\134b"), "a\\b");
        assert_eq!(unescape("tail\\"), "tail\\");
    }

    #[test]
    fn the_root_is_mounted() {
        let root = mounted_at(Path::new("/"))
            .expect("mountinfo")
            .expect("mounted");
        assert_eq!(root.mount_point, PathBuf::from("/"));
        assert!(
            mounted_at(Path::new("/no/such/dir"))
                .expect("mountinfo")
                .is_none()
        );
    }
}
