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

/// The size in bytes of the ext4 filesystem on `device`, read from its
/// superblock (1024 bytes in: blocks count, low and, with the 64bit
/// feature, high word; log2 of the block size less 10), or None when the
/// device holds no ext2/3/4 superblock.
pub fn ext4_size(device: &Path) -> CsiResult<Option<u64>> {
    use std::io::{Read, Seek, SeekFrom};
    let mut sb = [0u8; 1024];
    let mut file = std::fs::File::open(device).map_err(|e| CsiError::Internal {
        detail: format!("opening {} to read its superblock: {e}", device.display()),
    })?;
    file.seek(SeekFrom::Start(1024))
        .and_then(|_| file.read_exact(&mut sb))
        .map_err(|e| CsiError::Internal {
            detail: format!("reading the superblock of {}: {e}", device.display()),
        })?;
    Ok(parse_ext4_size(&sb))
}

fn parse_ext4_size(sb: &[u8; 1024]) -> Option<u64> {
    const MAGIC: u16 = 0xEF53;
    const INCOMPAT_64BIT: u32 = 0x80;
    let u32_at = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != MAGIC {
        return None;
    }
    let log = u32_at(0x18);
    if log > 6 {
        return None; // block sizes above 64 KiB do not exist
    }
    let mut blocks = u64::from(u32_at(0x04));
    if u32_at(0x60) & INCOMPAT_64BIT != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    blocks.checked_mul(1024u64 << log)
}

/// Grows an unmounted ext4 filesystem to fill `device` when the device is
/// larger (the volume was expanded while it was not staged here): `e2fsck
/// -f -p` (resize2fs works only on a freshly checked filesystem), then
/// `resize2fs`. Unlike the online resize this needs no CAP_SYS_RESOURCE.
/// Returns the filesystem's size before and after, or None when it
/// already filled the device.
pub async fn grow_unmounted_ext4(device: &Path, device_size: u64) -> CsiResult<Option<(u64, u64)>> {
    let Some(before) = ext4_size(device)? else {
        return Ok(None);
    };
    // Less than one 4 KiB block of slack is what mkfs leaves; grow only
    // for more.
    if before + 4096 > device_size {
        return Ok(None);
    }
    let dev = path_str(device)?;
    let checked = command::run_any("e2fsck", &["-f", "-p", dev]).await?;
    // 0: clean; 1: errors corrected. Anything else is left to a person.
    if !matches!(checked.code, Some(0 | 1)) {
        return Err(CsiError::Command {
            command: format!("e2fsck -f -p {dev}"),
            status: format!("{:?}", checked.code),
            stderr: format!("{}{}", checked.stdout.trim(), checked.stderr.trim()),
        });
    }
    command::run("resize2fs", &[dev]).await?;
    let after = ext4_size(device)?.unwrap_or(before);
    Ok(Some((before, after)))
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

    /// A 64 MiB file of zeroes in a temporary directory (kept while the
    /// returned guard lives), and its open handle.
    fn blank_image() -> (tempfile::TempDir, std::path::PathBuf, std::fs::File) {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("img");
        let f = std::fs::File::create(&image).expect("create");
        f.set_len(64 << 20).expect("size");
        (dir, image, f)
    }

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
        let (_dir, image, _) = blank_image();
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

    #[test]
    fn a_superblock_gives_the_size_and_anything_else_none() {
        let mut sb = [0u8; 1024];
        assert_eq!(parse_ext4_size(&sb), None);
        sb[0x38..0x3a].copy_from_slice(&0xEF53u16.to_le_bytes());
        sb[0x04..0x08].copy_from_slice(&1000u32.to_le_bytes());
        sb[0x18..0x1c].copy_from_slice(&2u32.to_le_bytes()); // 4 KiB blocks
        assert_eq!(parse_ext4_size(&sb), Some(4_096_000));
        // the high word counts only with the 64bit feature
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&sb), Some(4_096_000));
        sb[0x60..0x64].copy_from_slice(&0x80u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&sb), Some(((1u64 << 32) + 1000) * 4096));
        sb[0x18..0x1c].copy_from_slice(&40u32.to_le_bytes());
        assert_eq!(parse_ext4_size(&sb), None);
    }

    #[tokio::test]
    async fn an_unmounted_ext4_grows_to_its_larger_device_with_its_files() {
        let (dir, image, f) = blank_image();
        assert!(ensure(&image, FsType::Ext4, "v").await.expect("mkfs"));
        assert_eq!(ext4_size(&image).expect("read"), Some(64 << 20));
        assert_eq!(
            grow_unmounted_ext4(&image, 64 << 20)
                .await
                .expect("nothing"),
            None,
            "a filesystem filling its device is left alone"
        );
        // A file on it (written with debugfs, no mount needed), and a
        // superblock mounted since its last check, as a used volume's is
        // (resize2fs refuses it without the e2fsck -f).
        let content = dir.path().join("content");
        std::fs::write(&content, b"kept across the resize").expect("content");
        let img = image.display().to_string();
        for request in [
            format!("write {} kept", content.display()),
            "ssv lastcheck 20250101".to_owned(),
            "ssv mtime 20260101".to_owned(),
        ] {
            command::run("debugfs", &["-w", "-R", &request, &img])
                .await
                .expect("debugfs");
        }
        f.set_len(96 << 20).expect("grown device");
        assert!(
            command::run("resize2fs", &[&img]).await.is_err(),
            "resize2fs alone refuses a filesystem mounted since its check"
        );
        assert_eq!(
            grow_unmounted_ext4(&image, 96 << 20).await.expect("grown"),
            Some((64 << 20, 96 << 20))
        );
        let read = command::run("debugfs", &["-R", "cat kept", &img])
            .await
            .expect("debugfs cat");
        assert_eq!(read, "kept across the resize");
        assert_eq!(ext4_size(&image).expect("read"), Some(96 << 20));
    }
}
