//! The mirror: the frontend's core. It holds a connection to each of the
//! two replicas of a volume, sends every write to both in parallel and
//! acknowledges it only when both have it (design invariant 1); a flush
//! (or a FUA write) completes only when both made it durable. Reads go to
//! the replica marked local, else to the first in-sync one.
//!
//! With an arbiter ([`Mirror::enable_failover`]) every replica call has a
//! timeout; a replica that fails or times out is reported to the fail-over
//! task (`frontend::failover`) and the write is held until the replica is
//! out of the in-sync set, then re-sent to the survivor alone (so that the
//! survivor, told first that its peer left, records it as dirty). Nothing is
//! acknowledged while the lease is not valid. Without an arbiter nothing is
//! ever dropped: I/O waits for both replicas.
//!
//! Exports (NBD, FUSE) see the mirror only through [`BlockBackend`].
//! Requests larger than the protocol's [`MAX_IO_BYTES`] are split.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::try_join_all;
use tokio::sync::{mpsc, watch};

use crate::metrics::{IoOp, Metrics, OpHandles};
use crate::protocol::{
    Epoch, MAX_IO_BYTES, Op, ProtocolVersion, ReplicaId, Reply, Secret, VolumeId, WireError,
};

use super::backend::{BackendError, BlockBackend, check_range};
use super::connection::{
    CallError, ConnectError, ReplicaHandle, ReplicaSpec, ReplicaState, SessionParams,
};
use super::failover::{Failover, Membership, Suspect};
use super::lease::LeaseGuard;
use crate::arbiter::{Arbiter, FrontendId};

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
    replicas: [Arc<ReplicaHandle>; 2],
    local: usize,
    metrics: OpHandles,
    epoch: Epoch,
    membership: watch::Sender<Membership>,
    /// Set by [`Mirror::enable_failover`].
    degrade: Option<Degrade>,
}

