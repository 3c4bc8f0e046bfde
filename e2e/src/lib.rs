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

/// The workspace root of the source tree this runs in. Every crate sits one
/// level below it, and cargo (test and run) and the test lanes set
/// `CARGO_MANIFEST_DIR` when they start an executable: that one comes first,
/// since a target directory shared by two checkouts (a CI clone and a work
/// tree) may run an executable compiled in the other, whose compile-time
/// path names the other checkout's charts and manifests.
pub fn source_root() -> std::path::PathBuf {
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    crate_dir
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or(crate_dir)
}
pub use control_plane::{ControlPlane, ControlPlaneOptions};
pub use error::HarnessError;
pub use upstream::UpstreamBinaries;
