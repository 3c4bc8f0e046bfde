//! The file system the FUSE export mounts: a root directory holding one
//! regular file whose bytes are the volume.
//!
//! Owns the inode table (two fixed inodes), the attributes, and the dispatch
//! of each file operation to the backend. Methods run on fuser's threads and
//! must not block them: every backend call is spawned on the tokio runtime
//! and answers its request from there.

use std::ffi::{OsStr, OsString};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, WriteFlags,
};

use super::budget::Budget;
use crate::frontend::backend::{BackendError, BlockBackend};

const ROOT: INodeNo = INodeNo::ROOT;
pub(super) const FILE: INodeNo = INodeNo(2);
/// Attributes change only when the volume grows, and then the export
/// tells the kernel (`FuseExport::size_changed`): cache them long.
const TTL: Duration = Duration::from_secs(3600);
/// Largest single read or write the kernel sends us.
const MAX_WRITE: u32 = 1024 * 1024;
/// Requests the kernel may queue in the background (async direct I/O from
/// the loop device is background work); the default of 12 starves a loop
/// device's queue.
const MAX_BACKGROUND: u16 = 256;
/// Size of a fresh arena for write payloads.
const ARENA_BYTES: usize = 4 * 1024 * 1024;
/// Read and write data in flight between the kernel and the backend; 16
/// requests of 1 MiB keep the mirror busy (as over NBD).
const BUDGET_BYTES: u64 = 16 * 1024 * 1024;
/// Largest trim or write-zeroes sent to the backend in one call.
const MAX_DISCARD_CHUNK: u64 = 64 * 1024 * 1024;

// fallocate modes (linux/falloc.h).
const FALLOC_FL_KEEP_SIZE: i32 = 0x01;
const FALLOC_FL_PUNCH_HOLE: i32 = 0x02;
const FALLOC_FL_ZERO_RANGE: i32 = 0x10;

/// The mounted file system.
pub(super) struct VolumeFs<B> {
    backend: Arc<B>,
    file_name: OsString,
    rt: tokio::runtime::Handle,
    mounted_at: SystemTime,
    uid: u32,
    gid: u32,
    arena: Mutex<BytesMut>,
    budget: Arc<Budget>,
}

impl<B: BlockBackend> VolumeFs<B> {
    pub(super) fn new(backend: Arc<B>, file_name: OsString, rt: tokio::runtime::Handle) -> Self {
        // SAFETY: getuid/getgid take no arguments and cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        VolumeFs {
            backend,
            file_name,
            rt,
            mounted_at: SystemTime::now(),
            uid,
            gid,
            arena: Mutex::new(BytesMut::new()),
            budget: Budget::new(BUDGET_BYTES),
        }
    }

    /// The volume's size now (it grows online).
    fn size(&self) -> u64 {
        self.backend.size()
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o755, 0, 2),
            FILE => (FileType::RegularFile, 0o600, self.size(), 1),
            _ => return None,
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.mounted_at,
            mtime: self.mounted_at,
            ctime: self.mounted_at,
            crtime: self.mounted_at,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Copies a write's data into the pooled arena: one allocation serves
    /// many writes and is reused once they have all completed. The lock is
    /// held for the copy only, never across an await.
    fn copy_payload(&self, data: &[u8]) -> Bytes {
        let mut arena = match self.arena.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        if arena.capacity() < data.len() {
            arena.reserve(data.len().max(ARENA_BYTES));
        }
        arena.extend_from_slice(data);
        arena.split().freeze()
    }

    /// Answers `reply` with the outcome of `flush` on the backend.
    fn spawn_flush(&self, reply: ReplyEmpty) {
        let backend = self.backend.clone();
        self.rt.spawn(async move {
            match backend.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno_for(&e)),
            }
        });
    }
}

