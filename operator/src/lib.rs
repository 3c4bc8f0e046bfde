//! The operator: reconcilers for Site and MirroredVolume, and the pure
//! decisions they apply (placement, fail-over, fencing, fail-back, planned
//! maintenance).
//!
//! - [`decide`]: pure functions over a snapshot; everything the design
//!   promises about fail-over is tested there.
//! - [`observe`]: what changed when, on the operator's own clock.
//! - [`gather`]: the world read into the decisions' inputs.
//! - [`site_controller`], [`volume_controller`]: the reconcilers.
//! - [`ops`]: the writes (compare-and-swaps of the arbiter record through
//!   `twinvol_csi_driver::arbiter::mapping`, patches, deletes, evictions).
//! - [`standby`]: what a replica that does not lead observes, so that it
//!   acts at once when it takes over.
//! - [`run`]: leader election, watch caches, controllers; [`http`] and
//!   [`metrics`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`annotations`]: the knobs an admin turns.
//! - [`testsupport`]: a stand-in for the node plugin's heartbeat, for the
//!   integration tests.

pub mod annotations;
pub mod client;
pub mod context;
pub mod decide;
pub mod error;
pub mod gather;
pub mod http;
pub mod metrics;
pub mod observe;
pub mod ops;
pub mod run;
pub mod site_controller;
pub mod standby;
pub mod status;
pub mod testsupport;
pub mod volume_controller;

pub use error::Error;
