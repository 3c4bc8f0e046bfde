//! The CSI Controller service: volumes as MirroredVolume objects.
//!
//! It needs only the Kubernetes API (it runs beside the provisioner,
//! attacher and resizer sidecars, anywhere in the cluster). The work of
//! each call lives in [`create`] (Create/Delete) and [`publish`]
//! (Publish/Unpublish/Validate); this file holds the service, the small
//! calls (List, GetCapacity, capabilities); [`expand`] holds Expand and the trait impl,
//! which only converts results through the one `From<CsiError>`.
//! Every call on a volume holds that volume's lock: a concurrent call on
//! it is `Aborted`.

pub mod capacity;
pub mod create;
pub mod expand;
pub mod publish;

use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use tonic::{Request, Response, Status};
use twinvol_crds::{MirroredVolume, Site};

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::locks::VolumeLocks;
use crate::names::TOPOLOGY_KEY;
use crate::params;
use crate::proto::csi::controller_server::Controller;
use crate::proto::csi::controller_service_capability::{self, rpc};
use crate::proto::csi::list_volumes_response::{Entry, VolumeStatus};
use crate::proto::csi::*;
use crate::volume;

pub use capacity::NodeReports;

/// The Controller service.
#[derive(Clone)]
pub struct ControllerService {
    client: Client,
    volumes: Api<MirroredVolume>,
    locks: VolumeLocks,
    reports: NodeReports,
    zone_label: String,
}

impl ControllerService {
    /// A controller over the cluster `client` talks to; node capacity from
    /// the heartbeat Leases in `namespace`.
    pub fn new(client: Client, namespace: &str, zone_label: &str) -> Self {
        Self {
            volumes: Api::all(client.clone()),
            reports: NodeReports::watch(client.clone(), namespace),
            client,
            locks: VolumeLocks::new(),
            zone_label: zone_label.to_owned(),
        }
    }

    /// Changes a volume's metadata by compare-and-swap: reads it, lets
    /// `decide` say what to merge into `metadata` (`None`: nothing to do),
    /// and patches with the resourceVersion read. A lost race (the node
    /// plugins write the same object's status) reads and decides again.
    async fn swap_metadata(
        &self,
        name: &str,
        what: &str,
        mut decide: impl FnMut(Option<&MirroredVolume>) -> CsiResult<Option<serde_json::Value>>,
    ) -> CsiResult<()> {
        const ATTEMPTS: usize = 10;
        for _ in 0..ATTEMPTS {
            let mv = volume::get(&self.volumes, name).await?;
            let Some(mut fields) = decide(mv.as_ref())? else {
                return Ok(());
            };
            let Some(mv) = mv else {
                return Ok(());
            };
            fields["resourceVersion"] = serde_json::Value::from(mv.resource_version());
            let patch = serde_json::json!({ "metadata": fields });
            match self
                .volumes
                .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => return Err(CsiError::kube(format!("{what} of {name}"), e)),
            }
        }
        Err(CsiError::OperationInProgress {
            volume: format!("{name} ({what}: the object kept changing under {ATTEMPTS} attempts)"),
        })
    }

    /// The names of every Site, sorted.
    async fn site_names(&self) -> CsiResult<Vec<String>> {
        let sites: Api<Site> = Api::all(self.client.clone());
        let mut names: Vec<String> = sites
            .list(&ListParams::default())
            .await
            .map_err(|e| CsiError::kube("listing Sites", e))?
            .items
            .iter()
            .map(ResourceExt::name_any)
            .collect();
        names.sort();
        Ok(names)
    }

    async fn list_impl(&self, request: ListVolumesRequest) -> CsiResult<ListVolumesResponse> {
        let mut all = self
            .volumes
            .list(&ListParams::default())
            .await
            .map_err(|e| CsiError::kube("listing MirroredVolumes", e))?
            .items;
        // A deleted volume waits for its node plugins to remove the
        // replicas' data; for the CO it is gone already.
        all.retain(|mv| mv.metadata.deletion_timestamp.is_none());
        all.sort_by_key(ResourceExt::name_any);
        let start: usize = if request.starting_token.is_empty() {
            0
        } else {
            request
                .starting_token
                .parse()
                .ok()
                .filter(|n| *n <= all.len())
                .ok_or_else(|| CsiError::BadToken {
                    token: request.starting_token.clone(),
                })?
        };
        let max = usize::try_from(request.max_entries)
            .ok()
            .filter(|m| *m > 0)
            .unwrap_or(usize::MAX);
        let page: Vec<&MirroredVolume> = all.iter().skip(start).take(max).collect();
        let next = start + page.len();
        let entries = page
            .into_iter()
            .map(|mv| {
                let condition = volume::degraded(mv);
                Entry {
                    volume: Some(Volume {
                        capacity_bytes: volume::size_bytes(mv)
                            .ok()
                            .and_then(|b| i64::try_from(b).ok())
                            .unwrap_or(0),
                        volume_id: mv.name_any(),
                        volume_context: Default::default(),
                        content_source: None,
                        accessible_topology: volume::topology(mv),
                    }),
                    status: Some(VolumeStatus {
                        published_node_ids: volume::published(mv)
                            .map(|p| p.node)
                            .into_iter()
                            .collect(),
                        volume_condition: Some(VolumeCondition {
                            abnormal: condition.is_some(),
                            message: condition.unwrap_or_else(|| "both replicas in sync".into()),
                        }),
                    }),
                }
            })
            .collect();
        Ok(ListVolumesResponse {
            entries,
            next_token: if next < all.len() {
                next.to_string()
            } else {
                String::new()
            },
        })
    }

    fn capacity_impl(&self, request: &GetCapacityRequest) -> CsiResult<GetCapacityResponse> {
        if let Some(caps) = request.volume_capabilities.first() {
            capability::check(caps)?;
        }
        let site = request
            .accessible_topology
            .as_ref()
            .and_then(|t| t.segments.get(TOPOLOGY_KEY))
            .map(String::as_str);
        let nodes = self.reports.fresh(site);
        let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Ok(GetCapacityResponse {
            available_capacity: clamp(nodes.iter().map(|n| n.free).sum()),
            maximum_volume_size: Some(clamp(nodes.iter().map(|n| n.free).max().unwrap_or(0))),
            minimum_volume_size: Some(clamp(params::SIZE_ALIGN)),
        })
    }
}

