//! The node's data plane: the frontends of volumes staged on the node and
//! the replica servers of replicas placed on it (and the node's heartbeat
//! renewer, [`crate::heartbeat`]), each a process of its own
//! that outlives the CSI node service (design: a restart or upgrade of the
//! CSI container never takes a mounted volume's I/O down).
//!
//! [`process`] starts, recognises and stops them; [`frontend`] and
//! [`replica`] are what runs inside (`twinvol-csi --mode frontend|replica
//! --spec FILE`).

pub mod frontend;
pub mod process;
pub mod replica;

pub use frontend::{FrontendHeartbeat, FrontendSpec, ReplicaAddress};
pub use process::{Launch, ProcessFiles};
pub use replica::ReplicaServerSpec;

/// Why a data-plane process stopped.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("the process spec is unusable: {detail}")]
    Spec { detail: String },
    #[error(transparent)]
    Frontend(Box<twinvol_engine::frontend::service::FrontendError>),
    #[error(transparent)]
    Replica(Box<twinvol_engine::replica::service::ReplicaProcessError>),
}
