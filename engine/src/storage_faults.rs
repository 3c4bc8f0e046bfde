//! Fault injection for [`Storage`](super::Storage), compiled only with the
//! `failpoints` feature.
//!
//! A [`FaultyStorage`] names itself with a module (`meta`, `data`, ...) and
//! consults a shared [`FaultPlan`] at every operation; the point name is
//! `module::op` with `op` one of `read_at`, `write_at`, `sync`, `set_len`,
//! `preallocate`, `punch`, `zero`. Every call of a point counts a hit, so a
//! crash test can run once to count the writes of a procedure, then once per
//! write, tearing or dropping exactly that one.
//!
//! With a volatile write cache ([`FaultyStorage::volatile`],
//! `super::cache`) the storage also models a power cut: writes are held
//! in the process until `sync`, so killing the process loses every write
//! not yet synced — what `kill -9` of a real process cannot show.
//!
//! Real processes get both through [`StorageFaults`]: a spec such as
//! `volatile,data::sync=fail@3x1` (the replica's `--storage-faults` flag,
//! env `TWINVOL_STORAGE_FAULTS`), installed for the whole process with
//! [`install_process_faults`] and applied by the replica server to every
//! volume it opens (its files are the modules `data`, `meta`, `bitmap`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use super::cache::WriteCache;
use super::{FileStorage, Storage, StorageError};

/// What happens at a point when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultAction {
    /// The operation fails with EIO and does nothing.
    Fail,
    /// A write lands only its first `keep` bytes, then fails with EIO (a
    /// crash in the middle of a write); other operations just fail.
    Tear { keep: usize },
    /// The operation reports success but does nothing (a lost write, or a
    /// sync that was not durable).
    Drop,
    /// The operation waits this many milliseconds, then runs as usual (a
    /// disk slowed down by load, or stalling on a failing path).
    Slow { ms: u64 },
}

#[derive(Debug, Clone)]
struct Rule {
    point: String,
    skip: u64,
    remaining: Option<u64>,
    action: FaultAction,
}

/// Which points fail how; shared by all the storages of a test.
#[derive(Debug, Default)]
pub struct FaultPlan {
    rules: Mutex<Vec<Rule>>,
    hits: Mutex<HashMap<String, u64>>,
}

