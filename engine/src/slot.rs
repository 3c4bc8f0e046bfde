//! What the engine's checksummed on-disk slots share: the replica metadata
//! (`replica::meta`), the bitmap header (`bitmap::format`) and the activity
//! log (`activity_log::format`) each keep A/B slots with a magic, a format
//! version, little-endian fields and a CRC32C. Their layouts differ; the way
//! a slot is judged invalid and how its fields are read do not, so they live
//! here once.

/// Why one slot is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("never written")]
    Empty,
    #[error("bad magic")]
    BadMagic,
    #[error("checksum mismatch")]
    BadChecksum,
    #[error("format version {0}")]
    Version(u32),
    #[error("bad field {0}")]
    BadField(&'static str),
}

/// The little-endian `u64` at `at` (the caller checked the slot's length).
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

/// The little-endian `u32` at `at` (the caller checked the slot's length).
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
