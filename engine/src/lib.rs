//! twinvol's data path, without Kubernetes: the replication protocol, the
//! replica server, and the frontend that mirrors writes to two replicas and
//! exports the volume over NBD and as a FUSE file.

pub mod frontend;
pub mod protocol;
pub mod replica;
pub mod storage;
