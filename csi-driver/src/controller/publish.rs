//! ControllerPublish/Unpublish (which node may run the volume's frontend)
//! and ValidateVolumeCapabilities.
//!
//! Publishing records the node in the MirroredVolume's annotation
//! `csi.twinvol.io/published` by a merge patch carrying the
//! resourceVersion read, so two publishes racing for two nodes cannot both
//! win. A volume has one frontend: publishing to a second node while the
//! first record stands is `FailedPrecondition` — unless the recorded node's
//! Site is fenced (the operator fenced it after its frontends' leases ran
//! out: nothing there can acknowledge a write) and the new node's Site is
//! unfenced and in the volume's in-sync set, in which case the new node
//! takes the record over at once. A fail-over
//! then does not wait for the old VolumeAttachment's detach to be processed
//! first: the attacher would otherwise fail the new attach and retry it
//! with a doubling back-off (seen on the bed as 2–9 s of the power cut's
//! time to the pod Ready on the other site). Unpublishing only removes
//! the record and never talks to the node, so it succeeds while that node
//! is unreachable: its frontend is fenced by the epoch the next frontend
//! takes (after its lease expired), not by anything done here.

use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use twinvol_crds::MirroredVolume;

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::names::ANNOTATION_PUBLISHED;
use crate::proto::csi::validate_volume_capabilities_response::Confirmed;
use crate::proto::csi::{
    ControllerPublishVolumeRequest, ControllerPublishVolumeResponse,
    ControllerUnpublishVolumeRequest, ValidateVolumeCapabilitiesRequest,
    ValidateVolumeCapabilitiesResponse,
};
use crate::volume::{self, Published};

use super::ControllerService;

impl ControllerService {
    pub(super) async fn publish_impl(
        &self,
        request: ControllerPublishVolumeRequest,
    ) -> CsiResult<ControllerPublishVolumeResponse> {
        if request.volume_id.is_empty() {
            return Err(CsiError::MissingField { field: "volume_id" });
        }
        if request.node_id.is_empty() {
            return Err(CsiError::MissingField { field: "node_id" });
        }
        let cap = request
            .volume_capability
            .as_ref()
            .ok_or(CsiError::MissingField {
                field: "volume_capability",
            })
            .and_then(capability::check)?;
        let name = request.volume_id.clone();
        let _guard = self.locks.try_lock(&name)?;
        let current = volume::require(&self.volumes, &name).await?;
        let nodes: kube::Api<Node> = kube::Api::all(self.client.clone());
        if nodes
            .get_opt(&request.node_id)
            .await
            .map_err(|e| CsiError::kube(format!("reading Node {}", request.node_id), e))?
            .is_none()
        {
            return Err(CsiError::NodeNotFound {
                node: request.node_id,
            });
        }
        let wanted = Published {
            node: request.node_id.clone(),
            read_only: request.readonly || cap.read_only_mode(),
        };
        // Published elsewhere, to a node of a fenced Site, and the new node's
        // Site is unfenced and in sync: taken over (a volume whose fail-over
        // the operator refused — the other copy not in sync — keeps its
        // guard).
        let fenced_holder = match volume::published(&current) {
            Some(p) if p.node != wanted.node => self
                .may_take_over(&current, &p.node, &wanted.node)
                .await
                .then_some(p.node),
            _ => None,
        };
        let record = serde_json::to_string(&wanted).map_err(|e| CsiError::Internal {
            detail: e.to_string(),
        })?;
        self.swap_metadata(&name, "recording the publish", |mv| {
            let Some(mv) = mv else {
                return Err(CsiError::VolumeNotFound {
                    volume: name.clone(),
                });
            };
            match volume::published(mv) {
                Some(p) if p == wanted => Ok(None),
                Some(p) if fenced_holder.as_ref() == Some(&p.node) => {
                    tracing::info!(volume = %name, from = %p.node, to = %wanted.node, "publish taken over from a node of a fenced Site");
                    Ok(Some(serde_json::json!({
                        "annotations": {ANNOTATION_PUBLISHED: record},
                    })))
                }
                Some(p) if p.node == wanted.node => Err(CsiError::AlreadyInUse {
                    volume: name.clone(),
                    what: format!(
                        "published to node {} {}",
                        p.node,
                        if p.read_only { "read-only" } else { "read-write" }
                    ),
                }),
                Some(p) => Err(CsiError::Precondition {
                    volume: name.clone(),
                    detail: format!(
                        "it is published to node {}; a mirrored volume is served by one node at a time (unpublish it there first)",
                        p.node
                    ),
                }),
                None => Ok(Some(serde_json::json!({
                    "annotations": {ANNOTATION_PUBLISHED: record},
                }))),
            }
        })
        .await?;
        tracing::info!(volume = %name, node = %request.node_id, "published");
        Ok(response())
    }

