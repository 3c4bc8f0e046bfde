//! CreateVolume and DeleteVolume: a PVC's volume is a MirroredVolume.
//!
//! **Create** checks the request (name, capabilities, parameters, capacity
//! range), chooses the two Sites (the `sites` parameter, or with
//! WaitForFirstConsumer the pod's Site from the preferred topology plus a
//! second one), checks that both exist and have room, and creates the
//! MirroredVolume with a finalizer per Site: `twinvol.io/replica-<site>`
//! stays until that Site's node plugin removed the replica's data. Asked
//! again with the same name it returns the same volume (idempotent), or
//! `AlreadyExists` when the existing one does not fit the request.
//!
//! **Topology.** A volume is accessible from both of its Sites (its PV's
//! node affinity admits the nodes of either: that is what fail-over needs),
//! unless its StorageClass's `allowedTopologies` admit only one of them on
//! the Site key: then from that one only, recorded on the MirroredVolume
//! (`csi.twinvol.io/allowed-sites`), and its pods cannot move to the other
//! Site. The class is read through the PVC the provisioner names
//! (`--extra-create-metadata`): the requisite topology cannot tell a class's
//! restriction from the first pod's placement (`--strict-topology` narrows
//! it to the pod's node). A caller naming no PVC (csi-sanity, a CO other
//! than Kubernetes) is held to its requisite topology.
//!
//! **Delete** refuses a volume still published to a node, removes the
//! finalizers of Sites where no replica was ever placed (nobody else
//! would), and deletes the object; the node plugins hosting its replicas
//! stop their servers, remove the data and drop their finalizer. It waits
//! up to 15 s for the object to go (a Create of the same name meanwhile is
//! Aborted, to be retried), then returns either way. An unknown volume is
//! already deleted: OK.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, TopologySelectorTerm};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Resource, ResourceExt};
use twinvol_crds::{MirroredVolume, MirroredVolumeSpec, SiteName, VolumeSize};

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::names::{
    self, ANNOTATION_ALLOWED_SITES, ANNOTATION_CSI_NAME, ANNOTATION_FS_TYPE, LABEL_APP,
    TOPOLOGY_KEY, replica_finalizer,
};
use crate::params::{self, KEY_SITES, VolumeParams};
use crate::proto::csi::{
    CreateVolumeRequest, CreateVolumeResponse, DeleteVolumeRequest, TopologyRequirement, Volume,
};
use crate::volume;

use super::ControllerService;

/// How long DeleteVolume waits for the node plugins to remove the data.
const DELETE_WAIT: std::time::Duration = std::time::Duration::from_secs(15);

/// The PVC the provisioner creates the volume for (`--extra-create-metadata`).
const PARAM_PVC_NAME: &str = "csi.storage.k8s.io/pvc/name";
const PARAM_PVC_NAMESPACE: &str = "csi.storage.k8s.io/pvc/namespace";
/// The class of a PVC from before `storageClassName`.
const ANNOTATION_PVC_CLASS: &str = "volume.beta.kubernetes.io/storage-class";

/// The Sites named by a topology requirement, preferred first, each once.
fn topology_sites(requirement: Option<&TopologyRequirement>) -> Vec<String> {
    let Some(req) = requirement else {
        return vec![];
    };
    sites_of(req.preferred.iter().chain(&req.requisite))
}

/// The Sites named by topologies, in order, each once.
fn sites_of<'a>(
    topologies: impl IntoIterator<Item = &'a crate::proto::csi::Topology>,
) -> Vec<String> {
    let mut out: Vec<String> = vec![];
    for topology in topologies {
        if let Some(site) = topology.segments.get(TOPOLOGY_KEY)
            && !out.contains(site)
        {
            out.push(site.clone());
        }
    }
    out
}

/// The Sites a StorageClass's `allowedTopologies` admit on the Site key,
/// or `None` when they do not restrict it (none given, or a term that does
/// not name the key: it admits every Site).
pub fn class_sites(allowed: &[TopologySelectorTerm]) -> Option<Vec<String>> {
    if allowed.is_empty() {
        return None;
    }
    let mut out: Vec<String> = vec![];
    for term in allowed {
        let expressions = term.match_label_expressions.as_deref().unwrap_or_default();
        let site = expressions.iter().find(|e| e.key == TOPOLOGY_KEY)?;
        for value in &site.values {
            if !out.contains(value) {
                out.push(value.clone());
            }
        }
    }
    Some(out)
}

