//! The mirror: the frontend's core. It holds a connection to each of the
//! two replicas of a volume, sends every write to both in parallel and
//! acknowledges it only when both have it (design invariant 1); a flush
//! (or a FUA write) completes only when both made it durable. Reads go to
//! the replica marked local, else to the first in-sync one.
//!
//! Exports (NBD, FUSE) see the mirror only through [`BlockBackend`].
//! Requests larger than the protocol's [`MAX_IO_BYTES`] are split.

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;

use crate::metrics::{IoOp, Metrics, OpHandles};
use crate::protocol::{
    Epoch, MAX_IO_BYTES, Op, ProtocolVersion, ReplicaId, Reply, Secret, VolumeId, WireError,
};

use super::backend::{BackendError, BlockBackend, check_range};
use super::connection::{
    CallError, ConnectError, ReplicaHandle, ReplicaSpec, ReplicaState, SessionParams,
};

/// How a mirror is set up.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    pub volume: VolumeId,
    /// Exactly two replicas.
    pub replicas: Vec<ReplicaSpec>,
    /// The replica on this site, preferred for reads.
    pub local: ReplicaId,
    pub epoch: Epoch,
    pub secret: Secret,
    /// Normally [`crate::protocol::PROTOCOL_VERSION`].
    pub protocol_version: ProtocolVersion,
}

/// Why the mirror could not start.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    #[error("a mirror needs exactly two replicas, got {0}")]
    ReplicaCount(usize),
    #[error("the local replica {local} is not one of the replicas ({a}, {b})")]
    UnknownLocal {
        local: ReplicaId,
        a: ReplicaId,
        b: ReplicaId,
    },
    #[error("both replicas are named {0}")]
    DuplicateReplica(ReplicaId),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(
        "replica sizes differ: replica {a} has {a_size} bytes but replica {b} has {b_size} bytes; recreate one of them with the other's size"
    )]
    SizeMismatch {
        a: ReplicaId,
        a_size: u64,
        b: ReplicaId,
        b_size: u64,
    },
}

/// A volume mirrored on two replicas.
pub struct Mirror {
    volume: VolumeId,
    size: u64,
    replicas: [ReplicaHandle; 2],
    local: usize,
    metrics: OpHandles,
}

impl Mirror {
    /// Connects to both replicas (in parallel), opens the volume at the
    /// configured epoch on each and checks that their sizes agree.
    pub async fn connect(config: MirrorConfig, metrics: Arc<Metrics>) -> Result<Self, MirrorError> {
        let [a, b]: [ReplicaSpec; 2] = config
            .replicas
            .clone()
            .try_into()
            .map_err(|v: Vec<_>| MirrorError::ReplicaCount(v.len()))?;
        if a.id == b.id {
            return Err(MirrorError::DuplicateReplica(a.id));
        }
        let local = if config.local == a.id {
            0
        } else if config.local == b.id {
            1
        } else {
            return Err(MirrorError::UnknownLocal {
                local: config.local,
                a: a.id,
                b: b.id,
            });
        };
        let params = SessionParams {
            volume: config.volume.clone(),
            epoch: config.epoch,
            secret: config.secret.clone(),
            protocol_version: config.protocol_version,
        };
        let vol = config.volume.as_str();
        let (ra, rb) = tokio::join!(
            ReplicaHandle::connect(
                a.clone(),
                params.clone(),
                metrics.handles(vol, a.id.as_str())
            ),
            ReplicaHandle::connect(b.clone(), params, metrics.handles(vol, b.id.as_str())),
        );
        let (ra, rb) = (ra?, rb?);
        if ra.size() != rb.size() {
            return Err(MirrorError::SizeMismatch {
                a: a.id,
                a_size: ra.size(),
                b: b.id,
                b_size: rb.size(),
            });
        }
        for r in [&ra, &rb] {
            spawn_state_gauge(r, metrics.clone(), config.volume.clone());
        }
        tracing::info!(volume = %config.volume, size = ra.size(), epoch = config.epoch.0, local = %config.local, "mirror connected to both replicas");
        Ok(Self {
            size: ra.size(),
            metrics: metrics.handles(vol, ""),
            volume: config.volume,
            replicas: [ra, rb],
            local,
        })
    }

    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    /// The state of each replica, local first.
    pub fn replica_states(&self) -> Vec<(ReplicaId, ReplicaState)> {
        let order = [self.local, 1 - self.local];
        order
            .iter()
            .map(|&i| (self.replicas[i].id().clone(), self.replicas[i].state()))
            .collect()
    }

