//! Making the filesystem of a staged volume, never over data.
//!
//! Before `mkfs`, `blkid -p` (low-level probing, no cache) looks for any
//! signature on the device — a filesystem, a partition table, LVM, RAID.
//! Only a device where it finds none is formatted; a device holding the
//! filesystem asked for is mounted as it is; any other signature is an
//! error naming what was found, so a volume's data is never formatted away
//! by a wrong `fsType`.

use std::path::Path;

use crate::error::{CsiError, CsiResult};
use crate::params::FsType;

use super::command;
use super::mounts::path_str;

/// What `blkid -p` found on a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// No signature at all: a fresh volume.
    Empty,
    /// A filesystem of this type (`TYPE=`).
    Filesystem(String),
    /// Something else: a partition table (`PTTYPE=`) or another usage.
    Other(String),
}

/// Reads `blkid -p -o export` output.
fn parse_probe(export: &str) -> Content {
    let field = |key: &str| {
        export.lines().find_map(|l| {
            l.strip_prefix(key)
                .and_then(|v| v.strip_prefix('='))
                .map(str::to_owned)
        })
    };
    if let Some(t) = field("TYPE") {
        return Content::Filesystem(t);
    }
    if let Some(t) = field("PTTYPE") {
        return Content::Other(format!("a {t} partition table"));
    }
    match field("USAGE") {
        Some(u) => Content::Other(format!("a signature with usage {u}")),
        None => Content::Other(format!("an unrecognised signature ({})", export.trim())),
    }
}

/// What is on `device`.
pub async fn probe(device: &Path) -> CsiResult<Content> {
    let dev = path_str(device)?;
    let done = command::run_any("blkid", &["-p", "-o", "export", dev]).await?;
    match done.code {
        Some(0) => Ok(parse_probe(&done.stdout)),
        // blkid's "nothing found".
        Some(2) => Ok(Content::Empty),
        code => Err(CsiError::Command {
            command: format!("blkid -p -o export {dev}"),
            status: format!("{code:?}"),
            stderr: done.stderr.trim().to_owned(),
        }),
    }
}

/// Makes `fs` on `device` unless it already holds it; refuses a device
/// holding anything else.
pub async fn ensure(device: &Path, fs: FsType, volume: &str) -> CsiResult<bool> {
    match probe(device).await? {
        Content::Filesystem(found) if found == fs.as_str() => Ok(false),
        Content::Filesystem(found) => Err(CsiError::Precondition {
            volume: volume.to_owned(),
            detail: format!(
                "it holds a {found} filesystem but {fs} was asked for; it is left as it is (use fsType {found})"
            ),
        }),
        Content::Other(what) => Err(CsiError::Precondition {
            volume: volume.to_owned(),
            detail: format!("it holds {what}, not a filesystem; it is not formatted"),
        }),
        Content::Empty => {
            mkfs(device, fs).await?;
            Ok(true)
        }
    }
}

/// Grows the filesystem on `device`, mounted at `mountpoint`, online to
/// fill the device: `resize2fs` (ext4) or `xfs_growfs` (xfs, which takes
/// the mount point).
pub async fn grow(device: &Path, mountpoint: &Path, fs: FsType, volume: &str) -> CsiResult<()> {
    match fs {
        FsType::Ext4 => match command::run("resize2fs", &[path_str(device)?]).await {
            // The kernel refuses an online ext4 resize (EXT4_IOC_RESIZE_FS)
            // without CAP_SYS_RESOURCE; resize2fs only says "Permission
            // denied". (With nothing to grow it succeeds without asking.)
            Err(CsiError::Command { .. }) if !has_sys_resource() => Err(CsiError::Precondition {
                volume: volume.to_owned(),
                detail: "growing a mounted ext4 filesystem needs CAP_SYS_RESOURCE, which this node plugin does not have (give its container the capability, or use xfs); the volume itself has grown".to_owned(),
            }),
            r => r,
        },
        FsType::Xfs => command::run("xfs_growfs", &[path_str(mountpoint)?]).await,
    }
    .map(drop)
}

/// Whether this process has CAP_SYS_RESOURCE in its effective set.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// Makes the filesystem. No discard pass: a new volume reads as zeroes
/// already, and a discard of every block would cross both sites for
/// nothing.
async fn mkfs(device: &Path, fs: FsType) -> CsiResult<()> {
    let dev = path_str(device)?;
    match fs {
        FsType::Ext4 => {
            command::run(
                "mkfs.ext4",
                &[
                    "-q",
                    "-F",
                    "-E",
                    "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                    dev,
                ],
            )
            .await
        }
        FsType::Xfs => command::run("mkfs.xfs", &["-q", "-K", dev]).await,
    }
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_output_is_classified() {
        assert_eq!(
            parse_probe("DEVNAME=/dev/loop0\nUUID=x\nTYPE=ext4\nUSAGE=filesystem\n"),
            Content::Filesystem("ext4".into())
        );
        assert!(matches!(
            parse_probe("DEVNAME=/dev/loop0\nPTUUID=y\nPTTYPE=gpt\n"),
            Content::Other(s) if s.contains("gpt")
        ));
        assert!(matches!(parse_probe("USAGE=crypto\n"), Content::Other(_)));
    }

    #[tokio::test]
    async fn a_file_of_zeroes_is_empty_and_a_made_filesystem_is_found() {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("img");
        let f = std::fs::File::create(&image).expect("create");
        f.set_len(64 << 20).expect("size");
        drop(f);
        assert_eq!(probe(&image).await.expect("blkid"), Content::Empty);
        assert!(ensure(&image, FsType::Ext4, "v").await.expect("mkfs"));
        assert_eq!(
            probe(&image).await.expect("blkid"),
            Content::Filesystem("ext4".into())
        );
        assert!(
            !ensure(&image, FsType::Ext4, "v").await.expect("kept"),
            "not made twice"
        );
        assert!(matches!(
            ensure(&image, FsType::Xfs, "v").await,
            Err(CsiError::Precondition { .. })
        ));
    }
}
