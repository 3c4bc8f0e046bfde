//! Reading the world into the decisions' inputs: pure functions over the
//! objects the reconcilers got from their caches and from the API server.
//!
//! How the objects relate:
//! - a Node belongs to the first Site (by name) whose `nodeSelector`
//!   matches its labels;
//! - a node plugin's heartbeat is the Lease `twinvol-node-<node>`
//!   (contract in docs/csi.md "Heartbeat"), judged by its resourceVersion;
//! - a frontend's liveness is its lease in the MirroredVolume status
//!   (holder, epoch, node: written at acquisition and when it comes back
//!   after an expiry) *and* its node's heartbeat: it is alive while either
//!   changes ([`frontend_liveness`]), for the longer of the two durations
//!   ([`frontend_lease_duration`]);
//! - a PersistentVolume of the driver `csi.twinvol.io` carries the
//!   MirroredVolume's name as its volume handle; a pod uses the volume
//!   through a claim bound to that PV; a VolumeAttachment names the PV;
//! - a leader-election Lease (the CSI sidecars') is held by the pod its
//!   `holderIdentity` names: the pod's name (the sidecars' default, their
//!   hostname), or that name and `_` and a suffix (client-go's habit).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};
use twinvol_crds::{MirroredVolume, MirroredVolumeStatus, NodeName, SiteName};

use crate::annotations;
use crate::decide::site::OurTaints;
use crate::decide::volume::{AttachmentInput, PodInput, PodRef, PromoteRequest};
use crate::decide::{Beat, VolumeName};
use twinvol_crds::Site;

/// Whether `site`'s selector matches `labels` (a selector that does not
/// parse matches nothing).
pub fn selects(site: &Site, labels: &BTreeMap<String, String>) -> bool {
    Selector::try_from(site.spec.node_selector.clone()).is_ok_and(|s| s.matches(labels))
}

/// The Site a node belongs to: the first by name whose selector matches.
pub fn site_of(labels: &BTreeMap<String, String>, sites: &[Arc<Site>]) -> Option<SiteName> {
    let mut names: Vec<SiteName> = sites
        .iter()
        .filter(|s| selects(s, labels))
        .filter_map(|s| SiteName::new(s.name_any()).ok())
        .collect();
    names.sort();
    names.into_iter().next()
}

/// node name → site, for every node some Site selects.
pub fn node_sites(nodes: &[Arc<Node>], sites: &[Arc<Site>]) -> HashMap<String, SiteName> {
    nodes
        .iter()
        .filter_map(|n| site_of(n.labels(), sites).map(|s| (n.name_any(), s)))
        .collect()
}

/// The Node's Ready condition is True.
pub fn node_ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Which of the operator's taints the node carries.
pub fn our_taints(node: &Node) -> OurTaints {
    let taints = node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or(&[]);
    OurTaints {
        fenced: taints.iter().any(|t| t.key == annotations::TAINT_FENCED),
        maintenance: taints
            .iter()
            .any(|t| t.key == annotations::TAINT_MAINTENANCE),
        out_of_service: taints.iter().any(|t| {
            t.key == annotations::TAINT_OUT_OF_SERVICE
                && t.value.as_deref() == Some(annotations::OUT_OF_SERVICE_VALUE)
        }),
    }
}

/// The status, or an empty one.
pub fn status(mv: &MirroredVolume) -> MirroredVolumeStatus {
    mv.status.clone().unwrap_or_default()
}

/// What identifies one state of the frontend's lease: any renewal, any
/// change of holder, node or epoch gives a new value.
pub fn frontend_fingerprint(status: &MirroredVolumeStatus) -> Option<String> {
    status.frontend.as_ref().map(|f| {
        format!(
            "{}|{}|{}|{}",
            f.node,
            f.lease_holder.as_deref().unwrap_or(""),
            f.renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            f.epoch
        )
    })
}

