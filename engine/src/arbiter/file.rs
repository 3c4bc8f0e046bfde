//! A file-backed arbiter, for `twinvol-engine` without Kubernetes, the tests
//! and the first demo.
//!
//! The record is one small JSON file (with a format version). A change takes
//! an exclusive `flock` on a sibling lock file, reads the record, checks the
//! expected version, applies the pure rules of [`super::record`], writes the
//! new record to a temporary file, fsyncs it, renames it over the old one and
//! fsyncs the directory: a crash leaves either the old or the new record,
//! never a torn one. The version is a counter bumped by every change.
//!
//! Several processes on one host may share the file (frontends, tests); the
//! lock serialises them. It is not a distributed arbiter: whoever can reach
//! the file is "on the arbiter's side".

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::record::{Change, FrontendId, Lease, VolumeRecord};
use super::{Arbiter, ArbiterError, Version};
use crate::protocol::{Epoch, ReplicaId};

/// The on-disk format's version; another one is refused as corrupt.
const FORMAT: u32 = 1;

/// The arbiter record of one volume in a file.
#[derive(Debug, Clone)]
pub struct FileArbiter {
    path: PathBuf,
    /// The deadline of one async call (as the Kubernetes arbiter's).
    timeout: Duration,
    /// Stalls after chosen commits (tests only, see [`super::stall`]).
    #[cfg(feature = "failpoints")]
    stall: Option<std::sync::Arc<super::stall::CommitStall>>,
}

#[derive(Serialize, Deserialize)]
struct OnDisk {
    format: u32,
    version: u64,
    epoch: u64,
    replicas: Vec<String>,
    in_sync: Vec<String>,
    lease: Option<OnDiskLease>,
}

#[derive(Serialize, Deserialize)]
struct OnDiskLease {
    holder: String,
    /// The epoch of the acquisition; absent in records written before
    /// leases carried it, when it was always the record's epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    epoch: Option<u64>,
    renewed_at_ms: u64,
    duration_ms: u64,
}

impl FileArbiter {
    /// Creates the record of a new volume (both replicas in sync, epoch 0).
    /// Refuses to overwrite an existing record.
    pub fn create(path: &Path, replicas: BTreeSet<ReplicaId>) -> Result<Self, ArbiterError> {
        let arbiter = Self::at(path);
        let _lock = arbiter.lock()?;
        if path.exists() {
            return Err(arbiter.corrupt(
                "a record already exists there; refusing to overwrite it (remove it to start over)",
            ));
        }
        arbiter.store(&VolumeRecord::new(Version("1".to_owned()), replicas))?;
        Ok(arbiter)
    }

    /// Uses an existing record.
    pub fn open(path: &Path) -> Result<Self, ArbiterError> {
        let arbiter = Self::at(path);
        arbiter.load()?;
        Ok(arbiter)
    }

    /// The deadline of one async call unless [`Self::with_timeout`] says
    /// otherwise: the Kubernetes arbiter's, so that a caller sees the same
    /// "outcome unknown" ([`ArbiterError::Unreachable`]) from both.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

