//! Fault injection for [`Storage`](super::Storage), compiled only with the
//! `failpoints` feature.
//!
//! A [`FaultyStorage`] names itself with a module (`meta`, `data`, ...) and
//! consults a shared [`FaultPlan`] at every operation; the point name is
//! `module::op` with `op` one of `read_at`, `write_at`, `sync`, `set_len`,
//! `preallocate`, `punch`, `zero`. Every call of a point counts a hit, so a
//! crash test can run once to count the writes of a procedure, then once per
//! write, tearing or dropping exactly that one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::{Storage, StorageError};

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
}

impl<S: Storage> FaultyStorage<S> {
    pub fn new(inner: S, module: &'static str, plan: Arc<FaultPlan>) -> Self {
        Self {
            inner,
            module,
            plan,
        }
    }

    fn fault(&self, op: &'static str) -> Option<FaultAction> {
        self.plan.check(&format!("{}::{op}", self.module))
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
            None | Some(FaultAction::Drop) => self.inner.read_at(buf, offset),
            Some(_) => Err(self.injected("read_at", offset)),
        }
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        match self.fault("write_at") {
            None => self.inner.write_at(buf, offset),
            Some(FaultAction::Drop) => Ok(()),
            Some(FaultAction::Fail) => Err(self.injected("write_at", offset)),
            Some(FaultAction::Tear { keep }) => {
                self.inner.write_at(&buf[..keep.min(buf.len())], offset)?;
                Err(self.injected("write_at", offset))
            }
        }
    }

    fn sync(&self) -> Result<(), StorageError> {
        self.simple("sync", 0, || self.inner.sync())
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
        self.simple("punch", offset, || self.inner.punch(offset, len))
    }

    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.simple("zero", offset, || self.inner.zero(offset, len))
    }
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