/// The annotation recording which of the volume's `sites` it may be used
/// from, when `allowed` admits only some of them; `NoCapacity` when it
/// admits none.
pub fn allowed_annotation(
    sites: &[SiteName; 2],
    allowed: Option<&[String]>,
) -> CsiResult<Option<String>> {
    let Some(allowed) = allowed else {
        return Ok(None);
    };
    let usable: Vec<&str> = sites
        .iter()
        .map(SiteName::as_str)
        .filter(|s| allowed.iter().any(|a| a == s))
        .collect();
    match usable.len() {
        0 => Err(CsiError::NoCapacity {
            detail: format!(
                "the volume's Sites are {} and {}, but its StorageClass allows only {}",
                sites[0],
                sites[1],
                allowed.join(", ")
            ),
        }),
        1 => Ok(Some(usable[0].to_owned())),
        _ => Ok(None),
    }
}

/// The two Sites of a new volume: the parameter's, or the topology's
/// (preferred first: the pod's Site with WaitForFirstConsumer) completed
/// from `known` (every Site, sorted).
pub fn choose_sites(
    params: &VolumeParams,
    requirement: Option<&TopologyRequirement>,
    known: &[String],
) -> CsiResult<[SiteName; 2]> {
    let wanted = topology_sites(requirement);
    if let Some(sites) = &params.sites {
        // The volume is reachable from both Sites; it must be from at
        // least one the requirement allows.
        if requirement.is_some_and(|r| !r.requisite.is_empty() || !r.preferred.is_empty())
            && !wanted.is_empty()
            && !sites.iter().any(|s| wanted.iter().any(|w| w == s.as_str()))
        {
            return Err(CsiError::NoCapacity {
                detail: format!(
                    "the StorageClass puts volumes on {} and {}, but the pod may only run on {}",
                    sites[0],
                    sites[1],
                    wanted.join(", ")
                ),
            });
        }
        return Ok(sites.clone());
    }
    let mut chosen: Vec<String> = vec![];
    for site in wanted.iter().chain(known) {
        if !chosen.contains(site) {
            chosen.push(site.clone());
        }
        if chosen.len() == 2 {
            break;
        }
    }
    let [a, b] = chosen.as_slice() else {
        return Err(CsiError::BadParameter {
            key: KEY_SITES.to_owned(),
            reason: format!(
                "not given, and only {} Site(s) known from the topology and the cluster ({}): give two Sites, as sites: room-a,room-b",
                chosen.len(),
                chosen.join(", ")
            ),
        });
    };
    let site = |s: &str| {
        SiteName::new(s).map_err(|e| CsiError::BadParameter {
            key: KEY_SITES.to_owned(),
            reason: format!("the topology names a Site that is not a valid name: {e}"),
        })
    };
    Ok([site(a)?, site(b)?])
}

/// Whether an existing volume is the one this request asks for.
fn check_existing(
    existing: &MirroredVolume,
    csi_name: &str,
    sites: &[SiteName; 2],
    request: &CreateVolumeRequest,
) -> CsiResult<()> {
    let name = existing.name_any();
    let conflict = |detail: String| CsiError::VolumeConflict {
        volume: name.clone(),
        detail,
    };
    match existing.annotations().get(ANNOTATION_CSI_NAME) {
        Some(n) if n == csi_name => {}
        Some(n) => return Err(conflict(format!("it was created for the CSI name {n:?}"))),
        None => return Err(conflict("it was not created by this driver".into())),
    }
    if existing.meta().deletion_timestamp.is_some() {
        // Transient: the node plugins are removing its replicas' data.
        return Err(CsiError::OperationInProgress {
            volume: format!("{name} (its deletion is still running)"),
        });
    }
    let size = volume::size_bytes(existing)?;
    let (required, limit) = request
        .capacity_range
        .as_ref()
        .map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
    if !params::size_fits(size, required, limit) {
        return Err(conflict(format!(
            "its size is {size} bytes, outside the requested range (required {required}, limit {limit})"
        )));
    }
    if existing.spec.sites.as_slice() != sites.as_slice() {
        return Err(conflict(format!(
            "its Sites are {:?}, not {}, {}",
            existing.spec.sites, sites[0], sites[1]
        )));
    }
    Ok(())
}

fn response(mv: &MirroredVolume, fs_type: Option<&str>) -> CsiResult<CreateVolumeResponse> {
    let size = volume::size_bytes(mv)?;
    let mut context: std::collections::HashMap<String, String> = [(
        KEY_SITES.to_owned(),
        mv.spec
            .sites
            .iter()
            .map(SiteName::as_str)
            .collect::<Vec<_>>()
            .join(","),
    )]
    .into();
    if let Some(fs) =
        fs_type.or_else(|| mv.annotations().get(ANNOTATION_FS_TYPE).map(String::as_str))
    {
        context.insert(params::KEY_FS_TYPE.to_owned(), fs.to_owned());
    }
    Ok(CreateVolumeResponse {
        volume: Some(Volume {
            capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
            volume_id: mv.name_any(),
            volume_context: context,
            content_source: None,
            accessible_topology: volume::topology(mv),
        }),
    })
}

