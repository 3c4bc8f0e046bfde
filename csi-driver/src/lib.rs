//! The CSI driver `csi.twinvol.io`: PVCs become MirroredVolumes, staged on
//! the pod's node through a frontend that mirrors every write to the two
//! Sites' replicas.
//!
//! - [`identity`], [`controller`], [`node`]: the three CSI services.
//! - [`dataplane`]: the frontends and replica servers, processes of their
//!   own that outlive the node service; [`sys`]: the node's tools (mount,
//!   loop devices, filesystems).
//! - [`arbiter`]: the Kubernetes arbiter ([`arbiter::KubeArbiter`]: a
//!   MirroredVolume's status as the compare-and-swap record of its in-sync
//!   set, epoch and frontend lease), handed to the engine's frontend.
//! - [`heartbeat`] (the node's Lease), [`registration`] (kubelet's plugin
//!   registration), [`health`] (`/healthz`), [`server`] (gRPC on unix
//!   sockets).
//! - [`error`]: the one conversion of every error to a gRPC code.
//! - [`proto`]: code generated from csi.proto and the registration API.

pub mod arbiter;
pub mod authority;
pub mod capability;
pub mod controller;
pub mod dataplane;
pub mod error;
pub mod health;
pub mod heartbeat;
pub mod identity;
pub mod locks;
pub mod names;
pub mod node;
pub mod params;
pub mod plugin;
pub mod proto;
pub mod registration;
pub mod server;
pub mod sys;
pub mod volume;
