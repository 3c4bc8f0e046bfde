//! The replica server: keeps one copy of each of its volumes in a pool
//! directory and serves them over the replication protocol.
//!
//! `pool` owns the directory layout and volume creation, `meta` the on-disk
//! metadata format, `logs` the activity log and dirty bitmap of an open
//! volume, `volume` an open volume (epoch gate, data I/O), `sessions` the
//! fencing of connections a client gave up on, `direction` which way a
//! resync may go (from the arbiter's record), `server` the listener and
//! its connections, `service` the process around it (metrics endpoint,
//! ready file, shutdown).

pub mod direction;
pub mod logs;
pub mod meta;
pub mod pool;
pub mod server;
pub mod service;
pub mod sessions;
pub mod volume;

pub use pool::{Pool, PoolError};
pub use server::{ReplicaConfig, ReplicaError, ReplicaServer};
pub use volume::Volume;