impl ControllerService {
    pub(super) async fn create_volume_impl(
        &self,
        request: CreateVolumeRequest,
    ) -> CsiResult<CreateVolumeResponse> {
        if request.name.is_empty() {
            return Err(CsiError::MissingField { field: "name" });
        }
        let caps = capability::check_all(&request.volume_capabilities)?;
        if request.volume_content_source.is_some() {
            return Err(CsiError::invalid(
                "volume_content_source",
                "set",
                "snapshots and clones are not supported",
            ));
        }
        let params = params::parse(&request.parameters)?;
        let (required, limit) = request
            .capacity_range
            .as_ref()
            .map_or((0, 0), |r| (r.required_bytes, r.limit_bytes));
        let size = params::size_for(required, limit)?;
        let fs_type = params.fs_type.or_else(|| {
            caps.iter().find_map(|c| match &c.access {
                capability::Access::Mount { fs_type, .. } => *fs_type,
                capability::Access::Block => None,
            })
        });
        let name = names::volume_name_for(&request.name);
        let _guard = self.locks.try_lock(&name)?;

        let known = self.site_names().await?;
        let sites = choose_sites(&params, request.accessibility_requirements.as_ref(), &known)?;
        let allowed = self.allowed_sites(&request).await?;
        let restricted = allowed_annotation(&sites, allowed.as_deref())?;
        if let Some(existing) = volume::get(&self.volumes, &name).await? {
            check_existing(&existing, &request.name, &sites, &request)?;
            return response(&existing, fs_type.map(|f| f.as_str()));
        }
        for site in &sites {
            if !known.iter().any(|k| k == site.as_str()) {
                return Err(CsiError::BadParameter {
                    key: KEY_SITES.to_owned(),
                    reason: format!("Site {site} does not exist (kubectl get tvsite lists them)"),
                });
            }
            self.check_room(site, size)?;
        }
        let mut mv = self.new_volume(&name, &request.name, size, sites, params, fs_type)?;
        if let Some(only) = restricted {
            tracing::info!(volume = %name, site = %only, "its StorageClass allows one of its Sites only: no fail-over to the other");
            mv.annotations_mut()
                .insert(ANNOTATION_ALLOWED_SITES.to_owned(), only);
        }
        let created = match self.volumes.create(&PostParams::default(), &mv).await {
            Ok(created) => created,
            // A concurrent create of the same name by another controller
            // replica (or a retry racing its first attempt).
            Err(kube::Error::Api(s)) if s.code == 409 => {
                let existing = volume::require(&self.volumes, &name).await?;
                check_existing(&existing, &request.name, &mv_sites(&existing)?, &request)?;
                existing
            }
            Err(e) => return Err(CsiError::kube(format!("creating MirroredVolume {name}"), e)),
        };
        tracing::info!(volume = %name, csi_name = %request.name, size, "created");
        response(&created, fs_type.map(|f| f.as_str()))
    }