impl FaultPlan {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// At `point`, let `skip` calls through, then apply `action` to the next
    /// `times` calls (`None`: to every later call).
    pub fn inject(&self, point: &str, skip: u64, times: Option<u64>, action: FaultAction) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(Rule {
                point: point.to_owned(),
                skip,
                remaining: times,
                action,
            });
        }
    }

    /// Removes every rule (hit counts stay).
    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.clear();
        }
    }

    /// How often `point` was called.
    pub fn hits(&self, point: &str) -> u64 {
        self.hits
            .lock()
            .map(|h| h.get(point).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// Counts a hit of `point` and returns the fault to apply, if any.
    fn check(&self, point: &str) -> Option<FaultAction> {
        if let Ok(mut hits) = self.hits.lock() {
            *hits.entry(point.to_owned()).or_default() += 1;
        }
        let mut rules = self.rules.lock().ok()?;
        for rule in rules.iter_mut().filter(|r| r.point == point) {
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            match &mut rule.remaining {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            return Some(rule.action);
        }
        None
    }
}

/// Wraps a storage and injects the faults of a [`FaultPlan`].
pub struct FaultyStorage<S> {
    inner: S,
    module: &'static str,
    plan: Arc<FaultPlan>,
    /// With a volatile write cache: the writes not yet synced.
    cache: Option<Mutex<WriteCache>>,
}

/// How much data a volatile cache holds at most before it writes back by
/// itself (as a kernel's writeback would), by default.
pub const DEFAULT_CACHE_LIMIT: u64 = 256 << 20;

impl<S: Storage> FaultyStorage<S> {
    pub fn new(inner: S, module: &'static str, plan: Arc<FaultPlan>) -> Self {
        Self {
            inner,
            module,
            plan,
            cache: None,
        }
    }

    /// Like [`FaultyStorage::new`], with a volatile write cache holding up
    /// to `limit` bytes of data: writes reach `inner` only at `sync` (or
    /// when the cache is full), so dropping the storage — or killing the
    /// process — loses every write not synced, as a power cut does. A
    /// failed `sync` (an injected fault) drops what the cache held.
    pub fn volatile(inner: S, module: &'static str, plan: Arc<FaultPlan>, limit: u64) -> Self {
        Self {
            cache: Some(Mutex::new(WriteCache::new(limit))),
            ..Self::new(inner, module, plan)
        }
    }

    /// Bytes of data held by the volatile cache (0 without one).
    pub fn cached_bytes(&self) -> u64 {
        self.cache_lock().map_or(0, |c| c.data_bytes())
    }

    fn cache_lock(&self) -> Option<MutexGuard<'_, WriteCache>> {
        // Every cache update completes before anything that could panic.
        self.cache
            .as_ref()
            .map(|c| c.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Holds or applies a write-like operation.
    fn put(
        &self,
        hold: impl FnOnce(&mut WriteCache) -> bool,
        direct: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        match self.cache_lock() {
            Some(mut c) => {
                if hold(&mut c) {
                    c.write_back(&self.inner)?;
                }
                Ok(())
            }
            None => direct(),
        }
    }

    /// The fault to apply at `op`, if any; a `Slow` one is applied here
    /// (the calling thread sleeps: storage calls run on blocking threads)
    /// and the operation then runs as usual.
    fn fault(&self, op: &'static str) -> Option<FaultAction> {
        match self.plan.check(&format!("{}::{op}", self.module)) {
            Some(FaultAction::Slow { ms }) => {
                std::thread::sleep(std::time::Duration::from_millis(ms));
                None
            }
            other => other,
        }
    }

    fn injected(&self, op: &'static str, offset: u64) -> StorageError {
        StorageError {
            op,
            target: self.inner.target().to_owned(),
            offset,
            source: std::io::Error::other(format!("injected fault at {}::{op}", self.module)),
        }
    }

    fn simple(
        &self,
        op: &'static str,
        offset: u64,
        f: impl FnOnce() -> Result<(), StorageError>,
    ) -> Result<(), StorageError> {
        match self.fault(op) {
            None => f(),
            Some(FaultAction::Drop) => Ok(()),
            Some(_) => Err(self.injected(op, offset)),
        }
    }
}

impl<S: Storage> Storage for FaultyStorage<S> {
    fn target(&self) -> &str {
        self.inner.target()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        match self.fault("read_at") {
            None | Some(FaultAction::Drop) => {
                // Under the lock, so that a write-back in progress is never
                // seen half-applied.
                let cache = self.cache_lock();
                self.inner.read_at(buf, offset)?;
                if let Some(c) = cache {
                    c.overlay(buf, offset);
                }
                Ok(())
            }
            Some(_) => Err(self.injected("read_at", offset)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        match self.fault("write_at") {
            // (`fault` has applied a `Slow` one already.)
            None | Some(FaultAction::Slow { .. }) => self.put(
                |c| c.write(buf, offset),
                || self.inner.write_at(buf, offset),
            ),
            Some(FaultAction::Drop) => Ok(()),
            Some(FaultAction::Fail) => Err(self.injected("write_at", offset)),
            Some(FaultAction::Tear { keep }) => {
                let part = &buf[..keep.min(buf.len())];
                self.put(
                    |c| c.write(part, offset),
                    || self.inner.write_at(part, offset),
                )?;
                Err(self.injected("write_at", offset))
            }
        }
    }

    fn sync(&self) -> Result<(), StorageError> {
        match self.fault("sync") {
            Some(FaultAction::Drop) => Ok(()),
            Some(_) => {
                // The kernel's answer to a failed writeback: the dirty pages
                // are dropped (marked clean), the data is gone.
                if let Some(mut c) = self.cache_lock() {
                    c.drop_all();
                }
                Err(self.injected("sync", 0))
            }
            None => {
                if let Some(mut c) = self.cache_lock() {
                    c.write_back(&self.inner)?;
                }
                self.inner.sync()
            }
        }
    }

    fn size(&self) -> Result<u64, StorageError> {
        self.inner.size()
    }

    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        self.simple("set_len", len, || self.inner.set_len(len))
    }

    fn preallocate(&self, len: u64) -> Result<(), StorageError> {
        self.simple("preallocate", 0, || self.inner.preallocate(len))
    }

    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.simple("punch", offset, || {
            self.put(
                |c| {
                    c.punch(offset, len);
                    false
                },
                || self.inner.punch(offset, len),
            )
        })
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.simple("zero", offset, || {
            self.put(
                |c| {
                    c.zero(offset, len);
                    false
                },
                || self.inner.zero(offset, len),
            )
        })
    }
}

/// Why a fault spec could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "fault spec item {item:?}: {reason} (items: `volatile`, `volatile=SIZE`, `MODULE::OP=ACTION[@SKIP][xTIMES]` with ACTION fail|drop|tearN|slowMS)"
)]
pub struct FaultSpecError {
    pub item: String,
    pub reason: String,
}

/// The storage faults of a replica process, from a spec (comma-separated
/// items):
/// - `volatile` (or `volatile=SIZE`, K/M/G suffixes): every file of every
///   volume gets a volatile write cache holding up to SIZE bytes of data
///   ([`DEFAULT_CACHE_LIMIT`]) — kill -9 of the process is then a power
///   cut of its site;
/// - `MODULE::OP=ACTION[@SKIP][xTIMES]`: a rule of the [`FaultPlan`], e.g.
///   `data::sync=fail@3x1` (let 3 data syncs through, fail the 4th),
///   `meta::write_at=tear512`; ACTION is `fail` (EIO), `drop` (report
///   success, do nothing), `tearN` (land N bytes of a write, then EIO)
///   or `slowMS` (wait MS milliseconds, then do it: a slow disk);
///   without `xTIMES` the rule applies to every later call.
pub struct StorageFaults {
    plan: Arc<FaultPlan>,
    volatile: Option<u64>,
    spec: String,
}

impl std::fmt::Debug for StorageFaults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.spec)
    }
}

