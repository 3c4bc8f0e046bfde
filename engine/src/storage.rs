//! All storage access of the engine goes through one trait, [`Storage`]:
//! the replica's data file and its metadata area alike.
//!
//! Why one narrow trait: crash tests need to make any single storage
//! operation fail, tear or vanish, and they can only do that if nothing
//! reaches the disk another way. Methods are blocking (positional I/O on a
//! file descriptor, no shared cursor, so callers need no lock); async code
//! calls them through [`blocking`], which runs them on tokio's blocking
//! pool, never on a runtime worker.
//!
//! [`FileStorage`] is the implementation for regular files (and block
//! devices). Under the `failpoints` cargo feature, `FaultyStorage` wraps any
//! storage and injects faults at named points `module::op`, e.g.
//! `meta::write_at` or `data::sync`, and can hold writes in a volatile
//! cache until they are synced (a power cut is then the process's death).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A storage operation that failed, with the object and the place.
#[derive(Debug, thiserror::Error)]
#[error("{op} on {target} at offset {offset} failed")]
pub struct StorageError {
    pub op: &'static str,
    pub target: String,
    pub offset: u64,
    #[source]
    pub source: std::io::Error,
}

/// Byte-addressed storage with explicit durability.
pub trait Storage: Send + Sync + 'static {
    /// Human-readable name for errors (the path of a file).
    fn target(&self) -> &str;
    /// Fills `buf` from `offset`; reading past the end is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError>;
    /// Writes all of `buf` at `offset` (not yet durable).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError>;
    /// Makes every completed write durable (fdatasync).
    fn sync(&self) -> Result<(), StorageError>;
    /// Current length in bytes.
    fn size(&self) -> Result<u64, StorageError>;
    /// Sets the length (truncates or extends with zeroes).
    fn set_len(&self, len: u64) -> Result<(), StorageError>;
    /// Reserves blocks for `[0, len)` so that later writes cannot fail for
    /// lack of space; extends the length to `len`.
    fn preallocate(&self, len: u64) -> Result<(), StorageError>;
    /// Discards a range: it reads back as zeroes; blocks may be freed.
    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError>;
    /// Zeroes a range, keeping its blocks allocated.
    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError>;
}

/// Runs a blocking storage call on tokio's blocking pool.
pub async fn blocking<T, F>(f: F) -> Result<T, StorageError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, StorageError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r,
        Err(e) => Err(StorageError {
            op: "blocking task",
            target: String::new(),
            offset: 0,
            source: std::io::Error::other(e.to_string()),
        }),
    }
}

/// A regular file (or block device) accessed with positional I/O.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    target: String,
}

impl FileStorage {
    /// Opens an existing file for reading and writing.
    pub fn open(path: &Path) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| err("open", path, 0, source))?;
        Ok(Self::from_file(file, path))
    }

    /// Creates a new file; fails if it exists.
    pub fn create_new(path: &Path) -> Result<Self, StorageError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|source| err("create", path, 0, source))?;
        Ok(Self::from_file(file, path))
    }

    fn from_file(file: File, path: &Path) -> Self {
        Self {
            file,
            target: path.display().to_string(),
        }
    }

    fn err(&self, op: &'static str, offset: u64, source: std::io::Error) -> StorageError {
        StorageError {
            op,
            target: self.target.clone(),
            offset,
            source,
        }
    }

    fn fallocate(&self, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<()> {
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
        };
        // SAFETY: fallocate only reads its integer arguments; the descriptor
        // is owned by `self.file` and open for the duration of the call.
        let rc = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, off, l) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    fn write_zeroes_slowly(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let zeroes = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeroes.len() as u64) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

fn err(op: &'static str, path: &Path, offset: u64, source: std::io::Error) -> StorageError {
    StorageError {
        op,
        target: path.display().to_string(),
        offset,
        source,
    }
}

fn unsupported(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS)
    )
}

impl Storage for FileStorage {
    fn target(&self) -> &str {
        &self.target
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.err("read", offset, e))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.err("write", offset, e))
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.file
            .sync_data()
            .map_err(|e| self.err("fdatasync", 0, e))
    }

    fn size(&self) -> Result<u64, StorageError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|e| self.err("stat", 0, e))
    }

    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        self.file
            .set_len(len)
            .map_err(|e| self.err("truncate", len, e))
    }

    fn preallocate(&self, len: u64) -> Result<(), StorageError> {
        match self.fallocate(0, 0, len) {
            Ok(()) => Ok(()),
            // Filesystems without fallocate: a sparse file of the right size.
            Err(e) if unsupported(&e) => self.set_len(len),
            Err(e) => Err(self.err("fallocate", 0, e)),
        }
    }

    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zeroes_slowly(offset, len),
            Err(e) => Err(self.err("punch hole", offset, e)),
        }
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
        match self.fallocate(mode, offset, len) {
            Ok(()) => Ok(()),
            Err(e) if unsupported(&e) => self.write_zeroes_slowly(offset, len),
            Err(e) => Err(self.err("zero range", offset, e)),
        }
    }
}

impl<S: Storage + ?Sized> Storage for std::sync::Arc<S> {
    fn target(&self) -> &str {
        (**self).target()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        (**self).read_at(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        (**self).write_at(buf, offset)
    }
    fn sync(&self) -> Result<(), StorageError> {
        (**self).sync()
    }
    fn size(&self) -> Result<u64, StorageError> {
        (**self).size()
    }
    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        (**self).set_len(len)
    }
    fn preallocate(&self, len: u64) -> Result<(), StorageError> {
        (**self).preallocate(len)
    }
    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        (**self).punch(offset, len)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        (**self).zero(offset, len)
    }
}

#[cfg(feature = "failpoints")]
#[path = "storage_cache.rs"]
mod cache;
#[cfg(feature = "failpoints")]
#[path = "storage_faults.rs"]
mod faults;
#[cfg(feature = "failpoints")]
pub use faults::{
    DEFAULT_CACHE_LIMIT, FaultAction, FaultPlan, FaultSpecError, FaultyStorage, StorageFaults,
    install_process_faults, process_faults,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_storage_reads_back_writes_and_zeroes_ranges() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStorage::create_new(&dir.path().join("f")).expect("create");
        s.preallocate(1 << 20).expect("preallocate");
        assert_eq!(s.size().expect("size"), 1 << 20);
        s.write_at(&[0xaa; 8192], 4096).expect("write");
        s.sync().expect("sync");
        let mut buf = [0u8; 8192];
        s.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 0xaa));
        s.zero(4096, 4096).expect("zero");
        s.punch(8192, 4096).expect("punch");
        s.read_at(&mut buf, 4096).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(s.size().expect("size"), 1 << 20, "size kept");
    }

    #[test]
    fn reading_past_the_end_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        let s = FileStorage::create_new(&p).expect("create");
        s.set_len(10).expect("set_len");
        let mut buf = [0u8; 20];
        let e = s.read_at(&mut buf, 0).expect_err("short file");
        assert!(e.to_string().contains(&p.display().to_string()));
    }
}