    /// The Sites the volume may be used from, when restricted: its
    /// StorageClass's `allowedTopologies` (through the PVC the provisioner
    /// names), or for a caller naming no PVC its requisite topology.
    async fn allowed_sites(&self, request: &CreateVolumeRequest) -> CsiResult<Option<Vec<String>>> {
        let (Some(pvc), Some(namespace)) = (
            request.parameters.get(PARAM_PVC_NAME),
            request.parameters.get(PARAM_PVC_NAMESPACE),
        ) else {
            let requisite = request
                .accessibility_requirements
                .as_ref()
                .map(|r| sites_of(&r.requisite))
                .unwrap_or_default();
            return Ok((!requisite.is_empty()).then_some(requisite));
        };
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), namespace);
        let claim = claims
            .get(pvc)
            .await
            .map_err(|e| CsiError::kube(format!("reading PVC {namespace}/{pvc}"), e))?;
        let class = claim
            .spec
            .as_ref()
            .and_then(|s| s.storage_class_name.clone())
            .or_else(|| claim.annotations().get(ANNOTATION_PVC_CLASS).cloned())
            .filter(|c| !c.is_empty());
        let Some(class) = class else {
            return Ok(None);
        };
        let classes: Api<StorageClass> = Api::all(self.client.clone());
        let class = classes
            .get(&class)
            .await
            .map_err(|e| CsiError::kube(format!("reading StorageClass {class}"), e))?;
        Ok(class_sites(
            class.allowed_topologies.as_deref().unwrap_or_default(),
        ))
    }

    fn new_volume(
        &self,
        name: &str,
        csi_name: &str,
        size: u64,
        sites: [SiteName; 2],
        params: VolumeParams,
        fs_type: Option<params::FsType>,
    ) -> CsiResult<MirroredVolume> {
        let size = VolumeSize::from_bytes(size).map_err(|e| CsiError::Internal {
            detail: format!("size {size}: {e}"),
        })?;
        let mut mv = MirroredVolume::new(
            name,
            MirroredVolumeSpec {
                size,
                sites: sites.to_vec(),
                failback: params.failback,
                resync_rate_limit: params.resync_rate_limit,
                preferred_site: params.preferred_site,
            },
        );
        let mut annotations =
            BTreeMap::from([(ANNOTATION_CSI_NAME.to_owned(), csi_name.to_owned())]);
        if let Some(fs) = fs_type {
            annotations.insert(ANNOTATION_FS_TYPE.to_owned(), fs.as_str().to_owned());
        }
        mv.metadata.annotations = Some(annotations);
        mv.metadata.labels = Some(BTreeMap::from([(
            LABEL_APP.0.to_owned(),
            LABEL_APP.1.to_owned(),
        )]));
        mv.metadata.finalizers = Some(sites.iter().map(replica_finalizer).collect());
        Ok(mv)
    }

    /// `ResourceExhausted` when every fresh node of `site` has less free
    /// pool space than `size`. A Site no node reports for is not refused:
    /// its replica is placed (by the operator) once a node is back.
    fn check_room(&self, site: &SiteName, size: u64) -> CsiResult<()> {
        let nodes = self.reports.fresh(Some(site.as_str()));
        let best = nodes.iter().map(|n| n.free).max();
        match best {
            Some(free) if free < size => Err(CsiError::NoCapacity {
                detail: format!(
                    "Site {site}: the node with the most free pool space has {free} bytes, the volume needs {size}"
                ),
            }),
            _ => Ok(()),
        }
    }

    pub(super) async fn delete_volume_impl(&self, request: DeleteVolumeRequest) -> CsiResult<()> {
        if request.volume_id.is_empty() {
            return Err(CsiError::MissingField { field: "volume_id" });
        }
        let name = request.volume_id;
        let _guard = self.locks.try_lock(&name)?;
        let Some(mv) = volume::get(&self.volumes, &name).await? else {
            return Ok(());
        };
        if let Some(p) = volume::published(&mv) {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "it is still published to node {}; unpublish it first",
                    p.node
                ),
            });
        }
        // Sites where no replica was ever placed have no data to remove:
        // drop their finalizers here, nobody else would.
        self.swap_metadata(&name, "removing finalizers", |mv| {
            let Some(mv) = mv else { return Ok(None) };
            let placed: Vec<&SiteName> = mv
                .status
                .iter()
                .flat_map(|s| &s.replicas)
                .filter(|r| r.node.is_some())
                .map(|r| &r.site)
                .collect();
            let finalizers = mv.finalizers();
            let keep: Vec<&String> = finalizers
                .iter()
                .filter(|f| {
                    !mv.spec
                        .sites
                        .iter()
                        .any(|s| !placed.contains(&s) && **f == replica_finalizer(s))
                })
                .collect();
            Ok((keep.len() != finalizers.len()).then(|| serde_json::json!({ "finalizers": keep })))
        })
        .await?;
        match self.volumes.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(CsiError::kube(format!("deleting MirroredVolume {name}"), e)),
        }
        // The node plugins remove the replicas' data within moments of the
        // deletion; waiting (bounded) for the object to go means that a
        // volume created again under the same name right after is a new one.
        let deadline = std::time::Instant::now() + DELETE_WAIT;
        while std::time::Instant::now() < deadline {
            match volume::get(&self.volumes, &name).await {
                Ok(None) => {
                    tracing::info!(volume = %name, "deleted; the node plugins removed the replicas' data");
                    return Ok(());
                }
                Ok(Some(_)) | Err(_) => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
            }
        }
        tracing::info!(volume = %name, "deleted; the node plugins are still removing the replicas' data (a node may be down)");
        Ok(())
    }
}

