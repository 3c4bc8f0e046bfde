//! The seam between the exports (NBD, FUSE) and what stands behind them.
//!
//! An export speaks a client protocol and nothing else; everything it needs
//! from the volume is this trait. The mirror (`frontend::mirror`) is the
//! production implementation; the exports are generic over the trait (static
//! dispatch, no boxing on the hot path).
//!
//! Offsets and lengths are bytes. Implementations check bounds and return
//! [`BackendError::OutOfRange`] without touching data; exports may check
//! earlier to answer their clients precisely, but never rely on it.

use std::future::Future;

use bytes::Bytes;

/// Why an I/O on the volume failed, in terms an export can map onto its
/// protocol's error codes (NBD errno values, FUSE errno).
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request reaches past the end of the volume (or has zero length
    /// where that is not allowed). Nothing was read or written.
    #[error(
        "request at offset {offset} length {len} is beyond the end of the volume ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// The volume cannot serve I/O right now and will not without outside
    /// action (for example: fenced by a newer epoch).
    #[error("volume is fenced: {reason}")]
    Fenced { reason: String },
    /// The I/O failed on the replicas.
    #[error("I/O error: {0}")]
    Io(String),
}

/// A block volume as an export sees it.
///
/// Semantics the exports rely on:
/// - `write` with `fua = true` completes only once the data is on stable
///   storage (on every in-sync replica, for the mirror);
/// - `flush` completes once every write completed before it was issued is on
///   stable storage;
/// - `trim` may discard the range (reads may then return zeroes or the old
///   data); `write_zeroes` guarantees zeroes.
pub trait BlockBackend: Send + Sync + 'static {
    /// Size of the volume in bytes.
    fn size(&self) -> u64;
    /// Read `len` bytes at `offset`.
    fn read(
        &self,
        offset: u64,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;
    /// Write `data` at `offset`.
    fn write(
        &self,
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Make every completed write durable.
    fn flush(&self) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Discard a range (advisory).
    fn trim(&self, offset: u64, len: u32) -> impl Future<Output = Result<(), BackendError>> + Send;
    /// Write zeroes over a range.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        fua: bool,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Checks that `[offset, offset + len)` lies inside a volume of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), BackendError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(BackendError::OutOfRange { offset, len, size }),
    }
}
