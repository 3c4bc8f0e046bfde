//! The messages of the replication protocol, as Rust types.
//!
//! Encoding lives in `protocol::codec` alone; this module only says what can
//! be said. Two groups:
//! - the handshake (`Hello`, `Proof`, `Welcome`, `Refused`): `Hello` and
//!   `Refused` have a layout frozen across protocol versions, so that two
//!   versions can always tell each other, clearly, that they differ;
//! - requests (frontend → replica) and responses (replica → frontend), each
//!   carrying a [`RequestId`] so that many can be in flight on one connection.
//!   Every request carries the volume [`Epoch`]; `Open` starts a
//!   [`Session`], whose older siblings of the same kind the replica fences.

use bytes::Bytes;

use super::types::{
    ArbiterVersion, Epoch, ProtocolVersion, RecordStamp, ReplicaId, RequestId, SessionGen,
    SessionKind, VolumeId,
};

/// Length of the handshake nonces and of the HMAC-SHA256 proofs.
pub const NONCE_LEN: usize = 32;
pub const PROOF_LEN: usize = 32;

/// Which end of a connection a peer says it is; part of what a proof covers,
/// so that a proof made by one role is never accepted from the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Frontend,
    Replica,
}

/// First frame each side sends, without waiting for the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hello {
    pub version: ProtocolVersion,
    pub role: Role,
    pub nonce: [u8; NONCE_LEN],
}

/// Why a side refused the connection during the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusalReason {
    /// The peer speaks another protocol version.
    Version,
    /// The peer's proof of the shared secret was wrong.
    Auth,
    /// The peer sent something that is not the handshake.
    Protocol,
}

/// Sent by the refusing side before it closes: both versions, so that the
/// other side can say exactly what differs even if it cannot decode anything
/// else of ours.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub reason: RefusalReason,
    /// Version spoken by the side that refuses.
    pub refuser_version: ProtocolVersion,
    /// Version the refusing side saw from its peer (0 if none was seen).
    pub peer_version: ProtocolVersion,
    pub message: String,
}

/// A request from the frontend. `epoch` is the frontend's volume epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    pub epoch: Epoch,
    pub op: Op,
}

