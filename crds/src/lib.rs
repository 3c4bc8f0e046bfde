//! twinvol's Kubernetes API: the `twinvol.io/v1alpha1` custom resources
//! [`Site`] and [`MirroredVolume`], the newtypes their fields are made of, and
//! the generator of the CRD manifests shipped in the Helm chart.
//!
//! This crate does no I/O against a cluster: the operator, the CSI driver and
//! the e2e tests share these types, so what the API server validates (CEL rules
//! in the schema) and what Rust code constructs (checked constructors) are
//! written down once, here.

pub mod condition;
pub mod generate;
pub mod names;
pub mod numbers;
pub mod quantity;
pub mod site;
pub mod volume;

pub use condition::{ConditionStatus, SiteConditionType, VolumeConditionType, set_condition};
pub use names::{NameError, NodeName, PoolPath, SiteName};
pub use numbers::{ByteCount, Epoch};
pub use quantity::{QuantityError, RateLimit, VolumeSize};
pub use site::{Site, SiteSpec, SiteStatus};
pub use volume::{
    Failback, FrontendStatus, MirroredVolume, MirroredVolumeSpec, MirroredVolumeStatus,
    ReplicaState, ReplicaStatus,
};

/// The API group of every twinvol resource.
pub const API_GROUP: &str = "twinvol.io";
/// The one served and stored version.
pub const API_VERSION: &str = "v1alpha1";