impl StorageFaults {
    pub fn parse(spec: &str) -> Result<Self, FaultSpecError> {
        let plan = FaultPlan::new();
        let mut volatile = None;
        for item in spec.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            let bad = |reason: &str| FaultSpecError {
                item: item.to_owned(),
                reason: reason.to_owned(),
            };
            if item == "volatile" {
                volatile = Some(DEFAULT_CACHE_LIMIT);
                continue;
            }
            let (point, rule) = item.split_once('=').ok_or_else(|| bad("no `=`"))?;
            if point == "volatile" {
                let limit = crate::units::parse_size(rule).map_err(|e| bad(&e.to_string()))?;
                volatile = Some(limit);
                continue;
            }
            let Some((module, op)) = point.split_once("::") else {
                return Err(bad("the point is not MODULE::OP"));
            };
            const OPS: [&str; 7] = [
                "read_at",
                "write_at",
                "sync",
                "set_len",
                "preallocate",
                "punch",
                "zero",
            ];
            if module.is_empty() || !OPS.contains(&op) {
                return Err(bad("unknown operation"));
            }
            let (rule, times) = match rule.split_once('x') {
                Some((r, t)) => (r, Some(t.parse::<u64>().map_err(|_| bad("bad xTIMES"))?)),
                None => (rule, None),
            };
            let (action, skip) = match rule.split_once('@') {
                Some((a, s)) => (a, s.parse::<u64>().map_err(|_| bad("bad @SKIP"))?),
                None => (rule, 0),
            };
            let action = match action {
                "fail" => FaultAction::Fail,
                "drop" => FaultAction::Drop,
                a => match (
                    a.strip_prefix("tear").map(str::parse::<usize>),
                    a.strip_prefix("slow").map(str::parse::<u64>),
                ) {
                    (Some(Ok(keep)), _) => FaultAction::Tear { keep },
                    (_, Some(Ok(ms))) => FaultAction::Slow { ms },
                    _ => return Err(bad("unknown action")),
                },
            };
            plan.inject(point, skip, times, action);
        }
        Ok(Self {
            plan,
            volatile,
            spec: spec.to_owned(),
        })
    }

    /// The shared plan (hit counts, more rules).
    pub fn plan(&self) -> &Arc<FaultPlan> {
        &self.plan
    }

    /// Whether files get a volatile write cache.
    pub fn is_volatile(&self) -> bool {
        self.volatile.is_some()
    }

    /// Wraps one file of a volume (`module`: `data`, `meta` or `bitmap`).
    pub fn wrap(&self, module: &'static str, file: FileStorage) -> Arc<dyn Storage> {
        let plan = self.plan.clone();
        Arc::new(match self.volatile {
            Some(limit) => FaultyStorage::volatile(file, module, plan, limit),
            None => FaultyStorage::new(file, module, plan),
        })
    }
}

static PROCESS_FAULTS: OnceLock<Arc<StorageFaults>> = OnceLock::new();

/// Installs the storage faults of this process (once; a second call is
/// ignored and returns false). Replica servers bound afterwards apply them
/// to every volume they open.
pub fn install_process_faults(faults: StorageFaults) -> bool {
    tracing::warn!(spec = %faults.spec, "storage fault injection is on (tests only)");
    PROCESS_FAULTS.set(Arc::new(faults)).is_ok()
}

