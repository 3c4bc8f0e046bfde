//! twinvol's end-to-end harness: starts whole systems on this machine — a
//! real Kubernetes control plane (etcd, kube-apiserver and, when a test asks,
//! kube-controller-manager and kube-scheduler) on loopback, or a whole
//! stretched cluster of two sites of real kubelets with the control plane as
//! a third location ([`cluster`]) — and tears them down again, even when the
//! test panics.
//!
//! The components are the pinned upstream builds made by
//! `e2e/tools/build-upstream.sh`; nothing here mocks the Kubernetes API.

pub mod bed;
pub mod cluster;
pub mod control_plane;
pub mod crds;
pub mod error;
pub mod observe;
pub mod pki;
pub mod ports;
pub mod process;
pub mod upstream;
pub mod wait;
pub mod workload;

pub use cluster::{Cluster, ClusterOptions};
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use error::HarnessError;
pub use upstream::UpstreamBinaries;
