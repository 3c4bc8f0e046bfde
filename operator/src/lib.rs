//! The operator: reconcilers for Site and MirroredVolume, and the pure
//! decisions they apply (placement, fail-over, fencing, fail-back, planned
//! maintenance).
//!
//! - [`decide`]: pure functions over a snapshot; everything the design
//!   promises about fail-over is tested there.
//! - [`annotations`]: the knobs an admin turns.

pub mod annotations;
pub mod decide;
pub mod observe;
