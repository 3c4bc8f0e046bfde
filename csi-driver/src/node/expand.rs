//! NodeExpandVolume: grows a volume staged on this node online. The
//! volume's frontend grows every in-sync replica durably (through its
//! control socket, `twinvol_engine::frontend::control`), the loop device
//! over its FUSE file reads the new size (`losetup -c`), and a filesystem
//! grows mounted (`resize2fs` for ext4, `xfs_growfs` for xfs); a block
//! volume has no filesystem step.

use twinvol_engine::frontend::control::{self, ControlError};

use crate::error::{CsiError, CsiResult};
use crate::params::{self, FsType};
use crate::proto::csi::{NodeExpandVolumeRequest, NodeExpandVolumeResponse};
use crate::sys::{filesystem, loopdev};
use crate::volume;

use super::state::Exposure;
use super::{NodeService, required};

impl NodeService {
    pub(super) async fn expand_impl(
        &self,
        request: NodeExpandVolumeRequest,
    ) -> CsiResult<NodeExpandVolumeResponse> {
        required(&request.volume_id, "volume_id")?;
        required(&request.volume_path, "volume_path")?;
        let name = request.volume_id.clone();
        let _guard = self.locks.try_lock(&name)?;
        let mv = volume::require(&self.volumes, &name).await?;
        let (vdir, rec) = self.staged_at(&name, &request.volume_path).await?;
        let spec_size = volume::size_bytes(&mv)?;
        // The size approved by ControllerExpandVolume is spec.size: the
        // volume grows to it (a request above it comes too early).
        let asked = match &request.capacity_range {
            Some(r) => params::size_for(r.required_bytes, r.limit_bytes)?,
            None => spec_size,
        };
        if asked > spec_size {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "its spec.size is {spec_size} bytes, less than the {asked} asked for: ControllerExpandVolume first"
                ),
            });
        }
        let size = spec_size;
        let socket = vdir.control_socket();
        if !socket.exists() {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "its frontend has no control socket at {} (started by an older driver, or not running): unstage and stage it again",
                    socket.display()
                ),
            });
        }
        let grown = control::request_resize(&socket, size)
            .await
            .map_err(|e| match e {
                ControlError::Refused {
                    invalid: true,
                    message,
                } => CsiError::CapacityOutOfRange { reason: message },
                other => CsiError::NotReady {
                    volume: name.clone(),
                    detail: format!("growing the volume failed: {other}"),
                },
            })?;
        loopdev::refresh_capacity(&rec.device).await?;
        let device_size = loopdev::size(&rec.device)?;
        if device_size < grown {
            return Err(CsiError::Internal {
                detail: format!(
                    "loop device {} shows {device_size} bytes after losetup -c, the volume has {grown}",
                    rec.device.display()
                ),
            });
        }
        if let Exposure::Mount { fs_type } = &rec.exposure {
            let fs = FsType::parse(fs_type).unwrap_or(FsType::Ext4);
            filesystem::grow(&rec.device, &rec.staging_path, fs, &name).await?;
        }
        tracing::info!(volume = %name, size = grown, "expanded");
        Ok(NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(grown).unwrap_or(i64::MAX),
        })
    }
}
