//! Growing a mirrored volume online ([`Mirror::resize`]).
//!
//! A resize is acknowledged only once every replica in the in-sync set has
//! grown durably (each replica's `Resize` answers after its data file, its
//! dirty bitmap and its metadata have the new size). Only then does the
//! mirror take requests up to the new end; the exports see it from there
//! on (NBD: new connections; FUSE: the file's size). A replica out of the
//! in-sync set is asked too but need not answer: it is grown when it
//! reconnects (the connection grows a copy smaller than the volume before
//! using it) or when its peer's resync opens it (the source grows a smaller
//! target first), so before it rejoins. Shrinking is refused.
//!
//! Replicas whose sizes differ when the frontend starts (a crash between
//! the two replicas' grows: the resize was never acknowledged) are refused
//! unless the frontend is told the size the volume should have
//! (`--grow-to`, the MirroredVolume's size for the CSI driver): then they
//! are grown to it by [`grow_both`] — completing the grow is as correct as
//! undoing it, and only growing is ever done.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::frontend::connection::{CallError, ReplicaHandle, ReplicaState};
use crate::protocol::{Op, ReplicaId, WireError};

use super::Mirror;

/// How long a replica may take to grow (a preallocation and three syncs).
const RESIZE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a resize was not done.
#[derive(Debug, thiserror::Error)]
pub enum ResizeError {
    #[error(
        "cannot shrink volume {volume} from {current} to {requested} bytes: only growing is supported"
    )]
    Shrink {
        volume: String,
        current: u64,
        requested: u64,
    },
    #[error("invalid size {requested} for volume {volume}: use a positive multiple of 4096 bytes")]
    BadSize { volume: String, requested: u64 },
    #[error("replica {replica} did not grow to {requested} bytes: {source}")]
    Replica {
        replica: ReplicaId,
        requested: u64,
        #[source]
        source: CallError,
    },
    #[error("replica {replica} did not answer the resize within {RESIZE_TIMEOUT:?}")]
    TimedOut { replica: ReplicaId },
    #[error("the frontend is fenced: {reason}")]
    Fenced { reason: String },
    #[error("replica {replica} left the in-sync set before it grew (it grows before it rejoins)")]
    LeftInSync { replica: ReplicaId },
}

impl ResizeError {
    /// Whether the request itself is wrong (as opposed to a replica
    /// failing): asking again will not help.
    pub fn is_invalid(&self) -> bool {
        matches!(
            self,
            ResizeError::Shrink { .. } | ResizeError::BadSize { .. }
        ) || matches!(
            self,
            ResizeError::Replica {
                source: CallError::Refused {
                    source: WireError::ResizeRefused { .. },
                    ..
                },
                ..
            }
        )
    }
}

/// Asks `replica` to grow to `size`, bounded by [`RESIZE_TIMEOUT`].
async fn grow(replica: &ReplicaHandle, size: u64) -> Result<(), ResizeError> {
    match tokio::time::timeout(RESIZE_TIMEOUT, replica.call(Op::Resize { size })).await {
        Ok(Ok(_)) => {
            replica.set_size(size);
            Ok(())
        }
        Ok(Err(source)) => Err(ResizeError::Replica {
            replica: replica.id().clone(),
            requested: size,
            source,
        }),
        Err(_) => Err(ResizeError::TimedOut {
            replica: replica.id().clone(),
        }),
    }
}

/// At startup, with the size the volume was asked to have: grows each
/// replica smaller than `size` to it (an unreachable one reports the other's
/// size and is grown when it connects).
pub(super) async fn grow_both(
    a: &ReplicaHandle,
    b: &ReplicaHandle,
    size: u64,
) -> Result<(), ResizeError> {
    for r in [a, b] {
        if r.size() < size && r.state() != ReplicaState::Connecting {
            tracing::warn!(replica = %r.id(), found = r.size(), size, "replica smaller than the volume's size at startup (a resize that did not reach it): growing it");
            grow(r, size).await?;
        } else if r.size() < size {
            r.set_size(size);
        }
    }
    Ok(())
}

impl Mirror {
    /// Grows replica `i`; with degraded operation, stops waiting once the
    /// replica does not get writes (out of the in-sync set, or taken out
    /// while growing: its loss must not hold the resize).
    async fn grow_one(&self, i: usize, size: u64) -> Result<(), ResizeError> {
        let inner = &self.inner;
        let replica = &inner.replicas[i];
        let mut membership = inner.membership.subscribe();
        let degraded = inner.degrade.get().is_some();
        tokio::select! {
            biased;
            r = grow(replica, size) => r,
            _ = membership.wait_for(|m| !m.gets_writes(i)), if degraded => {
                Err(ResizeError::LeftInSync { replica: replica.id().clone() })
            }
        }
    }

    /// Grows the volume to `size` bytes (see the module doc); returns the
    /// size it has afterwards. The same size again is a no-op. Resizes run
    /// one at a time; I/O goes on meanwhile.
    pub async fn resize(&self, size: u64) -> Result<u64, ResizeError> {
        let inner = &self.inner;
        let _one = inner.resizing.lock().await;
        let current = inner.size.load(Ordering::SeqCst);
        let volume = inner.volume.to_string();
        if size == 0 || !size.is_multiple_of(4096) {
            return Err(ResizeError::BadSize {
                volume,
                requested: size,
            });
        }
        if size < current {
            return Err(ResizeError::Shrink {
                volume,
                current,
                requested: size,
            });
        }
        let m = inner.membership.borrow().clone();
        if let Some(reason) = &m.fenced {
            return Err(ResizeError::Fenced {
                reason: reason.to_string(),
            });
        }
        if size == current {
            return Ok(current);
        }
        tracing::info!(volume = %inner.volume, from = current, to = size, "growing the volume");
        let (ra, rb) = tokio::join!(self.grow_one(0, size), self.grow_one(1, size));
        let now = inner.membership.borrow().clone();
        for (i, r) in [ra, rb].into_iter().enumerate() {
            let Err(e) = r else { continue };
            // Without an arbiter both replicas count as in sync.
            let required = now.gets_writes(i) || inner.degrade.get().is_none();
            if required {
                tracing::error!(volume = %inner.volume, error = %crate::error_chain(&e), "resize failed on a replica in sync: the volume keeps its size");
                return Err(e);
            }
            tracing::warn!(volume = %inner.volume, replica = %inner.replicas[i].id(), error = %crate::error_chain(&e), "replica out of sync not grown now: it grows before it rejoins");
        }
        inner.size.fetch_max(size, Ordering::SeqCst);
        tracing::info!(volume = %inner.volume, size, "volume grown on every replica in sync");
        Ok(size)
    }
}
