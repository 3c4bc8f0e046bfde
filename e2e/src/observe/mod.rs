//! Watching a workload on the cluster bed from outside: the [`sampler`]
//! (every 200 ms: the workload's pods, the Sites, the MirroredVolume, the
//! VolumeAttachments). The scenario tests time fail-overs with it.

pub mod sampler;

pub use sampler::{Observer, PodSample, ReplicaSample, Sample, between};
