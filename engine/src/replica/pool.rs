//! A pool directory: where a replica server keeps its volumes, one
//! subdirectory per volume holding `data` (exactly the volume's bytes,
//! preallocated), `meta` (see [`super::meta`]; its reserved area holds the
//! activity log) and `bitmap` (the dirty bitmap, see [`crate::bitmap`]).
//!
//! Creation is crash-safe: both files are built and synced in a hidden
//! `.<id>.creating` directory that is renamed into place at the end, so a
//! volume directory either is complete or does not exist.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::protocol::VolumeId;
use crate::storage::{FileStorage, Storage, StorageError};

use super::meta::{self, MetaError, Metadata};

/// Volume sizes must be a multiple of this (the block size exports use).
pub const SIZE_ALIGN: u64 = 4096;

/// Why a pool or a volume in it could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("pool directory {path} does not exist or is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("pool directory {path} is not writable; check its permissions and mount")]
    NotWritable {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("volume {volume} already exists at {path}")]
    VolumeExists { volume: VolumeId, path: PathBuf },
    #[error("no volume {volume} in pool {pool}")]
    NoSuchVolume { volume: VolumeId, pool: PathBuf },
    #[error("volume size {size} is invalid: {reason}")]
    BadSize { size: u64, reason: &'static str },
    #[error("volume {volume} at {path} is inconsistent: {detail}")]
    Inconsistent {
        volume: VolumeId,
        path: PathBuf,
        detail: String,
    },
    #[error("{op} {path} failed")]
    Fs {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Meta(#[from] MetaError),
}

/// The files of one volume, opened.
pub struct OpenedVolume {
    pub data: FileStorage,
    pub meta_storage: FileStorage,
    pub meta: Metadata,
    pub bitmap_storage: FileStorage,
}

/// A pool directory.
#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
}

fn fs_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> PoolError + 'a {
    move |source| PoolError::Fs {
        op,
        path: path.to_owned(),
        source,
    }
}

fn sync_dir(path: &Path) -> Result<(), PoolError> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(fs_err("fsync directory", path))
}