/// The frontend's lease duration, or `default` when the status lacks it.
pub fn lease_duration(status: &MirroredVolumeStatus, default: Duration) -> Duration {
    status
        .frontend
        .as_ref()
        .and_then(|f| f.lease_duration_seconds)
        .and_then(|s| u64::try_from(s).ok())
        .map_or(default, Duration::from_secs)
}

/// A frontend's liveness as the operator saw it: the last change of either
/// its lease in the status (`lease`) or its node's heartbeat (`heartbeat`,
/// `None` when the node has no heartbeat Lease): a frontend proves itself
/// alive by its node's heartbeat and writes its lease only when something
/// changes, so the later of the two counts. Whether it was proven alive is
/// the lease's (a heartbeat says nothing about one volume's frontend
/// having started).
pub fn frontend_liveness(lease: Beat, heartbeat: Option<Beat>) -> Beat {
    match heartbeat {
        Some(hb) if hb.last_change > lease.last_change => Beat {
            last_change: hb.last_change,
            proven_since: lease.proven_since,
        },
        _ => lease,
    }
}

/// How long a frontend may acknowledge after its last proof of life: the
/// longer of its lease's duration (`default` when the status lacks it) and
/// its node's heartbeat duration.
pub fn frontend_lease_duration(
    status: &MirroredVolumeStatus,
    default: Duration,
    heartbeat: Option<Duration>,
) -> Duration {
    lease_duration(status, default).max(heartbeat.unwrap_or(Duration::ZERO))
}

/// The sites in the in-sync set. An empty set on a volume no frontend has
/// used yet means both (the arbiter mapping's rule for a fresh record).
pub fn in_sync(mv: &MirroredVolume) -> BTreeSet<SiteName> {
    let status = status(mv);
    if status.in_sync.is_empty() && status.epoch.get() == 0 && status.frontend.is_none() {
        mv.spec.sites.iter().cloned().collect()
    } else {
        status.in_sync.iter().cloned().collect()
    }
}

/// The MirroredVolume a PersistentVolume stands for.
pub fn volume_of_pv(pv: &PersistentVolume) -> Option<VolumeName> {
    let csi = pv.spec.as_ref()?.csi.as_ref()?;
    (csi.driver == annotations::CSI_DRIVER).then(|| VolumeName::new(csi.volume_handle.clone()))
}

