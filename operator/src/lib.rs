//! The operator: reconcilers for Site and MirroredVolume, and the pure
//! decision functions (placement, fail-over, fencing, fail-back).
//!
//! Not built yet: it follows the CSI driver. This crate exists so that the
//! workspace has the shape of the design from the start; it exports nothing.
