//! The annotations an admin sets to steer the operator, and the labels and
//! taints the operator reads or writes. Documented in docs/operations.md.

/// On a Site: drain it for planned maintenance (the value is the reason,
/// shown in its `Maintenance` condition). Removing it brings the site back.
pub const MAINTENANCE: &str = "twinvol.io/maintenance";

/// On a MirroredVolume: the audited override — promote the named site's
/// replica although it is not in sync, accepting the loss of the writes it
/// missed. Needs [`PROMOTE_REASON`]. Cleared by the operator once done.
pub const PROMOTE: &str = "twinvol.io/promote";

/// The admin's reason for [`PROMOTE`]; recorded in the Event.
pub const PROMOTE_REASON: &str = "twinvol.io/promote-reason";

/// On a MirroredVolume with `failback: Manual`: move the volume's pods back
/// to its preferred site now (once that site is healthy and in sync).
/// Cleared by the operator once the pods were evicted.
pub const MOVE_HOME: &str = "twinvol.io/move-home";

/// On a node plugin's heartbeat Lease: the usable size of the node's pool
/// in bytes, for placement. Optional.
pub const POOL_CAPACITY: &str = "twinvol.io/pool-capacity-bytes";

/// The finalizer on every MirroredVolume: the replicas' data is removed by
/// the node plugins before the object goes.
pub const FINALIZER: &str = "twinvol.io/replica-data";

/// Taint key on the nodes of a fenced site (NoSchedule).
pub const TAINT_FENCED: &str = "twinvol.io/fenced";

/// Taint key on the nodes of a site under maintenance (NoSchedule).
pub const TAINT_MAINTENANCE: &str = "twinvol.io/maintenance";

/// Kubernetes' own out-of-service taint (NoExecute), set with the value
/// [`OUT_OF_SERVICE_VALUE`] on a fenced site's nodes when the Site asks.
pub const TAINT_OUT_OF_SERVICE: &str = "node.kubernetes.io/out-of-service";

/// The value marking the out-of-service taint as the operator's (one an
/// admin set by hand is never removed).
pub const OUT_OF_SERVICE_VALUE: &str = "twinvol";

/// The CSI driver name: PersistentVolumes of this driver carry a
/// MirroredVolume's name as their volume handle.
pub const CSI_DRIVER: &str = "csi.twinvol.io";

/// Label selecting the node plugins' heartbeat Leases.
pub const HEARTBEAT_LABEL: (&str, &str) = ("app.kubernetes.io/name", "twinvol");

/// Label naming the node of a heartbeat Lease.
pub const HEARTBEAT_NODE_LABEL: &str = "twinvol.io/node";

/// The name of a node plugin's heartbeat Lease.
pub fn heartbeat_lease_name(node: &str) -> String {
    format!("twinvol-node-{node}")
}