    /// Bounds every async call by `timeout`. An update that times out may
    /// still land (it runs on): the caller must re-read.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    fn at(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
            timeout: Self::DEFAULT_TIMEOUT,
            #[cfg(feature = "failpoints")]
            stall: super::stall::process_stall(),
        }
    }

    /// Stalls after the commits `stall` chooses (instead of the process's,
    /// [`super::stall::install_commit_stall`]).
    #[cfg(feature = "failpoints")]
    pub fn with_commit_stall(mut self, stall: std::sync::Arc<super::stall::CommitStall>) -> Self {
        self.stall = Some(stall);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Synchronous read (the lock is not needed: renames are atomic).
    pub fn read_blocking(&self) -> Result<VolumeRecord, ArbiterError> {
        self.load()
    }

    /// Synchronous compare-and-swap.
    pub fn update_blocking(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        let lock = self.lock()?;
        let current = self.load()?;
        if current.version != *expected {
            return Err(ArbiterError::Conflict {
                expected: expected.clone(),
                current: Box::new(current),
            });
        }
        let counter: u64 = current
            .version
            .0
            .parse()
            .map_err(|_| self.corrupt("version is not a counter"))?;
        #[cfg(feature = "failpoints")]
        let stall = self.stall.as_ref().and_then(|s| s.after_commit(&change));
        #[cfg(feature = "failpoints")]
        let kind = super::stall::change_kind(&change);
        let next = current.apply(change, Version((counter + 1).to_string()))?;
        self.store(&next)?;
        drop(lock);
        #[cfg(feature = "failpoints")]
        if let Some(d) = stall {
            // Committed and unlocked: the record has the change, other
            // callers go on; only this caller waits for its answer.
            tracing::warn!(change = kind, version = %next.version, stall_ms = d.as_millis() as u64, "arbiter commit stalled (injected): the change is in the record, its answer comes late");
            std::thread::sleep(d);
            tracing::warn!(change = kind, version = %next.version, "stalled arbiter commit answered (injected)");
        }
        Ok(next)
    }

    fn lock(&self) -> Result<File, ArbiterError> {
        let mut lock_path = self.path.clone().into_os_string();
        lock_path.push(".lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| self.unreachable(e))?;
        file.lock().map_err(|e| self.unreachable(e))?;
        Ok(file)
    }

    fn load(&self) -> Result<VolumeRecord, ArbiterError> {
        let bytes = fs::read(&self.path).map_err(|e| self.unreachable(e))?;
        let d: OnDisk = serde_json::from_slice(&bytes).map_err(|e| self.corrupt(&e.to_string()))?;
        if d.format != FORMAT {
            return Err(self.corrupt(&format!(
                "format {} (this build reads format {FORMAT})",
                d.format
            )));
        }
        let ids = |names: Vec<String>| -> Result<BTreeSet<ReplicaId>, ArbiterError> {
            names
                .into_iter()
                .map(|n| ReplicaId::new(n).map_err(|e| self.corrupt(&e.to_string())))
                .collect()
        };
        Ok(VolumeRecord {
            version: Version(d.version.to_string()),
            epoch: Epoch(d.epoch),
            replicas: ids(d.replicas)?,
            in_sync: ids(d.in_sync)?,
            lease: d.lease.map(|l| Lease {
                holder: FrontendId(l.holder),
                epoch: Epoch(l.epoch.unwrap_or(d.epoch)),
                renewed_at_ms: l.renewed_at_ms,
                duration: Duration::from_millis(l.duration_ms),
            }),
        })
    }

    fn store(&self, record: &VolumeRecord) -> Result<(), ArbiterError> {
        let names = |set: &BTreeSet<ReplicaId>| set.iter().map(|r| r.to_string()).collect();
        let d = OnDisk {
            format: FORMAT,
            version: record
                .version
                .0
                .parse()
                .map_err(|_| self.corrupt("version is not a counter"))?,
            epoch: record.epoch.get(),
            replicas: names(&record.replicas),
            in_sync: names(&record.in_sync),
            lease: record.lease.as_ref().map(|l| OnDiskLease {
                holder: l.holder.0.clone(),
                epoch: Some(l.epoch.get()),
                renewed_at_ms: l.renewed_at_ms,
                duration_ms: u64::try_from(l.duration.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        let json = serde_json::to_vec_pretty(&d).map_err(|e| self.corrupt(&e.to_string()))?;
        let mut tmp_path = self.path.clone().into_os_string();
        tmp_path.push(".tmp");
        let tmp_path = PathBuf::from(tmp_path);
        let mut tmp = File::create(&tmp_path).map_err(|e| self.unreachable(e))?;
        tmp.write_all(&json).map_err(|e| self.unreachable(e))?;
        tmp.sync_all().map_err(|e| self.unreachable(e))?;
        fs::rename(&tmp_path, &self.path).map_err(|e| self.unreachable(e))?;
        let dir = self.path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(dir.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| self.unreachable(e))
    }

    fn unreachable(&self, source: std::io::Error) -> ArbiterError {
        ArbiterError::Unreachable {
            location: self.path.display().to_string(),
            source,
        }
    }

    fn corrupt(&self, reason: &str) -> ArbiterError {
        ArbiterError::Corrupt {
            location: self.path.display().to_string(),
            reason: reason.to_owned(),
        }
    }
}

impl Arbiter for FileArbiter {
    async fn read(&self) -> Result<VolumeRecord, ArbiterError> {
        let this = self.clone();
        self.deadline(blocking(move || this.read_blocking())).await
    }

    async fn update(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        let this = self.clone();
        let expected = expected.clone();
        self.deadline(blocking(move || this.update_blocking(&expected, change)))
            .await
    }
}

impl FileArbiter {
    async fn deadline<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, ArbiterError>>,
    ) -> Result<T, ArbiterError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(r) => r,
            Err(_) => Err(self.unreachable(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer within {:?} (an update may still land)",
                    self.timeout
                ),
            ))),
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ArbiterError> + Send + 'static,
) -> Result<T, ArbiterError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).unwrap()
    }

    #[test]
    fn a_swap_on_a_stale_version_conflicts_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.json");
        let arb = FileArbiter::create(&path, [r("a"), r("b")].into()).unwrap();
        let v1 = arb.read_blocking().unwrap();
        let v2 = arb
            .update_blocking(&v1.version, Change::RemoveFromInSync(r("a")))
            .unwrap();
        assert_eq!(v2.in_sync, [r("b")].into());
        // The other side read v1 too and now tries to drop b: it must lose.
        let err = arb
            .update_blocking(&v1.version, Change::RemoveFromInSync(r("b")))
            .unwrap_err();
        match err {
            ArbiterError::Conflict { current, .. } => assert_eq!(*current, v2),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(
            FileArbiter::open(&path).unwrap().read_blocking().unwrap(),
            v2
        );
    }

    #[test]
    fn concurrent_swaps_on_one_version_have_exactly_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.json");
        let arb = FileArbiter::create(&path, [r("a"), r("b")].into()).unwrap();
        let v1 = arb.read_blocking().unwrap().version;
        let handles: Vec<_> = ["a", "b"]
            .into_iter()
            .cycle()
            .take(16)
            .map(|victim| {
                let arb = arb.clone();
                let v1 = v1.clone();
                std::thread::spawn(move || {
                    arb.update_blocking(&v1, Change::RemoveFromInSync(r(victim)))
                        .is_ok()
                })
            })
            .collect();
        let winners = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|won| *won)
            .count();
        assert_eq!(winners, 1, "no split brain: one swap wins");
        assert_eq!(arb.read_blocking().unwrap().in_sync.len(), 1);
    }

    #[cfg(feature = "failpoints")]
    #[tokio::test]
    async fn a_stalled_commit_lands_while_its_caller_times_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.json");
        FileArbiter::create(&path, [r("a"), r("b")].into()).unwrap();
        let stall = super::super::stall::CommitStall::parse("remove-from-in-sync#1=2s").unwrap();
        let arb = FileArbiter::open(&path)
            .unwrap()
            .with_commit_stall(std::sync::Arc::new(stall))
            .with_timeout(Duration::from_millis(300));
        let v1 = arb.read().await.unwrap();
        let t = std::time::Instant::now();
        let answer = arb
            .update(&v1.version, Change::RemoveFromInSync(r("a")))
            .await;
        assert!(
            matches!(answer, Err(ArbiterError::Unreachable { .. })),
            "{answer:?}"
        );
        assert!(t.elapsed() < Duration::from_secs(2));
        // The change is in the record all the same, and nobody else waits.
        let now = arb.read().await.unwrap();
        assert_eq!(now.in_sync, [r("b")].into());
        assert_ne!(now.version, v1.version);
    }

    #[test]
    fn create_refuses_to_overwrite_and_open_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vol.json");
        FileArbiter::create(&path, [r("a"), r("b")].into()).unwrap();
        assert!(matches!(
            FileArbiter::create(&path, [r("a"), r("b")].into()),
            Err(ArbiterError::Corrupt { .. })
        ));
        fs::write(&path, b"{\"format\": 99}").unwrap();
        assert!(matches!(
            FileArbiter::open(&path),
            Err(ArbiterError::Corrupt { .. })
        ));
        assert!(matches!(
            FileArbiter::open(&dir.path().join("missing.json")),
            Err(ArbiterError::Unreachable { .. })
        ));
    }
}