fn rpc_capability(kind: rpc::Type) -> ControllerServiceCapability {
    ControllerServiceCapability {
        r#type: Some(controller_service_capability::Type::Rpc(
            controller_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

fn unimplemented<T>(what: &'static str) -> Result<Response<T>, Status> {
    Err(CsiError::Unsupported { what }.into())
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<CreateVolumeRequest>,
    ) -> Result<Response<CreateVolumeResponse>, Status> {
        Ok(Response::new(
            self.create_volume_impl(request.into_inner()).await?,
        ))
    }

    async fn delete_volume(
        &self,
        request: Request<DeleteVolumeRequest>,
    ) -> Result<Response<DeleteVolumeResponse>, Status> {
        self.delete_volume_impl(request.into_inner()).await?;
        Ok(Response::new(DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        request: Request<ControllerPublishVolumeRequest>,
    ) -> Result<Response<ControllerPublishVolumeResponse>, Status> {
        Ok(Response::new(
            self.publish_impl(request.into_inner()).await?,
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        request: Request<ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<ControllerUnpublishVolumeResponse>, Status> {
        self.unpublish_impl(request.into_inner()).await?;
        Ok(Response::new(ControllerUnpublishVolumeResponse {}))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<ValidateVolumeCapabilitiesResponse>, Status> {
        Ok(Response::new(
            self.validate_impl(request.into_inner()).await?,
        ))
    }

    async fn list_volumes(
        &self,
        request: Request<ListVolumesRequest>,
    ) -> Result<Response<ListVolumesResponse>, Status> {
        Ok(Response::new(self.list_impl(request.into_inner()).await?))
    }

    async fn get_capacity(
        &self,
        request: Request<GetCapacityRequest>,
    ) -> Result<Response<GetCapacityResponse>, Status> {
        Ok(Response::new(self.capacity_impl(request.get_ref())?))
    }

    async fn controller_get_capabilities(
        &self,
        _request: Request<ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<ControllerGetCapabilitiesResponse>, Status> {
        Ok(Response::new(ControllerGetCapabilitiesResponse {
            capabilities: [
                rpc::Type::CreateDeleteVolume,
                rpc::Type::PublishUnpublishVolume,
                rpc::Type::PublishReadonly,
                rpc::Type::ListVolumes,
                rpc::Type::ListVolumesPublishedNodes,
                rpc::Type::GetCapacity,
                rpc::Type::VolumeCondition,
                rpc::Type::SingleNodeMultiWriter,
                rpc::Type::ExpandVolume,
            ]
            .into_iter()
            .map(rpc_capability)
            .collect(),
        }))
    }

    async fn create_snapshot(
        &self,
        _request: Request<CreateSnapshotRequest>,
    ) -> Result<Response<CreateSnapshotResponse>, Status> {
        unimplemented("CreateSnapshot")
    }

    async fn delete_snapshot(
        &self,
        _request: Request<DeleteSnapshotRequest>,
    ) -> Result<Response<DeleteSnapshotResponse>, Status> {
        unimplemented("DeleteSnapshot")
    }

    async fn list_snapshots(
        &self,
        _request: Request<ListSnapshotsRequest>,
    ) -> Result<Response<ListSnapshotsResponse>, Status> {
        unimplemented("ListSnapshots")
    }

    async fn get_snapshot(
        &self,
        _request: Request<GetSnapshotRequest>,
    ) -> Result<Response<GetSnapshotResponse>, Status> {
        unimplemented("GetSnapshot")
    }

    async fn controller_expand_volume(
        &self,
        request: Request<ControllerExpandVolumeRequest>,
    ) -> Result<Response<ControllerExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand_impl(request.into_inner()).await?))
    }

    async fn controller_get_volume(
        &self,
        _request: Request<ControllerGetVolumeRequest>,
    ) -> Result<Response<ControllerGetVolumeResponse>, Status> {
        unimplemented("ControllerGetVolume")
    }

    async fn controller_modify_volume(
        &self,
        _request: Request<ControllerModifyVolumeRequest>,
    ) -> Result<Response<ControllerModifyVolumeResponse>, Status> {
        unimplemented("ControllerModifyVolume")
    }
}