/// The faults installed for this process, if any.
pub fn process_faults() -> Option<Arc<StorageFaults>> {
    PROCESS_FAULTS.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;

    #[test]
    fn torn_write_lands_a_prefix_and_fails() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = FaultPlan::new();
        let s = FaultyStorage::new(
            FileStorage::create_new(&dir.path().join("f")).expect("create"),
            "meta",
            plan.clone(),
        );
        s.set_len(16).expect("set_len");
        plan.inject("meta::write_at", 1, Some(1), FaultAction::Tear { keep: 4 });
        s.write_at(&[1; 8], 0).expect("first write passes");
        let e = s.write_at(&[2; 8], 8).expect_err("second write torn");
        assert!(e.to_string().contains("write_at"));
        s.write_at(&[3; 4], 12).expect("rule used up");
        let mut buf = [0u8; 16];
        s.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]);
        assert_eq!(plan.hits("meta::write_at"), 3);
    }

    #[test]
    fn a_volatile_cache_loses_unsynced_writes_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        let plan = FaultPlan::new();
        let s = FaultyStorage::volatile(
            FileStorage::create_new(&path).expect("create"),
            "data",
            plan.clone(),
            DEFAULT_CACHE_LIMIT,
        );
        s.set_len(8192).expect("set_len");
        s.write_at(&[1; 4096], 0).expect("write");
        s.sync().expect("sync");
        s.write_at(&[2; 4096], 4096).expect("write");
        s.zero(0, 512).expect("zero");
        let mut buf = [9u8; 8192];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf[..512].iter().all(|&b| b == 0));
        assert!(buf[512..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..].iter().all(|&b| b == 2));
        assert_eq!(s.cached_bytes(), 4096);
        // The power cut: only the synced write is in the file.
        drop(s);
        let f = FileStorage::open(&path).expect("open");
        f.read_at(&mut buf, 0).expect("read");
        assert!(buf[..4096].iter().all(|&b| b == 1));
        assert!(buf[4096..].iter().all(|&b| b == 0));
    }

    #[test]
    fn a_failed_sync_drops_the_cached_writes_and_the_next_one_succeeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = FaultPlan::new();
        let s = FaultyStorage::volatile(
            FileStorage::create_new(&dir.path().join("f")).expect("create"),
            "data",
            plan.clone(),
            DEFAULT_CACHE_LIMIT,
        );
        s.set_len(4096).expect("set_len");
        plan.inject("data::sync", 0, Some(1), FaultAction::Fail);
        s.write_at(&[5; 4096], 0).expect("write");
        s.sync().expect_err("injected EIO");
        // What Linux does after a failed fdatasync: the next one succeeds,
        // and the write is gone.
        s.sync().expect("second sync");
        let mut buf = [1u8; 4096];
        s.read_at(&mut buf, 0).expect("read");
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn fault_specs_parse_into_rules_and_refuse_nonsense() {
        let f = StorageFaults::parse("volatile, data::sync=fail@2x1,meta::write_at=tear100")
            .expect("valid");
        assert!(f.is_volatile());
        let dir = tempfile::tempdir().expect("tempdir");
        let s = f.wrap(
            "data",
            FileStorage::create_new(&dir.path().join("f")).expect("create"),
        );
        s.set_len(4096).expect("set_len");
        s.sync().expect("first");
        s.sync().expect("second");
        s.sync().expect_err("third fails");
        s.sync().expect("rule used up");
        assert_eq!(f.plan().hits("data::sync"), 4);
        assert!(
            StorageFaults::parse("volatile=1M")
                .expect("valid")
                .is_volatile()
        );
        let slow = StorageFaults::parse("data::sync=slow300x1").expect("valid");
        let s = slow.wrap(
            "data",
            FileStorage::create_new(&dir.path().join("g")).expect("create"),
        );
        let started = std::time::Instant::now();
        s.sync().expect("a slow sync succeeds");
        assert!(started.elapsed() >= std::time::Duration::from_millis(300));
        let started = std::time::Instant::now();
        s.sync().expect("rule used up");
        assert!(started.elapsed() < std::time::Duration::from_millis(300));
        for bad in [
            "data::sync=slow",
            "data::sync=slowly",
            "data::fsync=fail",
            "data::sync",
            "sync=fail",
            "data::sync=boom",
            "data::sync=fail@x",
        ] {
            assert!(StorageFaults::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dropped_write_reports_success_and_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let plan = FaultPlan::new();
        let s = FaultyStorage::new(
            FileStorage::create_new(&dir.path().join("f")).expect("create"),
            "data",
            plan.clone(),
        );
        s.set_len(4).expect("set_len");
        plan.inject("data::write_at", 0, None, FaultAction::Drop);
        s.write_at(&[9; 4], 0).expect("dropped write looks fine");
        let mut buf = [1u8; 4];
        s.read_at(&mut buf, 0).expect("read");
        assert_eq!(buf, [0; 4]);
    }
}