/// What a request asks for. Offsets and lengths are bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Bind the connection to a volume, as `session`. Raises the replica's
    /// persisted epoch to the request's epoch if that is newer (persisted
    /// before the reply). `expected_size`, when given, must equal the
    /// volume's size. Within the epoch, sessions of `session.kind` older
    /// than `session.generation` are fenced before the answer (none of
    /// their requests runs any more, none is still running); an older
    /// generation than one already seen is refused
    /// ([`WireError::StaleSession`]). A [`SessionKind::Resync`] session
    /// carries the source's `claim` to be a resync source, checked against
    /// the record this replica knows (refused with
    /// [`WireError::NotSource`]); a frontend session carries none.
    Open {
        volume: VolumeId,
        expected_size: Option<u64>,
        session: Session,
        claim: Option<SyncClaim>,
    },
    Read {
        offset: u64,
        len: u32,
    },
    /// With `fua`, acknowledged only once on stable storage. With
    /// `mirrored`, the frontend sends this write to the other replica too
    /// (and re-sends it to this one alone if the other fails it): a replica
    /// that tracks that peer orders the write against its resync's copies
    /// but does not mark it dirty. This is what lets a catching-up peer
    /// converge under load. The same flag on `Trim` and `WriteZeroes`.
    Write {
        offset: u64,
        fua: bool,
        mirrored: bool,
        data: Bytes,
    },
    /// Acknowledged once every write acknowledged before it is on stable
    /// storage.
    Flush,
    Trim {
        offset: u64,
        len: u32,
        mirrored: bool,
    },
    WriteZeroes {
        offset: u64,
        len: u32,
        fua: bool,
        mirrored: bool,
    },
    /// The frontend tells the replica `you` the arbiter's record as it
    /// stands (`view`: which of the two replicas are in sync), with `peer`
    /// the other replica. The replica persists the view (refusing one older
    /// than what it knows, [`WireError::StaleView`]) and acts on it before
    /// answering: `you` in sync and `peer` out — it durably tracks the
    /// regions its peer misses, so that no write acknowledged without the
    /// peer goes unrecorded; both in sync — it stops tracking once nothing
    /// is dirty; `you` out of sync — it is no resync source and drops its
    /// tracking. `fence`: the frontend gave up its sessions to `peer` below
    /// this generation; persisted, and applied on the peer
    /// ([`Op::FenceSessions`]) by this replica's resync before it copies
    /// anything more. Carries exactly the current epoch (`view.epoch`
    /// too), like data requests; sent with no write of the connection in
    /// flight.
    PeerState {
        you: ReplicaId,
        peer: ReplicaId,
        view: SyncView,
        /// The peer's incarnation as the frontend knew it while it was in
        /// sync (0: unknown): a peer that answers later with another one was
        /// recreated and gets a full copy.
        peer_incarnation: u64,
        fence: Option<SessionGen>,
    },
    /// Fence this replica's sessions of `kind` older than `below`, at the
    /// request's epoch: answered once none of their requests runs any
    /// more. A resync sends it for the frontend's sessions its frontend
    /// gave up on (learned through `PeerState`), before copying.
    FenceSessions {
        kind: SessionKind,
        below: SessionGen,
    },
    /// How far the replica's resync of its out-of-sync peer is: answered
    /// with [`Reply::Resync`] from the live dirty bitmap. The lease holder
    /// polls it to learn when the returning replica may rejoin.
    ResyncStatus,
    /// The byte ranges of the replica's activity-log extents (every extent
    /// that may have had a write in flight, recovered ones included):
    /// answered with [`Reply::Extents`]. A new frontend reconciles them.
    ActiveExtents,
    /// Durably mark these ranges dirty for the peer the replica tracks
    /// (refused with [`WireError::NotTracking`] if it tracks none). Answered
    /// once the marks are on stable storage.
    MarkDirty {
        ranges: Vec<ByteRange>,
    },
    /// Drop every activity-log extent with no write in flight (recovered
    /// ones too), durably: the frontend knows they hold the same data on
    /// both replicas (after a final flush on both, or after marking them
    /// dirty on the resync source).
    ForgetActivity,
    /// The byte ranges of the activity-log extents this replica recovered
    /// when it opened the volume while it counted its peer in sync, not
    /// reconciled since (the whole volume if its log was unreadable): what
    /// a crash or power cut of its site may have taken from this copy.
    /// Answered with [`Reply::Extents`]. A returning replica's are marked
    /// dirty on the in-sync one before it catches up (`0x26`).
    RecoveredExtents,
    /// These ranges were reconciled (marked dirty on the peer): their
    /// extents leave the recovered set and the activity log (once this
    /// copy's writes to them are durable and none is in flight). Unlike
    /// `ForgetActivity`, only what the caller marked (`0x27`).
    ForgetExtents {
        ranges: Vec<ByteRange>,
    },
    /// Grow the volume to `size` bytes (a positive multiple of 4096, not
    /// below the current size; the same size is a no-op): the data file is
    /// preallocated, the dirty bitmap extended, and the new size committed
    /// in the metadata — answered once all of it is durable (`0x30`). A
    /// crash on the way leaves the volume at its old size or the new one.
    /// Refused with [`WireError::ResizeRefused`] for a smaller size.
    Resize {
        size: u64,
    },
}

/// Which session a connection is: a client's kind and the generation it
/// chose for this connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Session {
    pub kind: SessionKind,
    pub generation: SessionGen,
}

/// Most replicas a [`SyncView`] lists.
pub const MAX_IN_SYNC: usize = 2;

/// The arbiter's in-sync set as a frontend published it to the replicas:
/// the `seq`-th record the lease holder of `epoch` published. Views are
/// ordered by [`SyncView::stamp`]; a replica keeps the newest it learned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncView {
    pub epoch: Epoch,
    pub seq: u64,
    /// The record's version at the arbiter (for logs; opaque).
    pub arbiter_version: ArbiterVersion,
    /// The replicas that hold every acknowledged write (sorted, at most
    /// [`MAX_IN_SYNC`]).
    pub in_sync: Vec<ReplicaId>,
}

impl SyncView {
    pub fn stamp(&self) -> RecordStamp {
        RecordStamp {
            epoch: self.epoch,
            seq: self.seq,
        }
    }

    /// Whether the view lists `replica` as in sync.
    pub fn lists(&self, replica: &ReplicaId) -> bool {
        self.in_sync.contains(replica)
    }
}

/// What a resync source claims when it opens its session on the target:
/// its name, the target's, and the newest view it knows (which lists it in
/// sync and the target out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyncClaim {
    pub source: ReplicaId,
    pub target: ReplicaId,
    pub view: SyncView,
}

/// A byte range of a volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteRange {
    pub offset: u64,
    pub len: u64,
}

