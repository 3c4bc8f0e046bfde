//! A volatile write cache for [`FaultyStorage`](super::FaultyStorage)
//! (feature `failpoints`): the model of a site's power loss.
//!
//! Why a model: a replica's writes sit in the host's page cache until an
//! fdatasync; a power cut loses them, but `kill -9` does not (the kernel
//! keeps the killed process's dirty pages and writes them back). So a test
//! cannot cut power by killing a process — unless the "page cache" lives in
//! the process. That is this cache: writes, trims and write-zeroes are held
//! in memory until `sync`, which applies them to the file and fdatasyncs
//! it; reads see them. Killing the process then drops exactly what a power
//! cut drops: every write not yet synced.
//!
//! Shape: the held writes are a map of non-overlapping byte ranges (a newer
//! write replaces the overlapped parts of older ones), each holding data or
//! "zeroes" (write-zeroes and punched holes, which cost no memory however
//! large). Like a kernel's writeback, the cache writes everything back to
//! the file (without syncing) once it holds more than its limit of data:
//! then a power cut may keep those writes, which a real one may too.
//!
//! A failed sync (an injected `::sync` fault) drops what the cache held, as
//! Linux does with the dirty pages of a failed fdatasync: the data is gone,
//! reads return the file's older bytes, and a later sync succeeds without
//! it — what a replica must never take as "durable" (see
//! [`crate::data_sync`]).

use std::collections::BTreeMap;

use super::{Storage, StorageError};

/// What one held range holds.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Held {
    Data(Vec<u8>),
    /// Write-zeroes: reads back zeroes, blocks stay allocated.
    Zero,
    /// A discard: reads back zeroes, blocks may be freed.
    Punch,
}

#[derive(Debug, Clone)]
struct Range {
    end: u64,
    held: Held,
}

impl Range {
    /// The part `[from, to)` of this range, which starts at `start`.
    fn part(&self, start: u64, from: u64, to: u64) -> Range {
        let held = match &self.held {
            Held::Data(d) => Held::Data(d[(from - start) as usize..(to - start) as usize].to_vec()),
            other => other.clone(),
        };
        Range { end: to, held }
    }

    fn data_len(&self) -> u64 {
        match &self.held {
            Held::Data(d) => d.len() as u64,
            _ => 0,
        }
    }
}

/// The writes not yet synced to the file below.
#[derive(Debug)]
pub(super) struct WriteCache {
    ranges: BTreeMap<u64, Range>,
    data_bytes: u64,
    limit: u64,
}

impl WriteCache {
    /// A cache that writes back once it holds more than `limit` bytes of
    /// data.
    pub(super) fn new(limit: u64) -> Self {
        Self {
            ranges: BTreeMap::new(),
            data_bytes: 0,
            limit,
        }
    }

    /// Bytes of data held (zero ranges cost none).
    pub(super) fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Whether nothing is held.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Removes `[start, end)` from the held ranges, keeping the parts of
    /// overlapped ranges outside it.
    fn carve(&mut self, start: u64, end: u64) {
        let overlapped: Vec<u64> = self
            .ranges
            .range(..end)
            .rev()
            .take_while(|(_, r)| r.end > start)
            .map(|(&s, _)| s)
            .collect();
        for s in overlapped {
            let Some(r) = self.ranges.remove(&s) else {
                continue;
            };
            self.data_bytes -= r.data_len();
            if s < start {
                let left = r.part(s, s, start);
                self.data_bytes += left.data_len();
                self.ranges.insert(s, left);
            }
            if r.end > end {
                let right = r.part(s, end, r.end);
                self.data_bytes += right.data_len();
                self.ranges.insert(end, right);
            }
        }
    }

    fn hold(&mut self, offset: u64, len: u64, held: Held) {
        if len == 0 {
            return;
        }
        let end = offset + len;
        self.carve(offset, end);
        let r = Range { end, held };
        self.data_bytes += r.data_len();
        self.ranges.insert(offset, r);
    }

    /// Holds a write. Returns whether the cache went over its limit (the
    /// caller then writes it back).
    pub(super) fn write(&mut self, buf: &[u8], offset: u64) -> bool {
        self.hold(offset, buf.len() as u64, Held::Data(buf.to_vec()));
        self.data_bytes > self.limit
    }

    pub(super) fn zero(&mut self, offset: u64, len: u64) {
        self.hold(offset, len, Held::Zero);
    }

    pub(super) fn punch(&mut self, offset: u64, len: u64) {
        self.hold(offset, len, Held::Punch);
    }

