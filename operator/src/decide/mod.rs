//! The operator's decisions, as pure functions over a snapshot of the world.
//!
//! The reconcilers gather what they read (Sites, Nodes, the node plugins'
//! heartbeat Leases as observed on the operator's own clock, MirroredVolumes,
//! Pods, VolumeAttachments) into the input types here, call [`site::decide`]
//! or [`volume::decide`], and apply the result. Nothing in this module does
//! I/O or reads a clock: `now` is part of the input, so the same snapshot
//! always gives the same decision, and the properties the design promises
//! (never two frontends with valid leases, epochs never decrease, no
//! fail-over to a replica that is not in sync) are checked here with unit
//! and property tests, without a cluster.
//!
//! - [`clock`]: time as the decisions see it ([`Mono`], [`Timings`]).
//! - [`site`]: a Site's health, fencing and unfencing, the volumes whose
//!   epoch to bump, taints, planned-maintenance progress.
//! - [`volume`]: a MirroredVolume's placement, conditions, the pods and
//!   VolumeAttachments to remove after a fail-over, the audited override,
//!   fail-back and the maintenance drain.
//! - [`placement`]: one replica per site on a ready node with room.
//! - [`record`]: the operator's changes to the arbiter record, made of the
//!   engine's own rules.

pub mod clock;
mod conditions;
pub mod placement;
pub mod record;
pub mod site;
pub mod volume;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod properties;
#[cfg(test)]
pub(crate) mod testkit;

pub use clock::{Beat, Mono, Timings};
pub use conditions::CondPlan;

use std::fmt;

/// The name of a MirroredVolume (cluster-scoped, so unique in the cluster);
/// also the CSI volume handle of its PersistentVolume.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VolumeName(String);

impl VolumeName {
    pub fn new(name: impl Into<String>) -> Self {
        Self(name.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for VolumeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
