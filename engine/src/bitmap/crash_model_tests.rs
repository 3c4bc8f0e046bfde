//! A harsher crash model than the fault points: a disk with a volatile
//! cache. Writes since the last sync may each land, vanish or land torn (a
//! prefix of whole 512-byte sectors) when the machine dies, independently
//! and in any combination. The bitmap must still never lose an
//! acknowledged mark, never invent one, and say `Untrusted` only when a
//! write was actually torn.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use proptest::prelude::*;

use super::format::REGIONS_PER_BLOCK;
use super::tests::geometry;
use super::*;
use crate::protocol::{Epoch, ReplicaId};
use crate::storage::{Storage, StorageError};

struct Disk {
    durable: Vec<u8>,
    cache: Vec<(u64, Vec<u8>)>,
    calls: u64,
    crash_at: u64,
    crashed: bool,
    rng: u64,
    torn: bool,
}

impl Disk {
    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn apply(durable: &mut Vec<u8>, offset: u64, buf: &[u8]) {
        let end = offset as usize + buf.len();
        if durable.len() < end {
            durable.resize(end, 0);
        }
        durable[offset as usize..end].copy_from_slice(buf);
    }

    /// The machine dies: each cached write lands whole, not at all, or torn.
    fn crash(&mut self) {
        for (off, buf) in std::mem::take(&mut self.cache) {
            match self.next() % 3 {
                0 => {}
                1 => Self::apply(&mut self.durable, off, &buf),
                _ => {
                    let sectors = buf.len() / 512;
                    let keep = (self.next() as usize % sectors.max(1)) * 512;
                    self.torn |= keep > 0;
                    Self::apply(&mut self.durable, off, &buf[..keep]);
                }
            }
        }
        self.crashed = true;
    }

    /// Counts a call; dies at the chosen one.
    fn step(&mut self) -> Result<(), StorageError> {
        if !self.crashed {
            self.calls += 1;
            if self.calls == self.crash_at {
                self.crash();
            }
        }
        if self.crashed {
            return Err(StorageError {
                op: "io",
                target: "crash-model".into(),
                offset: 0,
                source: std::io::Error::other("machine is down"),
            });
        }
        Ok(())
    }
}

struct CacheDisk(Mutex<Disk>);

impl CacheDisk {
    fn new(image: Vec<u8>, crash_at: u64, seed: u64) -> Arc<Self> {
        Arc::new(Self(Mutex::new(Disk {
            durable: image,
            cache: Vec::new(),
            calls: 0,
            crash_at,
            crashed: false,
            rng: seed | 1,
            torn: false,
        })))
    }

    fn disk(&self) -> std::sync::MutexGuard<'_, Disk> {
        self.0.lock().expect("disk")
    }
}

impl Storage for CacheDisk {
    fn target(&self) -> &str {
        "crash-model"
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), StorageError> {
        let d = self.disk();
        let mut view = d.durable.clone();
        for (off, b) in &d.cache {
            Disk::apply(&mut view, *off, b);
        }
        let end = offset as usize + buf.len();
        if view.len() < end {
            return Err(StorageError {
                op: "read",
                target: "crash-model".into(),
                offset,
                source: std::io::Error::from(std::io::ErrorKind::UnexpectedEof),
            });
        }
        buf.copy_from_slice(&view[offset as usize..end]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), StorageError> {
        let mut d = self.disk();
        d.cache.push((offset, buf.to_vec()));
        d.step()
    }
    fn sync(&self) -> Result<(), StorageError> {
        let mut d = self.disk();
        d.step()?;
        for (off, b) in std::mem::take(&mut d.cache) {
            Disk::apply(&mut d.durable, off, &b);
        }
        Ok(())
    }
    fn size(&self) -> Result<u64, StorageError> {
        Ok(self.disk().durable.len() as u64)
    }
    fn set_len(&self, len: u64) -> Result<(), StorageError> {
        self.disk().durable.resize(len as usize, 0);
        Ok(())
    }
    fn preallocate(&self, len: u64) -> Result<(), StorageError> {
        self.set_len(len)
    }
    fn punch(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        self.zero(offset, len)
    }
    fn zero(&self, offset: u64, len: u64) -> Result<(), StorageError> {
        Disk::apply(&mut self.disk().durable, offset, &vec![0; len as usize]);
        Ok(())
    }
}

fn batches() -> impl Strategy<Value = Vec<Vec<u64>>> {
    let regions = 0..(2 * REGIONS_PER_BLOCK + 100);
    proptest::collection::vec(proptest::collection::vec(regions, 1..6), 1..12)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn a_crash_with_a_volatile_cache_loses_no_acknowledged_mark(
        batches in batches(),
        crash_at in 1u64..40,
        seed: u64,
        full in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        rt.block_on(async {
            let g = geometry();
            let disk = CacheDisk::new(Vec::new(), u64::MAX, seed);
            create(&*disk, g).expect("format");
            let image = disk.disk().durable.clone();
            let disk = CacheDisk::new(image, crash_at, seed);
            let b = Bitmap::open(disk.clone(), g).await.expect("open");
            let peer = ReplicaId::new("site-a").expect("id");
            let started = if full {
                b.reset_all_dirty(peer, Epoch(1)).await.is_ok()
            } else {
                b.start_tracking(peer, Epoch(1)).await.is_ok()
            };
            let mut must = BTreeSet::new();
            let mut may = BTreeSet::new();
            if started {
                for batch in &batches {
                    let marks = batch.iter().map(|&r| b.mark(r * 4096, 4096));
                    let results = futures::future::join_all(marks).await;
                    may.extend(batch.iter().copied());
                    if results.iter().all(|r| r.is_ok()) && !disk.disk().crashed {
                        must.extend(batch.iter().copied());
                    } else {
                        break;
                    }
                }
            }
            let (image, torn) = {
                let mut d = disk.disk();
                if !d.crashed {
                    d.crash();
                }
                (d.durable.clone(), d.torn)
            };
            drop(b);
            let b = Bitmap::open(CacheDisk::new(image, u64::MAX, 0), g).await.expect("reopen");
            let all = g.region_count();
            match b.state() {
                BitmapState::Untrusted(reason) => {
                    assert!(torn, "untrusted ({reason}) without a torn write");
                }
                BitmapState::Clean => {
                    assert!(!started, "tracking acknowledged, clean after the crash");
                }
                BitmapState::Tracking { .. } => {
                    let got: BTreeSet<u64> = b.dirty_regions().map(|r| r.0).collect();
                    if full {
                        assert_eq!(got.len() as u64, all, "a full resync stays full");
                    } else {
                        assert!(must.is_subset(&got), "acknowledged marks lost");
                        assert!(got.is_subset(&may), "marks invented");
                    }
                }
            }
        });
    }
}
