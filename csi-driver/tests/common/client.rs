//! A CSI client over a plugin's unix socket (tonic's generated clients),
//! with the request builders the tests use.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};
use twinvol_csi_driver::proto::csi::controller_client::ControllerClient;
use twinvol_csi_driver::proto::csi::identity_client::IdentityClient;
use twinvol_csi_driver::proto::csi::node_client::NodeClient;
use twinvol_csi_driver::proto::csi::volume_capability::access_mode::Mode;
use twinvol_csi_driver::proto::csi::volume_capability::{
    AccessMode, AccessType, BlockVolume, MountVolume,
};
use twinvol_csi_driver::proto::csi::*;

/// Clients of one plugin socket.
#[derive(Clone)]
pub struct Csi {
    pub identity: IdentityClient<Channel>,
    pub controller: ControllerClient<Channel>,
    pub node: NodeClient<Channel>,
}

/// A channel to a unix socket.
pub async fn channel(socket: &Path) -> Result<Channel, tonic::transport::Error> {
    let path: PathBuf = socket.to_owned();
    Endpoint::try_from("http://localhost")
        .expect("a valid placeholder URI")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(path).await?)) }
        }))
        .await
}

impl Csi {
    pub async fn connect(socket: &Path) -> Result<Self, tonic::transport::Error> {
        let ch = channel(socket).await?;
        Ok(Self {
            identity: IdentityClient::new(ch.clone()),
            controller: ControllerClient::new(ch.clone()),
            node: NodeClient::new(ch),
        })
    }

    pub async fn probe(&mut self) -> Result<bool, tonic::Status> {
        Ok(self
            .identity
            .probe(ProbeRequest {})
            .await?
            .into_inner()
            .ready
            .unwrap_or(false))
    }
}

pub fn mount_cap(fs: &str, mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}

pub fn block_cap(mode: Mode) -> VolumeCapability {
    VolumeCapability {
        access_mode: Some(AccessMode { mode: mode as i32 }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

pub fn rwo() -> VolumeCapability {
    mount_cap("ext4", Mode::SingleNodeWriter)
}

pub fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

pub fn create_request(
    name: &str,
    bytes: i64,
    parameters: HashMap<String, String>,
) -> CreateVolumeRequest {
    CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![rwo()],
        parameters,
        ..Default::default()
    }
}

pub fn publish_request(volume: &str, node: &str) -> ControllerPublishVolumeRequest {
    ControllerPublishVolumeRequest {
        volume_id: volume.into(),
        node_id: node.into(),
        volume_capability: Some(rwo()),
        ..Default::default()
    }
}

pub fn stage_request(
    volume: &str,
    staging: &Path,
    cap: VolumeCapability,
) -> NodeStageVolumeRequest {
    NodeStageVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}

pub fn node_publish_request(
    volume: &str,
    staging: &Path,
    target: &Path,
    cap: VolumeCapability,
) -> NodePublishVolumeRequest {
    NodePublishVolumeRequest {
        volume_id: volume.into(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(cap),
        ..Default::default()
    }
}
