//! Watching a workload on the cluster bed from outside: the [`sampler`]
//! (every 200 ms: the workload's pods, the Sites, the MirroredVolume, the
//! VolumeAttachments), [`narrate`] (what changed, in words) and [`follow`]
//! (printing the changes as they happen until goals hold). The scenario
//! tests time fail-overs with the sampler; the demo prints with `follow`.

pub mod follow;
pub mod narrate;
pub mod sampler;

pub use follow::{FollowOptions, Goal, follow};
pub use sampler::{Observer, PodSample, ReplicaSample, Sample, between};
