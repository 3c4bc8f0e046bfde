//! The frontend: the process on the pod's node that mirrors every write to
//! both replicas and exports the volume to clients (NBD, FUSE file).

pub mod backend;
mod conflicts;
pub mod connection;
pub mod control;
pub mod failover;
pub mod fuse;
pub mod lease;
pub mod mirror;
pub mod nbd;
pub mod record_view;
pub mod service;
pub mod status;

pub use backend::{BackendError, BlockBackend};
pub use connection::{ReplicaSpec, ReplicaState};
pub use mirror::{Mirror, MirrorConfig, MirrorError};
