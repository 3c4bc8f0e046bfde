//! The generated gRPC code of the two third-party APIs the driver serves,
//! compiled by `build.rs` from their Go modules (versions pinned in
//! `e2e/tools/versions.env`; provenance and licences in docs/csi.md).

/// CSI spec v1 (`csi.v1`): Identity, Controller and Node services.
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}

/// Kubelet's plugin-registration API v1 (proto package `pluginregistration`).
#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
pub mod registration {
    tonic::include_proto!("pluginregistration");
}

/// The CSI spec version compiled in (`CSI_SPEC_VERSION`).
pub const CSI_SPEC_VERSION: &str = env!("TWINVOL_CSI_SPEC_VERSION");
/// The k8s.io/kubelet module version the registration API comes from.
pub const KUBELET_API_VERSION: &str = env!("TWINVOL_KUBELET_API_VERSION");
