//! The driver's fixed names (driver, topology key, annotations, finalizers,
//! labels) and the mapping from a CSI volume name to a MirroredVolume.
//!
//! A CSI `CreateVolume` name is any string (external-provisioner sends
//! `pvc-<uid>`, csi-sanity mixed-case strings). The MirroredVolume — and
//! the engine's volume id, which names files and metric labels — must be a
//! DNS-1123 name of at most 63 bytes, so a name that already is one is used
//! as it is and any other becomes `tv-` and 40 hex digits of its SHA-256.
//! The original name is kept in an annotation; idempotency compares it.

use sha2::{Digest, Sha256};
use twinvol_crds::SiteName;
use twinvol_engine::protocol::VolumeId;

/// The CSI driver name (and StorageClass provisioner).
pub const DRIVER_NAME: &str = "csi.twinvol.io";
/// The topology segment key; its value is a Site name.
pub const TOPOLOGY_KEY: &str = "topology.twinvol.io/site";
/// The CSI name a MirroredVolume was created for.
pub const ANNOTATION_CSI_NAME: &str = "csi.twinvol.io/name";
/// The node a volume is published to (ControllerPublish), with its mode.
pub const ANNOTATION_PUBLISHED: &str = "csi.twinvol.io/published";
/// The filesystem the StorageClass asked for (`fsType` parameter).
pub const ANNOTATION_FS_TYPE: &str = "csi.twinvol.io/fs-type";
/// The only Sites a volume may be used from, comma-separated, when its
/// StorageClass's `allowedTopologies` admit one of its two Sites only (its
/// PV's node affinity; no fail-over to the other Site). Absent: both.
pub const ANNOTATION_ALLOWED_SITES: &str = "csi.twinvol.io/allowed-sites";
/// Label on everything the driver creates.
pub const LABEL_APP: (&str, &str) = ("app.kubernetes.io/name", "twinvol");
/// Label of a node heartbeat Lease: the node.
pub const LABEL_NODE: &str = "twinvol.io/node";
/// Label of a node heartbeat Lease: the node's Site.
pub const LABEL_SITE: &str = "twinvol.io/site";
/// Annotations of a node heartbeat Lease: the node's pool space.
pub const ANNOTATION_POOL_FREE: &str = "twinvol.io/pool-free-bytes";
pub const ANNOTATION_POOL_TOTAL: &str = "twinvol.io/pool-total-bytes";
/// The pool's usable size, as the operator's placement reads it.
pub const ANNOTATION_POOL_CAPACITY: &str = "twinvol.io/pool-capacity-bytes";
/// The longest volume name used unchanged.
const MAX_PLAIN: usize = 63;

/// The finalizer that keeps a MirroredVolume until the replica of `site`
/// has had its data removed.
pub fn replica_finalizer(site: &SiteName) -> String {
    format!("twinvol.io/replica-{site}")
}

/// Whether `finalizer` is one of the replica-data finalizers.
pub fn is_replica_finalizer(finalizer: &str) -> bool {
    finalizer.starts_with("twinvol.io/replica-")
}

/// The heartbeat Lease name of `node` (the contract with the operator).
pub fn node_lease_name(node: &str) -> String {
    format!("twinvol-node-{node}")
}

/// The MirroredVolume name (= CSI volume id = engine volume id) for a CSI
/// volume name.
pub fn volume_name_for(csi_name: &str) -> String {
    if is_plain(csi_name) {
        return csi_name.to_owned();
    }
    let digest = Sha256::digest(csi_name.as_bytes());
    let hex: String = digest.iter().take(20).map(|b| format!("{b:02x}")).collect();
    format!("tv-{hex}")
}

fn is_plain(name: &str) -> bool {
    name.len() <= MAX_PLAIN
        && twinvol_crds::NodeName::new(name).is_ok()
        && VolumeId::new(name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pvc_name_is_used_as_it_is() {
        let name = "pvc-8f14e45f-ceea-467f-a0e6-4c3c5c7d2a1b";
        assert_eq!(volume_name_for(name), name);
    }

    #[test]
    fn other_names_hash_to_a_valid_stable_name() {
        for name in [
            "sanity-Node Service-ABC",
            "UPPER",
            &"a".repeat(64),
            "a_b",
            "",
        ] {
            let mapped = volume_name_for(name);
            assert!(mapped.starts_with("tv-"), "{mapped}");
            assert_eq!(mapped.len(), 43);
            assert!(VolumeId::new(mapped.as_str()).is_ok());
            assert!(twinvol_crds::NodeName::new(mapped.as_str()).is_ok());
            assert_eq!(volume_name_for(name), mapped, "stable");
        }
        assert_ne!(volume_name_for("A"), volume_name_for("B"));
    }

    #[test]
    fn finalizer_names_are_recognised() {
        let site = SiteName::new("room-a").expect("valid");
        assert_eq!(replica_finalizer(&site), "twinvol.io/replica-room-a");
        assert!(is_replica_finalizer(&replica_finalizer(&site)));
        assert!(!is_replica_finalizer("kubernetes.io/pv-protection"));
    }
}