impl<B: BlockBackend> Filesystem for VolumeFs<B> {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_WRITE);
        let _ = config.set_max_readahead(MAX_WRITE);
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        // Kernels without these still work, only slower: take what exists.
        for flag in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_MAX_PAGES] {
            let _ = config.add_capabilities(flag);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match (parent, self.attr(FILE)) {
            (ROOT, Some(attr)) if name == self.file_name.as_os_str() => {
                reply.entry(&TTL, &attr, Generation(0));
            }
            _ => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        // The volume's size, owner and mode are fixed; time updates are
        // accepted and ignored (nothing relies on them).
        if size.is_some_and(|s| s != attr.size) {
            return reply.error(Errno::EINVAL);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        reply.attr(&TTL, &attr);
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        reply.opened(
            FileHandle(0),
            FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
        );
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        // A regular file: reads at or past the end are short, not errors.
        let len = self.size().saturating_sub(offset).min(u64::from(size)) as u32;
        if len == 0 {
            return reply.data(&[]);
        }
        let grant = self.budget.acquire(u64::from(len));
        let backend = self.backend.clone();
        self.rt.spawn(async move {
            match backend.read(offset, len).await {
                Ok(data) => reply.data(&data),
                Err(e) => reply.error(errno_for(&e)),
            }
            drop(grant);
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        // The file cannot grow: a write past the end is short, one starting
        // at or past it fails like a full device.
        let len = self.size().saturating_sub(offset).min(data.len() as u64) as usize;
        if len == 0 {
            return reply.error(Errno::ENOSPC);
        }
        let grant = self.budget.acquire(len as u64);
        let payload = self.copy_payload(&data[..len]);
        let fua = flags.0 & (libc::O_SYNC | libc::O_DSYNC) != 0;
        let backend = self.backend.clone();
        self.rt.spawn(async move {
            match backend.write(offset, payload, fua).await {
                Ok(()) => reply.written(len as u32),
                Err(e) => reply.error(errno_for(&e)),
            }
            drop(grant);
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.spawn_flush(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.spawn_flush(reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, OsStr::new(".")),
            (ROOT, FileType::Directory, OsStr::new("..")),
            (FILE, FileType::RegularFile, self.file_name.as_os_str()),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(*ino, (i + 1) as u64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.size().div_ceil(4096);
        reply.statfs(blocks, 0, 0, 2, 0, 4096, 255, 4096);
    }

    fn access(&self, _req: &Request, ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        match self.attr(ino) {
            Some(_) => reply.ok(),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if ino != FILE {
            return reply.error(Errno::EISDIR);
        }
        let Some(end) = offset.checked_add(length).filter(|end| *end <= self.size()) else {
            return reply.error(Errno::ENOSPC);
        };
        let zero = match mode & !FALLOC_FL_KEEP_SIZE {
            // Plain preallocation inside the file: the volume is allocated.
            0 => return reply.ok(),
            FALLOC_FL_PUNCH_HOLE if mode & FALLOC_FL_KEEP_SIZE != 0 => false,
            FALLOC_FL_ZERO_RANGE => true,
            _ => return reply.error(Errno::from_i32(libc::EOPNOTSUPP)),
        };
        let backend = self.backend.clone();
        self.rt.spawn(async move {
            let mut at = offset;
            while at < end {
                let len = (end - at).min(MAX_DISCARD_CHUNK) as u32;
                let done = if zero {
                    backend.write_zeroes(at, len, false).await
                } else {
                    backend.trim(at, len).await
                };
                if let Err(e) = done {
                    return reply.error(errno_for(&e));
                }
                at += u64::from(len);
            }
            reply.ok();
        });
    }
}

/// Maps a backend failure onto the errno the kernel passes to the loop
/// device (and on to the file system above it).
fn errno_for(error: &BackendError) -> Errno {
    match error {
        BackendError::OutOfRange { .. } => Errno::EINVAL,
        BackendError::Fenced { .. } => Errno::from_i32(libc::ESHUTDOWN),
        BackendError::Io(_) => Errno::EIO,
    }
}