/// The mirror's side of degraded operation.
struct Degrade {
    suspects: mpsc::UnboundedSender<Suspect>,
    lease: Arc<LeaseGuard>,
    timeout: Duration,
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
        let (membership, _) = watch::channel(Membership {
            in_sync: [true, true],
            fenced: None,
        });
        for (i, r) in [&ra, &rb].into_iter().enumerate() {
            spawn_state_gauge(
                r,
                i,
                membership.subscribe(),
                metrics.clone(),
                config.volume.clone(),
            );
        }
        tracing::info!(volume = %config.volume, size = ra.size(), epoch = config.epoch.0, local = %config.local, "mirror connected to both replicas");
        Ok(Self {
            size: ra.size(),
            metrics: metrics.handles(vol, ""),
            volume: config.volume,
            replicas: [Arc::new(ra), Arc::new(rb)],
            local,
            epoch: config.epoch,
            membership,
            degrade: None,
        })
    }

    /// Turns on degraded operation: replica calls time out after `timeout`,
    /// lost replicas leave the in-sync set through `arbiter`, and nothing is
    /// acknowledged unless `lease` is valid.
    pub fn enable_failover<A: Arbiter>(
        &mut self,
        arbiter: Arc<A>,
        me: FrontendId,
        lease: Arc<LeaseGuard>,
        timeout: Duration,
        metrics: Arc<Metrics>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = Failover {
            arbiter,
            me,
            epoch: self.epoch,
            lease: lease.clone(),
            replicas: self.replicas.clone(),
            membership: self.membership.clone(),
            metrics,
            volume: self.volume.clone(),
        };
        tokio::spawn(task.run(rx));
        self.degrade = Some(Degrade {
            suspects: tx,
            lease,
            timeout,
        });
    }

    /// The in-sync set as this frontend applies it (for the resync and
    /// status).
    pub fn membership(&self) -> watch::Receiver<Membership> {
        self.membership.subscribe()
    }

    /// Stops sending writes to `replica` (the arbiter has it out of sync).
    pub fn mark_out_of_sync(&self, replica: &ReplicaId) {
        if let Some(i) = self.replicas.iter().position(|r| r.id() == replica) {
            self.membership.send_modify(|m| m.in_sync[i] = false);
            tracing::warn!(volume = %self.volume, replica = %replica, "replica is out of sync at the arbiter: no writes go to it until the resync returns it");
        }
    }

    /// The resync's hook: once the arbiter's `ReturnToInSync` of `replica`
    /// succeeded (and the replica holds every write), writes go to it again.
    /// The caller must make sure no write is in flight that the copy missed.
    pub fn return_to_in_sync(&self, replica: &ReplicaId) -> bool {
        let Some(i) = self.replicas.iter().position(|r| r.id() == replica) else {
            return false;
        };
        self.membership.send_modify(|m| m.in_sync[i] = true);
        tracing::info!(volume = %self.volume, replica = %replica, "replica back in the in-sync set");
        true
    }

    pub fn volume(&self) -> &VolumeId {
        &self.volume
    }

    /// The state of each replica, local first.
    pub fn replica_states(&self) -> Vec<(ReplicaId, ReplicaState)> {
        let order = [self.local, 1 - self.local];
        order
            .iter()
            .map(|&i| (self.replicas[i].id().clone(), self.state_of(i)))
            .collect()
    }

    fn state_of(&self, i: usize) -> ReplicaState {
        if self.membership.borrow().in_sync[i] {
            self.replicas[i].state()
        } else {
            ReplicaState::OutOfSync
        }
    }

    /// Calls replica `i`, with the fail-over timeout if degraded operation
    /// is on.
    async fn call(&self, i: usize, op: Op) -> Result<Reply, CallError> {
        match &self.degrade {
            None => self.replicas[i].call(op).await,
            Some(d) => match tokio::time::timeout(d.timeout, self.replicas[i].call(op)).await {
                Ok(r) => r,
                Err(_) => Err(CallError::TimedOut {
                    replica: self.replicas[i].id().clone(),
                    after: d.timeout,
                }),
            },
        }
    }

    /// Whether `e` means the replica is gone (rather than refusing this
    /// request) and degraded operation may drop it.
    fn is_loss(&self, e: &CallError) -> bool {
        self.degrade.is_some()
            && matches!(
                e,
                CallError::ConnectionLost { .. }
                    | CallError::TimedOut { .. }
                    | CallError::Stopped { .. }
            )
    }

    /// The last check before an acknowledgement: the lease.
    fn may_ack(&self) -> Result<(), BackendError> {
        match &self.degrade {
            Some(d) if !d.lease.valid() => Err(BackendError::Fenced {
                reason: "the lease is not valid (not renewed in time, or taken over)".to_owned(),
            }),
            _ => Ok(()),
        }
    }

    /// The replicas reads may go to, best first: in-sync ones only, the
    /// local one first unless its connection is down and the other's is up.
    fn read_order(&self) -> Vec<usize> {
        let m = self.membership.borrow().in_sync;
        let (l, o) = (self.local, 1 - self.local);
        let up = |i: usize| self.replicas[i].state() == ReplicaState::InSync;
        let mut order = if !up(l) && up(o) {
            vec![o, l]
        } else {
            vec![l, o]
        };
        order.retain(|&i| m[i]);
        order
    }

    async fn read_chunk(&self, offset: u64, len: u32) -> Result<Bytes, BackendError> {
        let mut last = None;
        for i in self.read_order() {
            let started = Instant::now();
            match self.call(i, Op::Read { offset, len }).await {
                Ok(Reply::Data(d)) if d.len() == len as usize => {
                    self.may_ack()?;
                    return Ok(d);
                }
                Ok(_) => {
                    return Err(BackendError::Io(format!(
                        "replica returned a malformed reply to a read of {len} bytes at {offset}"
                    )));
                }
                Err(e) if self.is_loss(&e) => {
                    self.suspect(i, started);
                    last = Some(e);
                }
                Err(e) => return Err(backend_error(e)),
            }
        }
        Err(last.map_or_else(
            || BackendError::Fenced {
                reason: "no in-sync replica".to_owned(),
            },
            backend_error,
        ))
    }

    fn suspect(&self, index: usize, since: Instant) {
        if let Some(d) = &self.degrade {
            let _ = d.suspects.send(Suspect { index, since });
        }
    }

    /// Sends `op` to every in-sync replica at once; done when all are. A
    /// lost replica holds the request until it left the in-sync set, then
    /// the request is sent again to the new set.
    async fn both(&self, op: Op) -> Result<(), BackendError> {
        let mut rx = self.membership.subscribe();
        loop {
            let m = rx.borrow_and_update().clone();
            if let Some(reason) = m.fenced {
                return Err(BackendError::Fenced { reason });
            }
            let started = Instant::now();
            let one = |i: usize| {
                let op = op.clone();
                async move {
                    if m.in_sync[i] {
                        Some(self.call(i, op).await)
                    } else {
                        None
                    }
                }
            };
            let (a, b) = tokio::join!(one(0), one(1));
            let mut lost = false;
            for (i, r) in [a, b].into_iter().enumerate() {
                match r {
                    None | Some(Ok(_)) => {}
                    Some(Err(e)) if self.is_loss(&e) => {
                        self.suspect(i, started);
                        lost = true;
                    }
                    Some(Err(e)) => {
                        tracing::warn!(volume = %self.volume, error = %e, "mirrored request failed");
                        return Err(backend_error(e));
                    }
                }
            }
            if !lost {
                return self.may_ack();
            }
            // Held: no acknowledgement until the in-sync set changed.
            if rx.changed().await.is_err() {
                return Err(BackendError::Io("the mirror is shutting down".to_owned()));
            }
        }
    }

    fn measure<T>(&self, op: IoOp, started: Instant, bytes: u64, r: &Result<T, BackendError>) {
        self.metrics.record(op, started, bytes, r.is_ok());
    }
}

fn spawn_state_gauge(
    r: &ReplicaHandle,
    index: usize,
    mut membership: watch::Receiver<Membership>,
    metrics: Arc<Metrics>,
    volume: VolumeId,
) {
    let mut rx = r.watch_state();
    let id = r.id().clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let conn = *rx.borrow_and_update();
            let state = if membership.borrow_and_update().in_sync[index] {
                conn
            } else {
                ReplicaState::OutOfSync
            };
            if last != Some(state) {
                tracing::info!(volume = %volume, replica = %id, state = state.name(), "replica state");
                last = Some(state);
            }
            metrics.set_replica_state(
                volume.as_str(),
                id.as_str(),
                &ReplicaState::ALL,
                state.name(),
            );
            tokio::select! {
                r = rx.changed() => if r.is_err() { return },
                r = membership.changed() => if r.is_err() { return },
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