    /// Lays the held ranges over `buf`, which holds the file's bytes from
    /// `offset`.
    pub(super) fn overlay(&self, buf: &mut [u8], offset: u64) {
        let end = offset + buf.len() as u64;
        let first = self
            .ranges
            .range(..=offset)
            .next_back()
            .map_or(offset, |(&s, _)| s);
        for (&s, r) in self.ranges.range(first..end) {
            if r.end <= offset {
                continue;
            }
            let from = s.max(offset);
            let to = r.end.min(end);
            let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
            match &r.held {
                Held::Data(d) => dst.copy_from_slice(&d[(from - s) as usize..(to - s) as usize]),
                Held::Zero | Held::Punch => dst.fill(0),
            }
        }
    }

    /// Applies every held range to `inner` (not synced) and empties the
    /// cache. On an error the cache keeps what was not applied yet.
    pub(super) fn write_back(&mut self, inner: &dyn Storage) -> Result<(), StorageError> {
        while let Some((s, r)) = self.ranges.pop_first() {
            let len = r.end - s;
            let applied = match &r.held {
                Held::Data(d) => inner.write_at(d, s),
                Held::Zero => inner.zero(s, len),
                Held::Punch => inner.punch(s, len),
            };
            if let Err(e) = applied {
                self.ranges.insert(s, r);
                return Err(e);
            }
            self.data_bytes -= r.data_len();
        }
        Ok(())
    }

    /// Forgets every held range (a failed sync: the pages are gone).
    pub(super) fn drop_all(&mut self) {
        self.ranges.clear();
        self.data_bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::FileStorage;
    use proptest::prelude::*;

    fn file(len: u64) -> (tempfile::TempDir, FileStorage) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = FileStorage::create_new(&dir.path().join("f")).expect("create");
        s.set_len(len).expect("set_len");
        (dir, s)
    }

    fn read(cache: &WriteCache, inner: &FileStorage, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        inner.read_at(&mut buf, offset).expect("read");
        cache.overlay(&mut buf, offset);
        buf
    }

    #[test]
    fn newer_writes_replace_the_overlapped_parts_of_older_ones() {
        let (_d, inner) = file(64);
        let mut c = WriteCache::new(u64::MAX);
        c.write(&[1; 16], 8);
        c.write(&[2; 4], 12);
        c.zero(20, 2);
        assert_eq!(c.data_bytes(), 14);
        let mut want = vec![0u8; 64];
        want[8..24].fill(1);
        want[12..16].fill(2);
        want[20..22].fill(0);
        assert_eq!(read(&c, &inner, 0, 64), want);
        // Nothing reached the file yet; a write-back puts it all there.
        assert_eq!(read(&WriteCache::new(0), &inner, 0, 64), vec![0u8; 64]);
        c.write_back(&inner).expect("write back");
        assert!(c.is_empty());
        assert_eq!(read(&c, &inner, 0, 64), want);
    }

    #[test]
    fn dropped_writes_leave_the_file_as_it_was() {
        let (_d, inner) = file(16);
        inner.write_at(&[7; 16], 0).expect("write");
        let mut c = WriteCache::new(u64::MAX);
        c.write(&[9; 8], 4);
        c.punch(0, 2);
        c.drop_all();
        assert_eq!(read(&c, &inner, 0, 16), vec![7u8; 16]);
    }

    #[test]
    fn going_over_the_limit_asks_for_a_write_back() {
        let mut c = WriteCache::new(10);
        assert!(!c.write(&[1; 10], 0));
        assert!(!c.write(&[1; 10], 0), "a rewrite does not grow the cache");
        assert!(c.write(&[1; 1], 100));
    }

    proptest! {
        /// The cache over a file reads like the same operations applied to
        /// the file directly, and so does the file after a write-back.
        #[test]
        fn the_cache_reads_like_the_file_it_models(
            ops in proptest::collection::vec((0u8..3, 0u64..200, 1u64..60, any::<u8>()), 1..40),
            at in 0u64..200, len in 1usize..56,
        ) {
            let (_d1, direct) = file(256);
            let (_d2, inner) = file(256);
            let mut c = WriteCache::new(u64::MAX);
            for (kind, off, l, byte) in ops {
                match kind {
                    0 => {
                        direct.write_at(&vec![byte; l as usize], off).expect("write");
                        c.write(&vec![byte; l as usize], off);
                    }
                    1 => {
                        direct.write_at(&vec![0; l as usize], off).expect("zero");
                        c.zero(off, l);
                    }
                    _ => {
                        direct.write_at(&vec![0; l as usize], off).expect("punch");
                        c.punch(off, l);
                    }
                }
            }
            let mut want = vec![0u8; len];
            direct.read_at(&mut want, at).expect("read");
            prop_assert_eq!(read(&c, &inner, at, len), want.clone());
            c.write_back(&inner).expect("write back");
            let mut got = vec![0u8; len];
            inner.read_at(&mut got, at).expect("read");
            prop_assert_eq!(got, want);
        }
    }
}