/// Most ranges one `MarkDirty` or `Extents` may carry.
pub const MAX_RANGES: usize = 8192;

/// A replica's answer to [`Op::ResyncStatus`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResyncReport {
    /// The peer whose missed regions the replica tracks, if any.
    pub tracking: Option<ReplicaId>,
    /// Bytes of the regions still dirty (to copy to the peer).
    pub dirty_bytes: u64,
    /// Bytes the replica's resync has copied since it started.
    pub copied_bytes: u64,
}

impl Op {
    /// Short name for logs and metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Open { .. } => "open",
            Op::Read { .. } => "read",
            Op::Write { .. } => "write",
            Op::Flush => "flush",
            Op::Trim { .. } => "trim",
            Op::WriteZeroes { .. } => "write_zeroes",
            Op::PeerState { .. } => "peer_state",
            Op::ResyncStatus => "resync_status",
            Op::ActiveExtents => "active_extents",
            Op::MarkDirty { .. } => "mark_dirty",
            Op::ForgetActivity => "forget_activity",
            Op::RecoveredExtents => "recovered_extents",
            Op::ForgetExtents { .. } => "forget_extents",
            Op::FenceSessions { .. } => "fence_sessions",
            Op::Resize { .. } => "resize",
        }
    }
}

/// A replica's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub id: RequestId,
    pub result: Result<Reply, WireError>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Answer to `Open`: the volume's size, the replica's epoch (after
    /// raising it) and the incarnation of this copy of the volume (random,
    /// fixed when it was created).
    Opened {
        size: u64,
        epoch: Epoch,
        incarnation: u64,
    },
    /// Answer to `Read`.
    Data(Bytes),
    /// Answer to `ResyncStatus`.
    Resync(ResyncReport),
    /// Answer to `ActiveExtents` and `RecoveredExtents`.
    Extents(Vec<ByteRange>),
    /// Answer to every other request.
    Done,
}

/// Errors a replica reports for one request. Each has its own code on the
/// wire, so that the frontend acts on the code, never on text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(
        "stale epoch: the request carries epoch {seen} but the replica has seen epoch {current}; a newer frontend owns the volume"
    )]
    StaleEpoch { seen: Epoch, current: Epoch },
    #[error(
        "epoch {seen} was never opened on this replica (its epoch is {current}); open the volume with it first"
    )]
    EpochNotOpened { seen: Epoch, current: Epoch },
    #[error(
        "request at offset {offset} length {len} is beyond the end of the volume ({size} bytes)"
    )]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("size mismatch: expected {expected} bytes but the replica's volume has {actual} bytes")]
    SizeMismatch { expected: u64, actual: u64 },
    #[error("no volume {volume} in this replica's pool")]
    NoSuchVolume { volume: VolumeId },
    #[error("no volume is open on this connection")]
    NotOpen,
    #[error("a volume is already open on this connection")]
    AlreadyOpen,
    #[error("request of {len} bytes is larger than the maximum of {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("replica I/O error: {message}")]
    Io { message: String },
    #[error("the replica tracks no out-of-sync peer, so it cannot mark regions dirty")]
    NotTracking,
    /// The volume's copy on this replica can no longer be trusted (an
    /// fdatasync of its data failed, so writes it acknowledged may be gone):
    /// every request is refused until the replica restarts. The frontend
    /// treats it as the loss of the replica.
    #[error("replica volume failed: {reason}")]
    VolumeFailed { reason: String },
    #[error(
        "stale {kind} session {seen}: the replica has fenced {kind} sessions below {floor} (a newer session of this client exists, or its client gave it up)"
    )]
    StaleSession {
        kind: SessionKind,
        seen: SessionGen,
        floor: SessionGen,
    },
    #[error(
        "stale record: the request carries the arbiter's record as of {seen} but the replica knows it as of {current}"
    )]
    StaleView {
        seen: RecordStamp,
        current: RecordStamp,
    },
    #[error(
        "not a resync source: {reason} (the arbiter's record as of {stamp}, version {version})",
        stamp = .known.stamp(),
        version = .known.arbiter_version
    )]
    NotSource { known: SyncView, reason: String },
    /// A `Resize` the replica will not do (a smaller size than the
    /// volume's: shrinking is never done; a size that is not a multiple of
    /// 4096).
    #[error("resize of the volume from {current} to {requested} bytes refused: {reason}")]
    ResizeRefused {
        current: u64,
        requested: u64,
        reason: String,
    },
}
