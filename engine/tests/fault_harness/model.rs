//! The write log and what it allows a block to hold.
//!
//! Every write has its own data: each 4 KiB block starts with the seed,
//! the write id and the block's offset, then seeded noise, so a stale,
//! misplaced or foreign block is named in a failure ([`describe`]). Zeroing
//! operations (discard, write-zeroes) are writes of zeros with an id of
//! their own.
//!
//! Exactness: a write acknowledged must read back until an acknowledged
//! write covers it again; a write that failed (not acknowledged) may or may
//! not have landed, so each block keeps the set of values it may hold: the
//! latest acknowledged one first, then those of later unacknowledged writes.
//! The model covers the live region (where the workload writes); the rest
//! of the volume is only ever zeroed, which the divergence comparison
//! checks.

use std::collections::BTreeSet;

use crate::{BLOCK, LIVE, LIVE_BLOCKS, stream};

/// What a write puts in its range.
#[derive(Debug, Clone)]
pub enum Data {
    /// The crc32c of each of its blocks (data from [`block_data`]).
    Blocks(Vec<u32>),
    /// Zeros: `discard` (NBD trim) or `write -z` (NBD write-zeroes).
    Zeros { discard: bool },
}

/// One write of the log.
#[derive(Debug, Clone)]
pub struct Write {
    pub id: u64,
    pub offset: u64,
    pub len: u64,
    pub fua: bool,
    pub data: Data,
}

impl Write {
    /// A data write of `len` bytes at `offset`: its bytes into `out`.
    pub fn data(seed: u64, id: u64, offset: u64, len: u64, fua: bool, out: &mut [u8]) -> Write {
        let out = &mut out[..len as usize];
        let crcs = out
            .chunks_mut(BLOCK as usize)
            .enumerate()
            .map(|(k, block)| {
                block_data(seed, id, offset + k as u64 * BLOCK, block);
                crc32c::crc32c(block)
            })
            .collect();
        Write {
            id,
            offset,
            len,
            fua,
            data: Data::Blocks(crcs),
        }
    }

    pub fn describe(&self) -> String {
        let what = match self.data {
            Data::Blocks(_) => "write",
            Data::Zeros { discard: true } => "discard",
            Data::Zeros { discard: false } => "write-zeroes",
        };
        format!(
            "#{} {what} offset {} len {}{}",
            self.id,
            self.offset,
            self.len,
            if self.fua { " fua" } else { "" }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The client reported it done: acknowledged.
    Acked,
    /// Failed, or in flight when the client lost the frontend or was
    /// killed: may have landed.
    Maybe,
    /// The client could not open the export: never sent.
    NotSent,
}

/// The data of the block at `offset` of write `id`: a header naming it,
/// then noise.
pub fn block_data(seed: u64, id: u64, offset: u64, out: &mut [u8]) {
    out[..4].copy_from_slice(b"TVFH");
    out[4..12].copy_from_slice(&seed.to_le_bytes());
    out[12..20].copy_from_slice(&id.to_le_bytes());
    out[20..28].copy_from_slice(&offset.to_le_bytes());
    stream(seed ^ offset, id).fill(&mut out[28..]);
}

/// What a block read back holds, for failure messages.
pub fn describe(seed: u64, block: &[u8]) -> String {
    if block.iter().all(|&b| b == 0) {
        return "zeros".into();
    }
    if block.len() == BLOCK as usize && &block[..4] == b"TVFH" {
        let word =
            |r: std::ops::Range<usize>| u64::from_le_bytes(block[r].try_into().expect("8 bytes"));
        let (s, id, off) = (word(4..12), word(12..20), word(20..28));
        let mut intact = vec![0u8; BLOCK as usize];
        block_data(s, id, off, &mut intact);
        let whose = if s == seed { "" } else { " of another seed" };
        let state = if intact == block { "" } else { ", corrupted" };
        return format!("write #{id}'s block for offset {off}{whose}{state}");
    }
    "bytes no write of this harness made".into()
}

/// Every live block's possible crc32c values (the first is the latest
/// acknowledged one) and the acknowledged write that made it.
pub struct Model {
    seed: u64,
    zero: u32,
    values: Vec<Vec<u32>>,
    owner: Vec<Option<u64>>,
    pub acked: u64,
    pub maybe: u64,
    /// Acknowledged writes seen intact by at least one check.
    pub verified: BTreeSet<u64>,
    pub lost: BTreeSet<u64>,
}

impl Model {
    pub fn new(seed: u64) -> Model {
        let zero = crc32c::crc32c(&[0u8; BLOCK as usize]);
        Model {
            seed,
            zero,
            values: vec![vec![zero]; LIVE_BLOCKS],
            owner: vec![None; LIVE_BLOCKS],
            acked: 0,
            maybe: 0,
            verified: BTreeSet::new(),
            lost: BTreeSet::new(),
        }
    }

    pub fn apply(&mut self, w: &Write, outcome: Outcome) {
        match outcome {
            Outcome::Acked => self.acked += 1,
            Outcome::Maybe => self.maybe += 1,
            Outcome::NotSent => return,
        }
        let first = w.offset / BLOCK;
        let end = (w.offset + w.len).min(LIVE).div_ceil(BLOCK);
        for b in first..end {
            let crc = match &w.data {
                Data::Blocks(crcs) => crcs[(b - first) as usize],
                Data::Zeros { .. } => self.zero,
            };
            let b = b as usize;
            match outcome {
                Outcome::Acked => {
                    self.values[b] = vec![crc];
                    self.owner[b] = Some(w.id);
                }
                Outcome::Maybe => {
                    if !self.values[b].contains(&crc) {
                        self.values[b].push(crc);
                    }
                }
                Outcome::NotSent => {}
            }
        }
    }

    /// What the log allows block `b` to hold, for failure messages.
    pub fn expected(&self, b: usize) -> String {
        let latest = match self.owner[b] {
            Some(id) => format!("write #{id}"),
            None => "zeros".into(),
        };
        match self.values[b].len() {
            1 => latest,
            n => format!("{latest} or the data of {} unacknowledged write(s)", n - 1),
        }
    }

    /// Checks an image of the live region; returns the mismatches, described.
    pub fn check(&mut self, what: &str, image: &[u8]) -> Vec<String> {
        assert_eq!(image.len() as u64, LIVE, "{what}: short read");
        let mut bad = Vec::new();
        for (b, block) in image.chunks(BLOCK as usize).enumerate() {
            let crc = crc32c::crc32c(block);
            if self.values[b].contains(&crc) {
                if crc == self.values[b][0]
                    && let Some(id) = self.owner[b]
                {
                    self.verified.insert(id);
                }
                continue;
            }
            let expected = match self.owner[b] {
                Some(id) => format!("write #{id}"),
                None => "zeros".into(),
            };
            if let Some(id) = self.owner[b] {
                self.lost.insert(id);
            }
            bad.push(format!(
                "{what}: block at offset {} should hold {expected}{}, holds {}",
                b as u64 * BLOCK,
                if self.values[b].len() > 1 {
                    " (or an unacknowledged write's data)"
                } else {
                    ""
                },
                describe(self.seed, block)
            ));
        }
        bad
    }
}
