//! NodePublishVolume and NodeUnpublishVolume: what a pod sees.
//!
//! A filesystem volume is bind-mounted from its staging path to the
//! target directory (remounted read-only when asked); a block volume's
//! device is bind-mounted onto the target file. With RWOP
//! (`SINGLE_NODE_SINGLE_WRITER`) a second target is refused
//! (`FailedPrecondition`). Unpublish unmounts and removes the target, and
//! succeeds when there is nothing to undo.

use std::path::Path;

use crate::capability::{self, Access};
use crate::error::{CsiError, CsiResult};
use crate::proto::csi::{NodePublishVolumeRequest, NodeUnpublishVolumeRequest};
use crate::sys::mounts;
use crate::volume;

use super::state::{Exposure, Target};
use super::{NodeService, required};

impl NodeService {
    pub(super) async fn publish_impl(&self, request: NodePublishVolumeRequest) -> CsiResult<()> {
        required(&request.volume_id, "volume_id")?;
        required(&request.target_path, "target_path")?;
        let cap = request
            .volume_capability
            .as_ref()
            .ok_or(CsiError::MissingField {
                field: "volume_capability",
            })
            .and_then(capability::check)?;
        required(&request.staging_target_path, "staging_target_path")?;
        let name = request.volume_id.clone();
        let _guard = self.locks.try_lock(&name)?;
        volume::require(&self.volumes, &name).await?;
        let vdir = self.volume_dir(&name);
        let mut rec = vdir.record()?.ok_or_else(|| CsiError::Precondition {
            volume: name.clone(),
            detail: "it is not staged on this node; NodeStageVolume comes first".into(),
        })?;
        if rec.staging_path != Path::new(&request.staging_target_path) {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "it is staged at {}, not at {}",
                    rec.staging_path.display(),
                    request.staging_target_path
                ),
            });
        }
        let block = matches!(cap.access, Access::Block);
        if block != matches!(rec.exposure, Exposure::Block) {
            return Err(CsiError::AlreadyInUse {
                volume: name,
                what: format!("staged as {:?}", rec.exposure),
            });
        }
        let target = Path::new(&request.target_path).to_owned();
        let read_only = request.readonly || cap.read_only_mode();
        if let Some(existing) = rec.targets.iter().find(|t| t.path == target) {
            if existing.read_only != read_only {
                return Err(CsiError::AlreadyInUse {
                    volume: name,
                    what: format!(
                        "published at {} {}",
                        target.display(),
                        if existing.read_only {
                            "read-only"
                        } else {
                            "read-write"
                        }
                    ),
                });
            }
            if mounts::mounted_at(&target)?.is_some() {
                return Ok(());
            }
        } else if (rec.single_writer || cap.single_writer()) && !rec.targets.is_empty() {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "it is ReadWriteOncePod (single writer) and already published at {}",
                    rec.targets[0].path.display()
                ),
            });
        }
        let flags = match &cap.access {
            Access::Mount { flags, .. } => flags.clone(),
            Access::Block => vec![],
        };
        if block {
            if let Some(parent) = target.parent() {
                mounts::create_dir(parent)?;
            }
            crate::dataplane::process::touch(&target)?;
            mounts::bind(&rec.device, &target, read_only, &[]).await?;
        } else {
            mounts::create_dir(&target)?;
            mounts::bind(&rec.staging_path, &target, read_only, &flags).await?;
        }
        if !rec.targets.iter().any(|t| t.path == target) {
            rec.targets.push(Target {
                path: target.clone(),
                read_only,
            });
        }
        vdir.save(&rec)?;
        tracing::info!(volume = %name, target = %target.display(), read_only, "published");
        Ok(())
    }

    pub(super) async fn unpublish_impl(
        &self,
        request: NodeUnpublishVolumeRequest,
    ) -> CsiResult<()> {
        required(&request.volume_id, "volume_id")?;
        required(&request.target_path, "target_path")?;
        let name = request.volume_id;
        let _guard = self.locks.try_lock(&name)?;
        let target = Path::new(&request.target_path);
        mounts::unmount_all(target).await?;
        remove_target(target)?;
        let vdir = self.volume_dir(&name);
        if let Some(mut rec) = vdir.record()? {
            let before = rec.targets.len();
            rec.targets.retain(|t| t.path != target);
            if rec.targets.len() != before {
                vdir.save(&rec)?;
            }
        }
        tracing::info!(volume = %name, target = %target.display(), "unpublished");
        Ok(())
    }
}

/// Removes the target directory or file the driver created.
fn remove_target(target: &Path) -> CsiResult<()> {
    let result = match std::fs::symlink_metadata(target) {
        Ok(m) if m.is_dir() => std::fs::remove_dir(target),
        Ok(_) => std::fs::remove_file(target),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    };
    result.map_err(|e| CsiError::io("removing the publish target", target, e))
}