fn mv_sites(mv: &MirroredVolume) -> CsiResult<[SiteName; 2]> {
    mv.spec
        .sites
        .clone()
        .try_into()
        .map_err(|v: Vec<SiteName>| CsiError::Precondition {
            volume: mv.name_any(),
            detail: format!("spec.sites has {} entries, not two", v.len()),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::site_topology;

    fn req(preferred: &[&str], requisite: &[&str]) -> TopologyRequirement {
        TopologyRequirement {
            preferred: preferred.iter().map(|s| site_topology(s)).collect(),
            requisite: requisite.iter().map(|s| site_topology(s)).collect(),
        }
    }

    fn names(sites: [SiteName; 2]) -> [String; 2] {
        sites.map(|s| s.to_string())
    }

    fn known() -> Vec<String> {
        vec!["room-a".into(), "room-b".into(), "room-c".into()]
    }

    #[test]
    fn the_pods_site_comes_first_with_wait_for_first_consumer() {
        let r = req(&["room-b"], &["room-a", "room-b"]);
        let sites = choose_sites(&VolumeParams::default(), Some(&r), &known()).expect("chosen");
        assert_eq!(names(sites), ["room-b", "room-a"]);
    }

    #[test]
    fn a_single_topology_site_is_completed_from_the_known_sites() {
        let r = req(&["room-c"], &["room-c"]);
        let sites = choose_sites(&VolumeParams::default(), Some(&r), &known()).expect("chosen");
        assert_eq!(names(sites), ["room-c", "room-a"]);
        let sites = choose_sites(&VolumeParams::default(), None, &known()).expect("chosen");
        assert_eq!(names(sites), ["room-a", "room-b"]);
    }

    #[test]
    fn the_sites_parameter_wins_but_must_meet_the_topology() {
        let params = params::parse(&[("sites".to_owned(), "room-a,room-b".to_owned())].into())
            .expect("valid");
        let sites = choose_sites(&params, Some(&req(&["room-b"], &[])), &known()).expect("ok");
        assert_eq!(names(sites), ["room-a", "room-b"]);
        assert!(matches!(
            choose_sites(&params, Some(&req(&["room-c"], &["room-c"])), &known()),
            Err(CsiError::NoCapacity { .. })
        ));
    }

    #[test]
    fn too_few_sites_is_an_error_naming_the_parameter() {
        match choose_sites(&VolumeParams::default(), None, &["room-a".into()]) {
            Err(CsiError::BadParameter { key, .. }) => assert_eq!(key, "sites"),
            other => panic!("{other:?}"),
        }
    }

    fn term(key: &str, values: &[&str]) -> TopologySelectorTerm {
        use k8s_openapi::api::core::v1::TopologySelectorLabelRequirement;
        TopologySelectorTerm {
            match_label_expressions: Some(vec![TopologySelectorLabelRequirement {
                key: key.to_owned(),
                values: values.iter().map(|v| (*v).to_owned()).collect(),
            }]),
        }
    }

    #[test]
    fn a_class_restricts_the_sites_only_through_the_site_key() {
        assert_eq!(class_sites(&[]), None, "no allowedTopologies");
        assert_eq!(
            class_sites(&[term(TOPOLOGY_KEY, &["room-a"])]),
            Some(vec!["room-a".to_owned()])
        );
        assert_eq!(
            class_sites(&[
                term(TOPOLOGY_KEY, &["room-a"]),
                term(TOPOLOGY_KEY, &["room-b", "room-a"])
            ]),
            Some(vec!["room-a".to_owned(), "room-b".to_owned()])
        );
        // A term on another key admits every Site: no restriction.
        assert_eq!(
            class_sites(&[
                term(TOPOLOGY_KEY, &["room-a"]),
                term("topology.kubernetes.io/zone", &["z1"])
            ]),
            None
        );
    }

    #[test]
    fn a_volume_is_restricted_to_the_allowed_one_of_its_sites() {
        let sites = [
            SiteName::new("room-a").expect("valid"),
            SiteName::new("room-b").expect("valid"),
        ];
        let allowed = |a: &[&str]| a.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(allowed_annotation(&sites, None).expect("ok"), None);
        assert_eq!(
            allowed_annotation(&sites, Some(&allowed(&["room-b", "room-a", "room-c"])))
                .expect("ok"),
            None,
            "both allowed"
        );
        assert_eq!(
            allowed_annotation(&sites, Some(&allowed(&["room-b"]))).expect("ok"),
            Some("room-b".to_owned())
        );
        assert!(matches!(
            allowed_annotation(&sites, Some(&allowed(&["room-c"]))),
            Err(CsiError::NoCapacity { .. })
        ));
    }
}
