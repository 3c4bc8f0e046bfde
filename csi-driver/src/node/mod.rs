//! The CSI Node service and the node plugin around it.
//!
//! - [`stage`]: NodeStage/Unstage — the volume's frontend process, its
//!   block device (FUSE file + loop device; the kernel NBD client where the
//!   kernel has one), the filesystem.
//! - [`publish`]: NodePublish/Unpublish — bind mounts for pods.
//! - [`stats`]: NodeGetVolumeStats (usage, health).
//! - [`expand`]: NodeExpandVolume (the frontend grows the volume, then the
//!   loop device and the filesystem).
//! - [`replicas`]: the replica servers of the replicas placed on this node.
//! - [`site`]: which Site the node is in; [`state`]: what is kept on disk.
//!
//! The trait impl at the bottom only converts results through the one
//! `From<CsiError>`; every call on a volume holds that volume's lock.

pub mod expand;
pub mod publish;
pub mod replicas;
pub mod site;
pub mod stage;
pub mod state;
pub mod stats;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use kube::Client;
use kube::api::Api;
use tonic::{Request, Response, Status};
use twinvol_crds::{MirroredVolume, NodeName, SiteName};

use crate::dataplane::Launch;
use crate::error::CsiError;
use crate::locks::VolumeLocks;
use crate::names::TOPOLOGY_KEY;
use crate::proto::csi::node_server::Node;
use crate::proto::csi::node_service_capability::{self, rpc};
use crate::proto::csi::*;

/// How the node plugin is set up (flags of `twinvol-csi --mode node`).
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node: NodeName,
    /// The address replica servers listen on, reachable from the other
    /// nodes (both Sites).
    pub node_ip: IpAddr,
    /// Where heartbeat Leases live.
    pub namespace: String,
    /// Per-volume state (see [`state`]).
    pub state_dir: PathBuf,
    /// Prefix of every Site pool path (`/` in production; a directory per
    /// node when several run on one machine).
    pub host_root: PathBuf,
    /// The replication secret shared by every node plugin.
    pub secret_file: PathBuf,
    /// The node label whose value names the Site when no selector matches.
    pub zone_label: String,
    /// The frontends' lease: duration, and the margin a new frontend waits
    /// beyond another's expiry.
    pub lease_duration: Duration,
    pub lease_margin: Duration,
    /// A replica silent this long leaves the in-sync set.
    pub replica_timeout: Duration,
    /// How long NodeStage waits for placement and the frontend.
    pub stage_timeout: Duration,
    /// How data-plane processes are started.
    pub launch: Launch,
}

/// The Node service.
#[derive(Clone)]
pub struct NodeService {
    config: NodeConfig,
    site: SiteName,
    volumes: Api<MirroredVolume>,
    locks: VolumeLocks,
}

impl NodeService {
    pub fn new(config: NodeConfig, client: Client, site: SiteName) -> Self {
        Self {
            volumes: Api::all(client),
            config,
            site,
            locks: VolumeLocks::new(),
        }
    }

    pub fn site(&self) -> &SiteName {
        &self.site
    }
}

fn rpc_capability(kind: rpc::Type) -> NodeServiceCapability {
    NodeServiceCapability {
        r#type: Some(node_service_capability::Type::Rpc(
            node_service_capability::Rpc {
                r#type: kind as i32,
            },
        )),
    }
}

/// What the node plugin can do (also answered on the controller's socket,
/// where external-resizer asks whether node expansion is needed).
pub fn capabilities() -> NodeGetCapabilitiesResponse {
    NodeGetCapabilitiesResponse {
        capabilities: [
            rpc::Type::StageUnstageVolume,
            rpc::Type::GetVolumeStats,
            rpc::Type::VolumeCondition,
            rpc::Type::SingleNodeMultiWriter,
            rpc::Type::ExpandVolume,
        ]
        .into_iter()
        .map(rpc_capability)
        .collect(),
    }
}

/// The Node service on the controller's socket: only
/// NodeGetCapabilities, which external-resizer calls on the socket it is
/// given (to learn that NodeExpandVolume follows the controller's
/// expansion); every other call belongs to a node.
#[derive(Debug, Clone, Copy, Default)]
pub struct CapabilitiesOnly;

fn on_a_node<T>(what: &'static str) -> Result<Response<T>, Status> {
    Err(CsiError::Unsupported { what }.into())
}

#[tonic::async_trait]
impl Node for CapabilitiesOnly {
    async fn node_stage_volume(
        &self,
        _request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        on_a_node("NodeStageVolume on the controller")
    }

    async fn node_unstage_volume(
        &self,
        _request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        on_a_node("NodeUnstageVolume on the controller")
    }

    async fn node_publish_volume(
        &self,
        _request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        on_a_node("NodePublishVolume on the controller")
    }

    async fn node_unpublish_volume(
        &self,
        _request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        on_a_node("NodeUnpublishVolume on the controller")
    }

    async fn node_get_volume_stats(
        &self,
        _request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        on_a_node("NodeGetVolumeStats on the controller")
    }

    async fn node_expand_volume(
        &self,
        _request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        on_a_node("NodeExpandVolume on the controller")
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        on_a_node("NodeGetInfo on the controller")
    }
}

fn required(value: &str, field: &'static str) -> Result<(), CsiError> {
    if value.is_empty() {
        Err(CsiError::MissingField { field })
    } else {
        Ok(())
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<NodeStageVolumeRequest>,
    ) -> Result<Response<NodeStageVolumeResponse>, Status> {
        self.stage_impl(request.into_inner()).await?;
        Ok(Response::new(NodeStageVolumeResponse {}))
    }

    async fn node_unstage_volume(
        &self,
        request: Request<NodeUnstageVolumeRequest>,
    ) -> Result<Response<NodeUnstageVolumeResponse>, Status> {
        self.unstage_impl(request.into_inner()).await?;
        Ok(Response::new(NodeUnstageVolumeResponse {}))
    }

    async fn node_publish_volume(
        &self,
        request: Request<NodePublishVolumeRequest>,
    ) -> Result<Response<NodePublishVolumeResponse>, Status> {
        self.publish_impl(request.into_inner()).await?;
        Ok(Response::new(NodePublishVolumeResponse {}))
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<NodeUnpublishVolumeRequest>,
    ) -> Result<Response<NodeUnpublishVolumeResponse>, Status> {
        self.unpublish_impl(request.into_inner()).await?;
        Ok(Response::new(NodeUnpublishVolumeResponse {}))
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<NodeGetVolumeStatsRequest>,
    ) -> Result<Response<NodeGetVolumeStatsResponse>, Status> {
        Ok(Response::new(self.stats_impl(request.into_inner()).await?))
    }

    async fn node_expand_volume(
        &self,
        request: Request<NodeExpandVolumeRequest>,
    ) -> Result<Response<NodeExpandVolumeResponse>, Status> {
        Ok(Response::new(self.expand_impl(request.into_inner()).await?))
    }

    async fn node_get_capabilities(
        &self,
        _request: Request<NodeGetCapabilitiesRequest>,
    ) -> Result<Response<NodeGetCapabilitiesResponse>, Status> {
        Ok(Response::new(capabilities()))
    }

    async fn node_get_info(
        &self,
        _request: Request<NodeGetInfoRequest>,
    ) -> Result<Response<NodeGetInfoResponse>, Status> {
        Ok(Response::new(NodeGetInfoResponse {
            node_id: self.config.node.to_string(),
            max_volumes_per_node: 0,
            accessible_topology: Some(Topology {
                segments: [(TOPOLOGY_KEY.to_owned(), self.site.to_string())].into(),
            }),
        }))
    }
}
