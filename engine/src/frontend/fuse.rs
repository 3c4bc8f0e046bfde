//! FUSE export: the volume as one regular file in a FUSE mount, so that
//! `losetup --direct-io=on` can turn it into a block device on kernels that
//! have neither the NBD client nor ublk.
//!
//! Owns the mount and its lifetime ([`FuseExport`] unmounts on drop) and the
//! translation of file operations onto the [`BlockBackend`]:
//! read/write → read/write, fsync and flush → flush, fallocate
//! `PUNCH_HOLE` → trim and `ZERO_RANGE` → write-zeroes.
//!
//! Shaped by the pitfalls of FUSE-backed loop devices (see the platform
//! notes): the file is opened `FOPEN_DIRECT_IO` so its pages are not cached a
//! second time above the loop device, with parallel direct writes and async
//! direct I/O so the loop device's queue reaches the daemon concurrently;
//! every request is answered from a tokio task, so the FUSE threads only
//! decode and dispatch; writes are copied into a pooled arena, not one
//! allocation each; a byte budget bounds the data in flight (the kernel
//! would queue far more than the volume needs to stay busy); and the daemon
//! marks itself an I/O flusher
//! (`PR_SET_IO_FLUSHER`) so that memory reclaim never waits on the I/O it is
//! serving.

mod budget;
mod fs;

use std::ffi::{CString, OsStr};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuser::{BackgroundSession, Config, MountOption};

use super::backend::BlockBackend;

/// Why the FUSE export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FuseError {
    #[error("invalid file name {name:?} for the FUSE export: use one path component")]
    BadFileName { name: String },
    #[error("mount point {path} is not a usable directory: {source}")]
    Mountpoint {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("mounting the FUSE export on {path} failed: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A mounted FUSE export. Dropping it unmounts the file system (lazily, if
/// a loop device still holds the file) and stops its threads.
#[derive(Debug)]
pub struct FuseExport {
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    file: PathBuf,
}

impl FuseExport {
    /// The path of the volume's file, for `losetup`.
    pub fn file_path(&self) -> &Path {
        &self.file
    }

    /// Where the export is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// What tells the kernel that the volume grew (see [`SizeNotifier`]).
    pub fn size_notifier(&self) -> Option<SizeNotifier> {
        self.session.as_ref().map(|s| SizeNotifier {
            notifier: s.notifier(),
            file: self.file.clone(),
        })
    }
}

/// Tells the kernel the export's file changed size.
#[derive(Debug, Clone)]
pub struct SizeNotifier {
    notifier: fuser::Notifier,
    file: PathBuf,
}

impl SizeNotifier {
    /// The volume grew: the kernel drops the file's cached attributes and
    /// reads them again at once (a `stat` of the file), so that its size —
    /// what `losetup -c` (LOOP_SET_CAPACITY) gives a loop device over it —
    /// is the new one; returns that size. Blocking (the stat is answered by
    /// the FUSE threads).
    pub fn size_changed(&self) -> std::io::Result<u64> {
        // A negative offset: the attributes only, no page-cache range.
        self.notifier.inval_inode(fs::FILE, -1, 0)?;
        std::fs::metadata(&self.file).map(|m| m.len())
    }
}

impl Drop for FuseExport {
    fn drop(&mut self) {
        let Some(session) = self.session.take() else {
            return;
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "FUSE export unmounted")
            }
            Err(e) => {
                // Busy (a loop device still holds the file): detach the mount
                // so that the path is free; the kernel ends the connection
                // once the last user lets go.
                tracing::warn!(
                    mountpoint = %self.mountpoint.display(),
                    error = %e,
                    "FUSE export busy, detaching it lazily"
                );
                if let Err(e) = lazy_unmount(&self.mountpoint) {
                    tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "lazy unmount failed");
                }
            }
        }
    }
}

/// Mounts the volume at `mountpoint` (an existing directory) as one file
/// named `file_name`, serving its requests on `rt`.
pub fn mount<B: BlockBackend>(
    backend: Arc<B>,
    mountpoint: &Path,
    file_name: &str,
    rt: tokio::runtime::Handle,
) -> Result<FuseExport, FuseError> {
    if file_name.is_empty()
        || file_name == "."
        || file_name == ".."
        || file_name.contains('/')
        || file_name.contains('\0')
    {
        return Err(FuseError::BadFileName {
            name: file_name.to_string(),
        });
    }
    let meta = std::fs::metadata(mountpoint).map_err(|source| FuseError::Mountpoint {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(FuseError::Mountpoint {
            path: mountpoint.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOTDIR),
        });
    }
    // The FUSE threads are spawned from this thread and inherit the flag.
    // It needs CAP_SYS_RESOURCE; without it the export still works, with the
    // reclaim-deadlock risk the flag exists to remove, so say so loudly.
    if let Err(e) = set_io_flusher() {
        tracing::warn!(
            error = %e,
            "cannot mark the FUSE daemon as an I/O flusher (PR_SET_IO_FLUSHER needs \
             CAP_SYS_RESOURCE); under memory pressure a loop device on this export can deadlock"
        );
    }

    let size = backend.size();
    let fs = fs::VolumeFs::new(backend, OsStr::new(file_name).to_os_string(), rt);
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName("twinvol".to_string()),
        MountOption::Subtype("twinvol".to_string()),
        MountOption::DefaultPermissions,
        MountOption::NoAtime,
        MountOption::NoExec,
    ];
    // Two readers of /dev/fuse: one decodes while the other waits; the
    // work itself runs on the tokio runtime.
    config.n_threads = Some(2);
    config.clone_fd = true;
    let session =
        fuser::spawn_mount(fs, mountpoint, &config).map_err(|source| FuseError::Mount {
            path: mountpoint.to_path_buf(),
            source,
        })?;
    let file = mountpoint.join(file_name);
    tracing::info!(file = %file.display(), size, "FUSE export mounted");
    Ok(FuseExport {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        file,
    })
}

/// Marks the calling thread (and the threads it spawns afterwards) as an I/O
/// flusher: its allocations never recurse into I/O and it is not throttled
/// as a writer of dirty pages, so reclaim cannot wait on the daemon that
/// would have to complete it. A frontend process should call this first
/// thing, before starting its runtime, so every thread carries it.
pub fn set_io_flusher() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_IO_FLUSHER takes plain integer arguments and
    // touches no memory of ours.
    let rc = unsafe { libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `PR_SET_IO_FLUSHER` (linux/prctl.h, Linux 5.6); not exported by `libc`.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

fn lazy_unmount(path: &Path) -> std::io::Result<()> {
    let c_path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
