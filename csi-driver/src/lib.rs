//! The CSI driver: identity, controller and node services, and the node
//! plugin's data path (replica server and frontend from `twinvol-engine`).
//!
//! Built so far: only [`arbiter`], the Kubernetes arbiter
//! ([`arbiter::KubeArbiter`]: a MirroredVolume's status as the
//! compare-and-swap record of its in-sync set, epoch and frontend lease),
//! which the node plugin will hand to the engine's frontend
//! (`twinvol_engine::frontend::service::run_with`).
//!
//! Not built yet: the CSI services (identity, controller, node), the node
//! plugin binary and its replica server and frontend wiring; there is no
//! gRPC server in this crate.

pub mod arbiter;
