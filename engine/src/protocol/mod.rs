//! The replication wire protocol between frontends and replicas.
//!
//! `types` holds the ids and quantities, `message` what can be said,
//! `codec` the only byte layout (frames with a length and a CRC32C),
//! `io` frames over async streams and `handshake` the versioned,
//! authenticated start of every connection.

pub mod codec;
pub mod handshake;
pub mod io;
pub mod message;
pub mod types;

pub use codec::{DecodeError, MAX_FRAME_BODY, MAX_IO_BYTES, Message};
pub use handshake::{HandshakeError, PROTOCOL_VERSION, Secret, SecretError, handshake};
pub use io::{FrameError, FrameReader, FrameWriter};
pub use message::{
    ByteRange, MAX_IN_SYNC, MAX_RANGES, Op, Reply, Request, Response, ResyncReport, Role, Session,
    SyncClaim, SyncView, WireError,
};
pub use types::{
    ArbiterVersion, ArbiterVersionTooLong, Epoch, IdError, ProtocolVersion, RecordStamp, ReplicaId,
    RequestId, SessionGen, SessionKind, VolumeId,
};
