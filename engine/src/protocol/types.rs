//! Identifier and quantity newtypes shared by the wire protocol, the replica
//! and the frontend.
//!
//! Ids are validated once, in their constructors, so that everything holding
//! a `VolumeId` can use it as a path component or a metric label without
//! re-checking it. Quantities that are easy to confuse (an epoch and a
//! request id are both `u64` on the wire) get distinct types.

use std::fmt;
use std::str::FromStr;

/// Longest id accepted for a volume or a replica, in bytes.
pub const MAX_ID_LEN: usize = 63;

/// Why a string is not a valid id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} id is empty")]
    Empty { kind: &'static str },
    #[error("{kind} id {id:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str, id: String },
    #[error(
        "{kind} id {id:?} contains {bad:?}: use lowercase letters, digits, '-', '_' and '.', starting with a letter or digit"
    )]
    BadChar {
        kind: &'static str,
        id: String,
        bad: char,
    },
}

/// Ids are DNS-label-like so that they are safe as file names (no `/`, no
/// `..`), as Kubernetes object names and as metric label values.
fn validate_id(kind: &'static str, id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            id: id.to_owned(),
        });
    }
    for (i, c) in id.chars().enumerate() {
        let ok =
            c.is_ascii_lowercase() || c.is_ascii_digit() || (i > 0 && matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(IdError::BadChar {
                kind,
                id: id.to_owned(),
                bad: c,
            });
        }
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `id` (see [`MAX_ID_LEN`] and the allowed characters).
            pub fn new(id: impl Into<String>) -> Result<Self, IdError> {
                let id = id.into();
                validate_id($kind, &id)?;
                Ok(Self(id))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }
    };
}

string_id!(
    /// The name of a volume, the same on both replicas and the frontend.
    VolumeId,
    "volume"
);
string_id!(
    /// The name of one replica of a volume (usually its site), as the
    /// frontend knows it.
    ReplicaId,
    "replica"
);

/// The volume epoch: bumped by every (re)assignment of the frontend. A
/// replica refuses requests carrying an epoch older than the highest it has
/// persisted (design invariant 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Epoch(pub u64);

impl Epoch {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for Epoch {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(Epoch)
    }
}

/// The version of the arbiter's record a frontend decided on, carried to the
/// replicas with an in-sync change so that their logs and metadata can name
/// the decision. Opaque (a counter for the file arbiter, a resourceVersion
/// for Kubernetes); at most [`MAX_ARBITER_VERSION_LEN`] bytes of UTF-8 so
/// that it fits its length byte on the wire.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ArbiterVersion(String);

/// Longest [`ArbiterVersion`] accepted, in bytes.
pub const MAX_ARBITER_VERSION_LEN: usize = 255;

/// Why a string is not a valid [`ArbiterVersion`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("arbiter version of {len} bytes is longer than {MAX_ARBITER_VERSION_LEN}")]
pub struct ArbiterVersionTooLong {
    pub len: usize,
}

impl ArbiterVersion {
    pub fn new(v: impl Into<String>) -> Result<Self, ArbiterVersionTooLong> {
        let v = v.into();
        if v.len() > MAX_ARBITER_VERSION_LEN {
            return Err(ArbiterVersionTooLong { len: v.len() });
        }
        Ok(Self(v))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for ArbiterVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which kind of client a session (one connection with the volume open)
/// belongs to. Within an epoch a replica has one client of each kind: the
/// frontend that holds the epoch, and the resync of its peer replica; a
/// newer session of a kind fences the older ones of that kind (design
/// invariant 3), so that nothing still queued on a connection its client
/// gave up on can be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SessionKind {
    /// The volume's frontend (the lease holder of the epoch).
    Frontend,
    /// The peer replica's resync, copying to this replica.
    Resync,
}

impl SessionKind {
    pub const ALL: [SessionKind; 2] = [SessionKind::Frontend, SessionKind::Resync];

    pub fn name(self) -> &'static str {
        match self {
            SessionKind::Frontend => "frontend",
            SessionKind::Resync => "resync",
        }
    }

    /// Index in per-kind tables.
    pub fn index(self) -> usize {
        match self {
            SessionKind::Frontend => 0,
            SessionKind::Resync => 1,
        }
    }
}

impl fmt::Display for SessionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The generation of one session of a client: chosen by the client,
/// greater than every one it used before on that replica in the epoch (a
/// replica that saw a newer one refuses an older one, and tells the client
/// the floor so that a restarted client can skip past it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SessionGen(pub u64);

impl fmt::Display for SessionGen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Where a record a replica learned stands in the arbiter's history: the
/// epoch of the frontend that published it, then the count of records that
/// frontend published in its epoch. Only the lease holder of an epoch
/// changes the in-sync set during it (every acquisition bumps the epoch),
/// so this order is the arbiter's own order, whatever its versions look
/// like (they are opaque).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct RecordStamp {
    pub epoch: Epoch,
    pub seq: u64,
}

impl fmt::Display for RecordStamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.epoch, self.seq)
    }
}

/// Identifies one request on one connection, so that responses can come
/// back in any order (pipelining). Chosen by the client; unique among the
/// requests it has in flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The protocol version spoken on a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProtocolVersion(pub u32);

impl fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_reject_path_tricks_and_uppercase() {
        assert!(VolumeId::new("pvc-1234.a_b").is_ok());
        assert!(matches!(VolumeId::new(""), Err(IdError::Empty { .. })));
        assert!(matches!(
            VolumeId::new("../x"),
            Err(IdError::BadChar { bad: '.', .. })
        ));
        assert!(matches!(
            VolumeId::new("a/b"),
            Err(IdError::BadChar { bad: '/', .. })
        ));
        assert!(matches!(
            ReplicaId::new("Site"),
            Err(IdError::BadChar { bad: 'S', .. })
        ));
        assert!(matches!(
            ReplicaId::new("a".repeat(64)),
            Err(IdError::TooLong { .. })
        ));
    }
}
