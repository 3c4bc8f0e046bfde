//! Stand-ins used by the operator's integration tests for what other
//! components do in a real cluster, as real processes against a real API
//! server: the node plugin's heartbeat Lease (contract in COMMON.md), a
//! kubelet's node Lease, and a frontend holding and renewing its volume's
//! lease through the real arbiter code (`KubeArbiter` and the engine's
//! `frontend::lease`). The `twinvol-test-heartbeat` binary runs them; kill
//! it with SIGKILL and the site it stands for goes dark.
//!
//! Replaceable by the CSI node plugin once it writes its heartbeats.

pub mod heartbeat;