/// The MirroredVolumes a pod uses, through its claims.
pub fn volumes_of_pod(
    pod: &Pod,
    claims: &HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    pvs: &HashMap<String, Arc<PersistentVolume>>,
) -> Vec<VolumeName> {
    let namespace = pod.namespace().unwrap_or_default();
    let mut out: Vec<VolumeName> = pod
        .spec
        .as_ref()
        .and_then(|s| s.volumes.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|v| v.persistent_volume_claim.as_ref())
        .filter_map(|c| claims.get(&(namespace.clone(), c.claim_name.clone())))
        .filter_map(|pvc| pvc.spec.as_ref()?.volume_name.clone())
        .filter_map(|pv| pvs.get(&pv))
        .filter_map(|pv| volume_of_pv(pv))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Claims keyed by (namespace, name).
pub fn claims_index(
    claims: &[Arc<PersistentVolumeClaim>],
) -> HashMap<(String, String), Arc<PersistentVolumeClaim>> {
    claims
        .iter()
        .map(|c| ((c.namespace().unwrap_or_default(), c.name_any()), c.clone()))
        .collect()
}

/// PVs keyed by name.
pub fn pv_index(pvs: &[Arc<PersistentVolume>]) -> HashMap<String, Arc<PersistentVolume>> {
    pvs.iter().map(|p| (p.name_any(), p.clone())).collect()
}

/// The pods using `volume`, as decision inputs.
pub fn pods_of_volume(
    volume: &VolumeName,
    pods: &[Arc<Pod>],
    claims: &HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    pvs: &HashMap<String, Arc<PersistentVolume>>,
    node_sites: &HashMap<String, SiteName>,
) -> Vec<PodInput> {
    pods.iter()
        .filter(|p| volumes_of_pod(p, claims, pvs).contains(volume))
        .map(|p| {
            let node = p
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .and_then(|n| NodeName::new(n).ok());
            PodInput {
                pod: PodRef {
                    namespace: p.namespace().unwrap_or_default(),
                    name: p.name_any(),
                    uid: p.uid().unwrap_or_default(),
                },
                site: node
                    .as_ref()
                    .and_then(|n| node_sites.get(n.as_str()).cloned()),
                node,
                terminating: p.metadata.deletion_timestamp.is_some(),
            }
        })
        .collect()
}

/// The MirroredVolume a VolumeAttachment attaches, if it is the driver's.
pub fn volume_of_attachment(
    va: &VolumeAttachment,
    pvs: &HashMap<String, Arc<PersistentVolume>>,
) -> Option<VolumeName> {
    if va.spec.attacher != annotations::CSI_DRIVER {
        return None;
    }
    let pv = va.spec.source.persistent_volume_name.as_ref()?;
    pvs.get(pv).and_then(|pv| volume_of_pv(pv))
}

/// The VolumeAttachments of `volume`.
pub fn attachments_of_volume(
    volume: &VolumeName,
    attachments: &[Arc<VolumeAttachment>],
    pvs: &HashMap<String, Arc<PersistentVolume>>,
    node_sites: &HashMap<String, SiteName>,
) -> Vec<AttachmentInput> {
    attachments
        .iter()
        .filter(|va| volume_of_attachment(va, pvs).as_ref() == Some(volume))
        .filter_map(|va| {
            let node = NodeName::new(va.spec.node_name.clone()).ok()?;
            Some(AttachmentInput {
                name: va.name_any(),
                site: node_sites.get(node.as_str()).cloned(),
                node,
            })
        })
        .collect()
}

/// The override request in the volume's annotations.
pub fn promote_request(mv: &MirroredVolume) -> Option<PromoteRequest> {
    let a = mv.annotations();
    a.get(annotations::PROMOTE).map(|site| PromoteRequest {
        site: site.clone(),
        reason: a.get(annotations::PROMOTE_REASON).cloned(),
    })
}

/// The move-home annotation is set (to anything but "false").
pub fn move_home_requested(mv: &MirroredVolume) -> bool {
    mv.annotations()
        .get(annotations::MOVE_HOME)
        .is_some_and(|v| v != "false")
}

/// The maintenance annotation's value, if set.
pub fn maintenance(site: &Site) -> Option<String> {
    site.annotations().get(annotations::MAINTENANCE).cloned()
}

/// The leader Leases of `leases` (the operator's namespace) held by one of
/// the `pods` of that namespace whose node is one of `nodes`: the ones to
/// take over when those nodes' site is lost. The driver's own Leases
/// (heartbeats, labelled) are never among them.
pub fn leases_held_on<'a>(
    leases: &'a [Lease],
    pods: &[Arc<Pod>],
    namespace: &str,
    nodes: &[String],
) -> Vec<&'a Lease> {
    let here: Vec<String> = pods
        .iter()
        .filter(|p| p.namespace().as_deref() == Some(namespace))
        .filter(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.node_name.as_deref())
                .is_some_and(|n| nodes.iter().any(|x| x == n))
        })
        .map(|p| p.name_any())
        .collect();
    let (key, value) = annotations::HEARTBEAT_LABEL;
    leases
        .iter()
        .filter(|l| l.labels().get(key).map(String::as_str) != Some(value))
        .filter(|l| {
            let Some(holder) = l.spec.as_ref().and_then(|s| s.holder_identity.as_deref()) else {
                return false;
            };
            here.iter().any(|pod| {
                holder == pod
                    || holder
                        .strip_prefix(pod.as_str())
                        .is_some_and(|rest| rest.starts_with('_'))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_leader_leases_of_pods_on_the_lost_nodes_are_found() {
        use k8s_openapi::api::coordination::v1::LeaseSpec;
        use k8s_openapi::api::core::v1::PodSpec;
        let lease = |name: &str, holder: Option<&str>, labelled: bool| {
            let mut l = Lease {
                spec: Some(LeaseSpec {
                    holder_identity: holder.map(str::to_owned),
                    ..Default::default()
                }),
                ..Default::default()
            };
            l.metadata.name = Some(name.to_owned());
            if labelled {
                let (k, v) = annotations::HEARTBEAT_LABEL;
                l.labels_mut().insert(k.to_owned(), v.to_owned());
            }
            l
        };
        let pod = |name: &str, ns: &str, node: &str| {
            let mut p = Pod {
                spec: Some(PodSpec {
                    node_name: Some(node.to_owned()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            p.metadata.name = Some(name.to_owned());
            p.metadata.namespace = Some(ns.to_owned());
            Arc::new(p)
        };
        let leases = vec![
            lease(
                "external-attacher-leader-csi-twinvol-io",
                Some("ctl-a"),
                false,
            ),
            lease("csi-twinvol-io", Some("ctl-a_5f3e"), false),
            lease("external-resizer-csi-twinvol-io", Some("ctl-b"), false),
            lease("twinvol-node-node-a1", Some("node-a1"), true),
            lease("unheld", None, false),
            lease("other", Some("ctl-ab"), false),
        ];
        let pods = vec![
            pod("ctl-a", "twinvol", "node-a1"),
            pod("ctl-b", "twinvol", "node-b1"),
            pod("node-a1", "twinvol", "node-a1"),
            pod("ctl-ab", "elsewhere", "node-a1"),
        ];
        let found: Vec<String> = leases_held_on(&leases, &pods, "twinvol", &["node-a1".to_owned()])
            .iter()
            .map(|l| l.name_any())
            .collect();
        assert_eq!(
            found,
            ["external-attacher-leader-csi-twinvol-io", "csi-twinvol-io"],
            "the site's pods' Leases; not the other site's, not a heartbeat, not another namespace's pod's"
        );
    }

    #[test]
    fn a_frontend_lives_while_its_lease_or_its_nodes_heartbeat_changes() {
        use crate::decide::Mono;
        let at = |ms| Beat {
            last_change: Mono::from_millis(ms),
            proven_since: None,
        };
        // The lease written once at acquisition; the heartbeat later.
        assert_eq!(
            frontend_liveness(at(1_000), Some(at(9_000))).last_change,
            Mono::from_millis(9_000)
        );
        // A lease renewed after the heartbeat went quiet (a frontend back
        // from an expiry) counts too.
        assert_eq!(
            frontend_liveness(at(9_000), Some(at(1_000))).last_change,
            Mono::from_millis(9_000)
        );
        assert_eq!(frontend_liveness(at(5), None), at(5));
        let status = MirroredVolumeStatus::default();
        assert_eq!(
            frontend_lease_duration(
                &status,
                Duration::from_secs(5),
                Some(Duration::from_secs(7))
            ),
            Duration::from_secs(7),
            "the longer of the two"
        );
        assert_eq!(
            frontend_lease_duration(&status, Duration::from_secs(5), None),
            Duration::from_secs(5)
        );
    }
    use k8s_openapi::api::core::v1::{
        CSIPersistentVolumeSource, NodeCondition, NodeSpec, NodeStatus, PersistentVolumeClaimSpec,
        PersistentVolumeClaimVolumeSource, PersistentVolumeSpec, PodSpec, Taint, Volume,
    };
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
    use twinvol_crds::{PoolPath, SiteSpec};

    use super::*;

    fn site(name: &str, zone: &str) -> Arc<Site> {
        Arc::new(Site::new(
            name,
            SiteSpec {
                node_selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([("zone".into(), zone.into())])),
                    match_expressions: None,
                },
                pool: PoolPath::new("/pool").expect("absolute"),
                out_of_service_taint: false,
            },
        ))
    }

    fn labels(zone: &str) -> BTreeMap<String, String> {
        BTreeMap::from([("zone".into(), zone.into())])
    }

    #[test]
    fn a_node_belongs_to_the_first_site_by_name_that_selects_it() {
        let sites = vec![
            site("room-b", "z1"),
            site("room-a", "z1"),
            site("room-c", "z2"),
        ];
        assert_eq!(site_of(&labels("z1"), &sites), SiteName::new("room-a").ok());
        assert_eq!(site_of(&labels("z2"), &sites), SiteName::new("room-c").ok());
        assert_eq!(site_of(&labels("z3"), &sites), None);
    }

    #[test]
    fn readiness_and_our_taints_are_read_from_the_node() {
        let node = Node {
            metadata: ObjectMeta::default(),
            spec: Some(NodeSpec {
                taints: Some(vec![
                    Taint {
                        key: annotations::TAINT_FENCED.into(),
                        effect: "NoSchedule".into(),
                        ..Taint::default()
                    },
                    Taint {
                        key: annotations::TAINT_OUT_OF_SERVICE.into(),
                        value: Some("someone-else".into()),
                        effect: "NoExecute".into(),
                        ..Taint::default()
                    },
                ]),
                ..NodeSpec::default()
            }),
            status: Some(NodeStatus {
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: "True".into(),
                    ..NodeCondition::default()
                }]),
                ..NodeStatus::default()
            }),
        };
        assert!(node_ready(&node));
        let t = our_taints(&node);
        assert!(t.fenced && !t.maintenance);
        assert!(
            !t.out_of_service,
            "an admin's out-of-service taint is not ours"
        );
    }

    #[test]
    fn a_pod_uses_a_volume_through_its_claim_and_the_pv_handle() {
        let pv = Arc::new(PersistentVolume {
            metadata: ObjectMeta {
                name: Some("pv-1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeSpec {
                csi: Some(CSIPersistentVolumeSource {
                    driver: annotations::CSI_DRIVER.into(),
                    volume_handle: "vol-1".into(),
                    ..CSIPersistentVolumeSource::default()
                }),
                ..PersistentVolumeSpec::default()
            }),
            status: None,
        });
        let pvc = Arc::new(PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some("data".into()),
                namespace: Some("apps".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PersistentVolumeClaimSpec {
                volume_name: Some("pv-1".into()),
                ..PersistentVolumeClaimSpec::default()
            }),
            status: None,
        });
        let pod = Pod {
            metadata: ObjectMeta {
                name: Some("app-0".into()),
                namespace: Some("apps".into()),
                uid: Some("u1".into()),
                ..ObjectMeta::default()
            },
            spec: Some(PodSpec {
                node_name: Some("a1".into()),
                volumes: Some(vec![Volume {
                    name: "data".into(),
                    persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                        claim_name: "data".into(),
                        read_only: None,
                    }),
                    ..Volume::default()
                }]),
                ..PodSpec::default()
            }),
            status: None,
        };
        let claims = claims_index(&[pvc]);
        let pvs = pv_index(&[pv]);
        let sites = HashMap::from([("a1".to_owned(), SiteName::new("room-a").expect("valid"))]);
        let found = pods_of_volume(
            &VolumeName::new("vol-1"),
            &[Arc::new(pod.clone())],
            &claims,
            &pvs,
            &sites,
        );
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].pod.uid, "u1");
        assert_eq!(found[0].site, SiteName::new("room-a").ok());
        assert!(
            pods_of_volume(
                &VolumeName::new("vol-2"),
                &[Arc::new(pod)],
                &claims,
                &pvs,
                &sites
            )
            .is_empty()
        );
    }
}