impl Pool {
    /// Opens a pool, checking that it is a directory we can write to (by
    /// creating and removing a probe file), so that a misconfigured pool
    /// fails at startup, not at the first volume.
    pub fn open(dir: &Path) -> Result<Self, PoolError> {
        if !dir.is_dir() {
            return Err(PoolError::NotADirectory {
                path: dir.to_owned(),
            });
        }
        let probe = dir.join(format!(".twinvol-probe-{}", std::process::id()));
        let res = File::create(&probe).and_then(|f| f.sync_all());
        let _ = std::fs::remove_file(&probe);
        res.map_err(|source| PoolError::NotWritable {
            path: dir.to_owned(),
            source,
        })?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn volume_dir(&self, volume: &VolumeId) -> PathBuf {
        self.dir.join(volume.as_str())
    }

    pub fn data_path(&self, volume: &VolumeId) -> PathBuf {
        self.volume_dir(volume).join("data")
    }

    pub fn meta_path(&self, volume: &VolumeId) -> PathBuf {
        self.volume_dir(volume).join("meta")
    }

    /// The volumes in the pool (complete volume directories), sorted.
    pub fn volumes(&self) -> Result<Vec<VolumeId>, PoolError> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(&self.dir).map_err(fs_err("list", &self.dir))? {
            let e = e.map_err(fs_err("list", &self.dir))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(id) = VolumeId::new(name)
                && e.path().join("meta").is_file()
            {
                out.push(id);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Creates volume `volume` of `size` bytes (blocking).
    pub fn create_volume(&self, volume: &VolumeId, size: u64) -> Result<(), PoolError> {
        if size == 0 || !size.is_multiple_of(SIZE_ALIGN) {
            return Err(PoolError::BadSize {
                size,
                reason: "must be a positive multiple of 4096 bytes",
            });
        }
        let dest = self.volume_dir(volume);
        if dest.exists() {
            return Err(PoolError::VolumeExists {
                volume: volume.clone(),
                path: dest,
            });
        }
        let tmp = self.dir.join(format!(".{volume}.creating"));
        if tmp.exists() {
            // Left by a crash during an earlier create: never renamed, so
            // never used.
            std::fs::remove_dir_all(&tmp).map_err(fs_err("remove", &tmp))?;
        }
        std::fs::create_dir(&tmp).map_err(fs_err("create directory", &tmp))?;
        let data = FileStorage::create_new(&tmp.join("data"))?;
        data.preallocate(size)?;
        data.sync()?;
        let m = FileStorage::create_new(&tmp.join("meta"))?;
        meta::create(&m, volume.clone(), size)?;
        super::logs::create_activity_log(&m, size)?;
        let b = FileStorage::create_new(&tmp.join(crate::bitmap::FILE_NAME))?;
        super::logs::create_bitmap(&b, size)?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &dest).map_err(fs_err("rename", &tmp))?;
        sync_dir(&self.dir)
    }

    /// Opens the files of `volume` and checks that they agree (blocking).
    pub fn open_volume(&self, volume: &VolumeId) -> Result<OpenedVolume, PoolError> {
        let dir = self.volume_dir(volume);
        if !dir.is_dir() {
            return Err(PoolError::NoSuchVolume {
                volume: volume.clone(),
                pool: self.dir.clone(),
            });
        }
        let data = FileStorage::open(&dir.join("data"))?;
        let meta_storage = FileStorage::open(&dir.join("meta"))?;
        let m = meta::read(&meta_storage)?;
        let inconsistent = |detail: String| PoolError::Inconsistent {
            volume: volume.clone(),
            path: dir.clone(),
            detail,
        };
        if &m.volume != volume {
            return Err(inconsistent(format!(
                "its metadata names volume {}",
                m.volume
            )));
        }
        let mut len = data.size()?;
        if len > m.size {
            // A grow that did not commit (`Volume::resize` preallocates
            // the data file before the metadata records the new size):
            // nothing past the committed size was ever written.
            tracing::info!(volume = %volume, committed = m.size, data_file = len, "cutting an unfinished grow of the data file back to the committed size");
            data.set_len(m.size)?;
            data.sync()?;
            len = m.size;
        }
        if len != m.size {
            return Err(inconsistent(format!(
                "the data file has {len} bytes but the metadata says {}",
                m.size
            )));
        }
        let bitmap_path = dir.join(crate::bitmap::FILE_NAME);
        let bitmap_storage = if bitmap_path.exists() {
            FileStorage::open(&bitmap_path)?
        } else {
            // A volume created before the dirty bitmap existed: its peer is
            // in sync (nothing tracked), so an empty bitmap is the truth.
            let b = FileStorage::create_new(&bitmap_path)?;
            super::logs::create_bitmap(&b, m.size)?;
            sync_dir(&dir)?;
            b
        };
        Ok(OpenedVolume {
            data,
            meta_storage,
            meta: m,
            bitmap_storage,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vol() -> VolumeId {
        VolumeId::new("v1").expect("valid")
    }

    #[test]
    fn created_volume_has_an_exact_size_data_file_and_epoch_zero() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        pool.create_volume(&vol(), 1 << 20).expect("create");
        let len = std::fs::metadata(pool.data_path(&vol()))
            .expect("stat")
            .len();
        assert_eq!(len, 1 << 20);
        let v = pool.open_volume(&vol()).expect("open");
        assert_eq!(v.meta.size, 1 << 20);
        assert_eq!(v.meta.epoch.0, 0);
        assert!(matches!(
            pool.create_volume(&vol(), 1 << 20),
            Err(PoolError::VolumeExists { .. })
        ));
    }

    #[test]
    fn unaligned_size_and_missing_pool_are_refused_clearly() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = Pool::open(dir.path()).expect("pool");
        assert!(matches!(
            pool.create_volume(&vol(), 1000),
            Err(PoolError::BadSize { .. })
        ));
        let missing = dir.path().join("nope");
        let e = Pool::open(&missing).expect_err("missing");
        assert!(e.to_string().contains(&missing.display().to_string()));
    }

    #[test]
    fn unwritable_pool_is_refused_naming_the_path() {
        // Root ignores permission bits; sysfs refuses new files even to root.
        let e = Pool::open(Path::new("/sys")).expect_err("sysfs is not a pool");
        assert!(matches!(e, PoolError::NotWritable { .. }), "{e:?}");
        assert!(e.to_string().contains("/sys"));
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").expect("write");
        let e = Pool::open(&file).expect_err("not a dir");
        assert!(matches!(e, PoolError::NotADirectory { .. }));
    }
}
