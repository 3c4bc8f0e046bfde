//! Loop devices over the frontend's FUSE file: the block device of a staged
//! volume on a kernel without NBD or ublk.
//!
//! Loop devices are global to the machine, so the driver only ever detaches
//! the one whose backing file is its own volume's FUSE file (found with
//! `losetup --list`), never by a guess at a device number. Direct I/O
//! (`--direct-io=on`) keeps the page cache out of the loop device, so that
//! data is cached once (in the filesystem above), a flush reaches the
//! frontend as an fsync, and memory reclaim never waits on the frontend.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{CsiError, CsiResult};

use super::command;
use super::mounts::path_str;

#[derive(Deserialize)]
struct Listing {
    #[serde(default)]
    loopdevices: Vec<Entry>,
}

#[derive(Deserialize)]
struct Entry {
    name: String,
    #[serde(rename = "back-file")]
    back_file: Option<String>,
}

/// A loop device and its backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    pub device: PathBuf,
    pub backing: PathBuf,
}

fn parse(json: &str) -> CsiResult<Vec<LoopDevice>> {
    let listing: Listing = serde_json::from_str(json).map_err(|e| CsiError::Internal {
        detail: format!("cannot read the output of losetup --list --json: {e}"),
    })?;
    Ok(listing
        .loopdevices
        .into_iter()
        .filter_map(|e| {
            let back = e.back_file?;
            // A backing file removed while attached reads "(deleted)".
            let back = back.strip_suffix(" (deleted)").unwrap_or(&back).to_owned();
            Some(LoopDevice {
                device: PathBuf::from(e.name),
                backing: PathBuf::from(back),
            })
        })
        .collect())
}

/// Every attached loop device.
pub async fn list() -> CsiResult<Vec<LoopDevice>> {
    let out = command::run(
        "losetup",
        &["--list", "--json", "--output", "NAME,BACK-FILE"],
    )
    .await?;
    if out.trim().is_empty() {
        return Ok(vec![]);
    }
    parse(&out)
}

/// The loop devices backed by `file`.
pub async fn find(file: &Path) -> CsiResult<Vec<PathBuf>> {
    Ok(list()
        .await?
        .into_iter()
        .filter(|d| d.backing == file)
        .map(|d| d.device)
        .collect())
}

/// Makes the loop device read its backing file's size again (`losetup -c`,
/// LOOP_SET_CAPACITY): after the volume grew.
pub async fn refresh_capacity(device: &Path) -> CsiResult<()> {
    command::run("losetup", &["-c", path_str(device)?])
        .await
        .map(drop)
}

/// The loop device over `file`: the one already attached, or a new one.
pub async fn attach(file: &Path) -> CsiResult<PathBuf> {
    if let Some(device) = find(file).await?.into_iter().next() {
        return Ok(device);
    }
    let out = command::run(
        "losetup",
        &["--direct-io=on", "--find", "--show", path_str(file)?],
    )
    .await?;
    let device = out.trim();
    if device.is_empty() {
        return Err(CsiError::Internal {
            detail: format!("losetup attached {} but printed no device", file.display()),
        });
    }
    Ok(PathBuf::from(device))
}

/// `major:minor` of a block device, from sysfs.
pub fn dev_numbers(device: &Path) -> Option<String> {
    let name = device.file_name()?.to_str()?;
    let text = std::fs::read_to_string(format!("/sys/class/block/{name}/dev")).ok()?;
    Some(text.trim().to_owned())
}

/// Detaches the loop devices over `file` and waits until they are gone.
///
/// `losetup -d` of a device still open only marks it to detach on last
/// close. If it is still there after `wait`, something holds it open:
/// typically the filesystem still mounted in another mount namespace (a
/// process that unshared its mounts while the volume was mounted keeps a
/// copy of the mount, and unmounting here does not flush that copy). That
/// is an error naming the holders; the caller must not stop the frontend
/// under it, or that filesystem's unwritten data would be lost.
pub async fn detach_and_wait(
    file: &Path,
    volume: &str,
    wait: std::time::Duration,
) -> CsiResult<()> {
    let devices = find(file).await?;
    for device in &devices {
        command::run("losetup", &["-d", path_str(device)?]).await?;
    }
    let deadline = std::time::Instant::now() + wait;
    loop {
        let left = find(file).await?;
        if left.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            let holders: Vec<String> = left
                .iter()
                .filter_map(|d| dev_numbers(d))
                .flat_map(|n| super::mounts::namespaces_mounting(&n))
                .collect();
            return Err(CsiError::Precondition {
                volume: volume.to_owned(),
                detail: format!(
                    "its block device {} is still open after losetup -d; {}",
                    left.iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    if holders.is_empty() {
                        "some process holds it open".to_owned()
                    } else {
                        format!(
                            "its filesystem is still mounted in other mount namespaces ({}); unmount it there, then unstage again",
                            holders.join("; ")
                        )
                    }
                ),
            });
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// The size of a block device in bytes, from sysfs.
pub fn size(device: &Path) -> CsiResult<u64> {
    let name = device
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| CsiError::Internal {
            detail: format!("{} is not a device path", device.display()),
        })?;
    let path = PathBuf::from(format!("/sys/class/block/{name}/size"));
    let text = std::fs::read_to_string(&path).map_err(|e| CsiError::io("reading", &path, e))?;
    let sectors: u64 = text.trim().parse().map_err(|_| CsiError::Internal {
        detail: format!("{} holds {text:?}, not a number of sectors", path.display()),
    })?;
    Ok(sectors * 512)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listing_is_read_with_deleted_files() {
        let json = r#"{"loopdevices": [
            {"name": "/dev/loop0", "back-file": "/var/lib/twinvol/v1/fuse/v1"},
            {"name": "/dev/loop1", "back-file": "/tmp/img (deleted)"},
            {"name": "/dev/loop2", "back-file": null}
        ]}"#;
        let devices = parse(json).expect("parses");
        assert_eq!(devices.len(), 2);
        assert_eq!(devices[0].device, PathBuf::from("/dev/loop0"));
        assert_eq!(devices[1].backing, PathBuf::from("/tmp/img"));
    }

    #[tokio::test]
    async fn losetup_lists_without_error() {
        list().await.expect("losetup --list works here");
    }
}