    /// Whether `to` may take `volume`'s publish record over from `from`:
    /// `from`'s Site is fenced, `to`'s is not and is in the volume's in-sync
    /// set. Anything unknown (a node or its Site gone, the API not
    /// answering) is a no.
    async fn may_take_over(&self, volume: &MirroredVolume, from: &str, to: &str) -> bool {
        use crate::node::site::find;
        let (from_site, to_site) = match (
            find(&self.client, from, &self.zone_label).await,
            find(&self.client, to, &self.zone_label).await,
        ) {
            (Ok(f), Ok(t)) => (f, t),
            (Err(e), _) | (_, Err(e)) => {
                tracing::debug!(from, to, error = %e, "no Site found: no take-over");
                return false;
            }
        };
        let fenced = |s: &twinvol_crds::Site| s.status.as_ref().is_some_and(|st| st.fenced);
        let to_name = to_site.name_any();
        let in_sync = volume
            .status
            .as_ref()
            .is_some_and(|st| st.in_sync.iter().any(|s| s.as_str() == to_name));
        fenced(&from_site) && !fenced(&to_site) && in_sync
    }

    pub(super) async fn unpublish_impl(
        &self,
        request: ControllerUnpublishVolumeRequest,
    ) -> CsiResult<()> {
        if request.volume_id.is_empty() {
            return Err(CsiError::MissingField { field: "volume_id" });
        }
        let name = request.volume_id;
        let _guard = self.locks.try_lock(&name)?;
        let node = request.node_id;
        self.swap_metadata(&name, "removing the publish record", |mv| {
            Ok(match mv.and_then(volume::published) {
                Some(p) if node.is_empty() || p.node == node => Some(serde_json::json!({
                    "annotations": {ANNOTATION_PUBLISHED: null},
                })),
                // Not published there (or no such volume): nothing to undo.
                _ => None,
            })
        })
        .await?;
        tracing::info!(volume = %name, node = %node, "unpublished");
        Ok(())
    }

    pub(super) async fn validate_impl(
        &self,
        request: ValidateVolumeCapabilitiesRequest,
    ) -> CsiResult<ValidateVolumeCapabilitiesResponse> {
        if request.volume_id.is_empty() {
            return Err(CsiError::MissingField { field: "volume_id" });
        }
        if request.volume_capabilities.is_empty() {
            return Err(CsiError::MissingField {
                field: "volume_capabilities",
            });
        }
        volume::require(&self.volumes, &request.volume_id).await?;
        Ok(match capability::check_all(&request.volume_capabilities) {
            Ok(_) => ValidateVolumeCapabilitiesResponse {
                confirmed: Some(Confirmed {
                    volume_context: request.volume_context,
                    volume_capabilities: request.volume_capabilities,
                    parameters: request.parameters,
                    mutable_parameters: Default::default(),
                }),
                message: String::new(),
            },
            Err(e) => ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: e.to_string(),
            },
        })
    }
}

fn response() -> ControllerPublishVolumeResponse {
    ControllerPublishVolumeResponse {
        publish_context: Default::default(),
    }
}
