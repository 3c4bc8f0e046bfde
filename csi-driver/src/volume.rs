//! Reading a MirroredVolume the way the CSI services need it: its size in
//! bytes, the node it is published to, its topology, whether it is
//! degraded. Pure functions over the object, shared by controller and node.

use kube::ResourceExt;
use kube::api::Api;
use serde::{Deserialize, Serialize};
use twinvol_crds::{MirroredVolume, SiteName};

use crate::error::{CsiError, CsiResult};
use crate::names::{ANNOTATION_ALLOWED_SITES, ANNOTATION_PUBLISHED, TOPOLOGY_KEY};
use crate::proto::csi::Topology;

/// The ControllerPublish record (annotation `csi.twinvol.io/published`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub node: String,
    #[serde(default)]
    pub read_only: bool,
}

/// The volume, or `None` if it does not exist.
pub async fn get(api: &Api<MirroredVolume>, name: &str) -> CsiResult<Option<MirroredVolume>> {
    api.get_opt(name)
        .await
        .map_err(|e| CsiError::kube(format!("reading MirroredVolume {name}"), e))
}

/// The volume, or `NotFound`.
pub async fn require(api: &Api<MirroredVolume>, name: &str) -> CsiResult<MirroredVolume> {
    get(api, name)
        .await?
        .ok_or_else(|| CsiError::VolumeNotFound {
            volume: name.to_owned(),
        })
}

/// `spec.size` in bytes.
pub fn size_bytes(mv: &MirroredVolume) -> CsiResult<u64> {
    mv.spec.size.bytes().map_err(|e| CsiError::Precondition {
        volume: mv.name_any(),
        detail: format!("spec.size is unusable: {e}"),
    })
}

/// Where the volume is published, if anywhere.
pub fn published(mv: &MirroredVolume) -> Option<Published> {
    let raw = mv.annotations().get(ANNOTATION_PUBLISHED)?;
    match serde_json::from_str(raw) {
        Ok(p) => Some(p),
        Err(e) => {
            tracing::warn!(volume = %mv.name_any(), error = %e, "unreadable publish record; treating the volume as published to an unknown node");
            Some(Published {
                node: String::new(),
                read_only: false,
            })
        }
    }
}

/// The segment of one site.
pub fn site_topology(site: &str) -> Topology {
    Topology {
        segments: [(TOPOLOGY_KEY.to_owned(), site.to_owned())].into(),
    }
}

/// Accessible from both of its sites, or from those its StorageClass
/// allowed (annotation `csi.twinvol.io/allowed-sites`, set at creation).
pub fn topology(mv: &MirroredVolume) -> Vec<Topology> {
    let allowed: Option<Vec<&str>> = mv
        .annotations()
        .get(ANNOTATION_ALLOWED_SITES)
        .map(|a| a.split(',').map(str::trim).collect());
    mv.spec
        .sites
        .iter()
        .filter(|s| allowed.as_ref().is_none_or(|a| a.contains(&s.as_str())))
        .map(|s| site_topology(s.as_str()))
        .collect()
}

/// Why the volume is degraded (a site out of the in-sync set), if it is.
pub fn degraded(mv: &MirroredVolume) -> Option<String> {
    let status = mv.status.as_ref()?;
    // No frontend has used the volume yet: both replicas are identical.
    if status.in_sync.is_empty() && status.epoch.get() == 0 {
        return None;
    }
    let missing: Vec<&SiteName> = mv
        .spec
        .sites
        .iter()
        .filter(|s| !status.in_sync.contains(s))
        .collect();
    if missing.is_empty() {
        return None;
    }
    let names: Vec<&str> = missing.iter().map(|s| s.as_str()).collect();
    Some(format!(
        "degraded: the replica on {} is out of sync; writes are acknowledged by {} alone until it caught up",
        names.join(", "),
        status
            .in_sync
            .iter()
            .map(SiteName::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinvol_crds::{Epoch, MirroredVolumeSpec, MirroredVolumeStatus, VolumeSize};

    fn mv(in_sync: &[&str], epoch: u64) -> MirroredVolume {
        let mut mv = MirroredVolume::new(
            "v1",
            MirroredVolumeSpec {
                size: VolumeSize::new("1Gi").expect("valid"),
                sites: vec![
                    SiteName::new("room-a").expect("valid"),
                    SiteName::new("room-b").expect("valid"),
                ],
                failback: Default::default(),
                resync_rate_limit: None,
                preferred_site: None,
            },
        );
        mv.status = Some(MirroredVolumeStatus {
            epoch: Epoch::new(epoch),
            in_sync: in_sync
                .iter()
                .map(|s| SiteName::new(*s).expect("valid"))
                .collect(),
            ..Default::default()
        });
        mv
    }

    #[test]
    fn a_site_out_of_the_in_sync_set_is_degraded() {
        assert_eq!(degraded(&mv(&["room-a", "room-b"], 2)), None);
        assert_eq!(degraded(&mv(&[], 0)), None, "never used: both identical");
        let message = degraded(&mv(&["room-b"], 3)).expect("degraded");
        assert!(message.contains("room-a is out of sync"), "{message}");
    }

    #[test]
    fn the_publish_record_round_trips() {
        let mut v = mv(&[], 0);
        assert_eq!(published(&v), None);
        v.annotations_mut().insert(
            ANNOTATION_PUBLISHED.into(),
            r#"{"node":"node-a1","readOnly":true}"#.into(),
        );
        assert_eq!(
            published(&v),
            Some(Published {
                node: "node-a1".into(),
                read_only: true
            })
        );
        assert_eq!(size_bytes(&v).expect("size"), 1 << 30);
        assert_eq!(topology(&v).len(), 2);
    }

    #[test]
    fn a_class_restricted_volume_is_accessible_from_its_allowed_site_only() {
        let mut v = mv(&[], 0);
        v.annotations_mut()
            .insert(ANNOTATION_ALLOWED_SITES.into(), "room-b".into());
        let topology = topology(&v);
        assert_eq!(topology, vec![site_topology("room-b")]);
    }
}