    /// The replica reads go to: the local one if in sync, else the other if
    /// in sync, else the local one (the read then waits for it).
    fn read_replica(&self) -> &ReplicaHandle {
        let local = &self.replicas[self.local];
        let other = &self.replicas[1 - self.local];
        if local.state() != ReplicaState::InSync && other.state() == ReplicaState::InSync {
            other
        } else {
            local
        }
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        match self.read_replica().call(Op::Read { offset, len }).await {
            Ok(Reply::Data(d)) if d.len() == len as usize => Ok(d),
            Ok(_) => Err(BackendError::Io(format!(
                "replica returned a malformed reply to a read of {len} bytes at {offset}"
            ))),
            Err(e) => Err(backend_error(e)),
        }
    }

    /// Sends `op` to both replicas at once; done when both are.
    async fn both(&self, op: Op) -> Result<(), BackendError> {
        let (a, b) = tokio::join!(self.replicas[0].call(op.clone()), self.replicas[1].call(op));
        match (a, b) {
            (Ok(_), Ok(_)) => Ok(()),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(volume = %self.volume, error = %e, "mirrored request failed");
                Err(backend_error(e))
            }
        }
    }

    fn measure<T>(&self, op: IoOp, started: Instant, bytes: u64, r: &Result<T, BackendError>) {
        self.metrics.record(op, started, bytes, r.is_ok());
    }
}

fn spawn_state_gauge(r: &ReplicaHandle, metrics: Arc<Metrics>, volume: VolumeId) {
    let mut rx = r.watch_state();
    let id = r.id().clone();
    tokio::spawn(async move {
        loop {
            let state = *rx.borrow_and_update();
            metrics.set_replica_state(
                volume.as_str(),
                id.as_str(),
                &ReplicaState::ALL,
                state.name(),
            );
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

fn backend_error(e: CallError) -> BackendError {
    match e {
        CallError::Refused {
            source: WireError::OutOfRange { offset, len, size },
            ..
        } => BackendError::OutOfRange { offset, len, size },
        CallError::Refused {
            source: e @ WireError::StaleEpoch { .. },
            ..
        } => BackendError::Fenced {
            reason: e.to_string(),
        },
        e @ CallError::Fenced { .. } => BackendError::Fenced {
            reason: e.to_string(),
        },
        e => BackendError::Io(e.to_string()),
    }
}

/// Splits `[offset, offset + len)` into protocol-sized chunks.
fn chunks(offset: u64, len: u64) -> impl Iterator<Item = (u64, u32)> {
    let max = u64::from(MAX_IO_BYTES);
    (0..len.div_ceil(max)).map(move |i| {
        let start = i * max;
        (offset + start, (len - start).min(max) as u32)
    })
}

impl BlockBackend for Mirror {
    fn size(&self) -> u64 {
        self.size
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let started = Instant::now();
        check_range(offset, u64::from(len), self.size)?;
        let r = if len <= MAX_IO_BYTES {
            self.read_chunk(offset, len).await
        } else {
            let parts =
                try_join_all(chunks(offset, u64::from(len)).map(|(o, l)| self.read_chunk(o, l)))
                    .await;
            parts.map(|parts| {
                let mut out = BytesMut::with_capacity(len as usize);
                for p in parts {
                    out.extend_from_slice(&p);
                }
                out.freeze()
            })
        };
        self.measure(IoOp::Read, started, u64::from(len), &r);
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), BackendError> {
        let started = Instant::now();
        let len = data.len() as u64;
        check_range(offset, len, self.size)?;
        let r = if len <= u64::from(MAX_IO_BYTES) {
            self.both(Op::Write { offset, fua, data }).await
        } else {
            try_join_all(chunks(offset, len).map(|(o, l)| {
                let start = (o - offset) as usize;
                let part = data.slice(start..start + l as usize);
                self.both(Op::Write {
                    offset: o,
                    fua,
                    data: part,
                })
            }))
            .await
            .map(|_| ())
        };
        self.measure(IoOp::Write, started, len, &r);
        r
    }

    async fn flush(&self) -> Result<(), BackendError> {
        let started = Instant::now();
        let r = self.both(Op::Flush).await;
        self.measure(IoOp::Flush, started, 0, &r);
        r
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), BackendError> {
        let started = Instant::now();
        check_range(offset, u64::from(len), self.size)?;
        let r = self.both(Op::Trim { offset, len }).await;
        self.measure(IoOp::Trim, started, u64::from(len), &r);
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> Result<(), BackendError> {
        let started = Instant::now();
        check_range(offset, u64::from(len), self.size)?;
        let r = self.both(Op::WriteZeroes { offset, len, fua }).await;
        self.measure(IoOp::WriteZeroes, started, u64::from(len), &r);
        r
    }
}

#[cfg(test)]
#[path = "mirror_tests.rs"]
mod tests;
