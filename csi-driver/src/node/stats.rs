//! NodeGetVolumeStats: usage and health.
//!
//! Health is abnormal when the volume is degraded (a replica out of the
//! in-sync set: writes are acknowledged by one Site alone), when its
//! frontend process is gone (I/O fails until the volume is staged again)
//! or when the frontend reports its lease expired or fenced.

use std::path::Path;

use crate::error::{CsiError, CsiResult};
use crate::proto::csi::volume_usage::Unit;
use crate::proto::csi::{
    NodeGetVolumeStatsRequest, NodeGetVolumeStatsResponse, VolumeCondition, VolumeUsage,
};
use crate::sys::loopdev;
use crate::volume;

use super::state::{Exposure, StageRecord, VolumeDir};
use super::{NodeService, required};

impl NodeService {
    /// The staging record of a volume staged here whose staging path or a
    /// publish target is `path`, or `NotFound`.
    pub(super) async fn staged_at(
        &self,
        volume_id: &str,
        path: &str,
    ) -> CsiResult<(VolumeDir, StageRecord)> {
        let mv = volume::require(&self.volumes, volume_id).await?;
        let vdir = self.volume_dir(volume_id);
        let not_here = || CsiError::VolumeNotFound {
            volume: format!("{volume_id} at {path}"),
        };
        let rec = vdir.record()?.ok_or_else(not_here)?;
        let path = Path::new(path);
        if rec.staging_path != path && !rec.targets.iter().any(|t| t.path == path) {
            return Err(not_here());
        }
        drop(mv);
        Ok((vdir, rec))
    }

    pub(super) async fn stats_impl(
        &self,
        request: NodeGetVolumeStatsRequest,
    ) -> CsiResult<NodeGetVolumeStatsResponse> {
        required(&request.volume_id, "volume_id")?;
        required(&request.volume_path, "volume_path")?;
        let (vdir, rec) = self
            .staged_at(&request.volume_id, &request.volume_path)
            .await?;
        let usage = match rec.exposure {
            Exposure::Block => vec![VolumeUsage {
                available: 0,
                total: clamp(loopdev::size(&rec.device)?),
                used: 0,
                unit: Unit::Bytes as i32,
            }],
            Exposure::Mount { .. } => {
                let path = Path::new(&request.volume_path);
                let st = nix::sys::statvfs::statvfs(path).map_err(|e| {
                    CsiError::io("statvfs", path, std::io::Error::from_raw_os_error(e as i32))
                })?;
                let frag = st.fragment_size();
                vec![
                    VolumeUsage {
                        available: clamp(st.blocks_available() * frag),
                        total: clamp(st.blocks() * frag),
                        used: clamp((st.blocks() - st.blocks_free()) * frag),
                        unit: Unit::Bytes as i32,
                    },
                    VolumeUsage {
                        available: clamp(st.files_available()),
                        total: clamp(st.files()),
                        used: clamp(st.files() - st.files_free()),
                        unit: Unit::Inodes as i32,
                    },
                ]
            }
        };
        let condition = self.condition(&request.volume_id, &vdir).await;
        Ok(NodeGetVolumeStatsResponse {
            usage,
            volume_condition: Some(condition),
        })
    }

    async fn condition(&self, volume_id: &str, vdir: &VolumeDir) -> VolumeCondition {
        let abnormal = |message: String| VolumeCondition {
            abnormal: true,
            message,
        };
        if vdir.frontend().running().is_none() {
            return abnormal(
                "the volume's frontend process is not running: I/O fails until the volume is unstaged and staged again".into(),
            );
        }
        if let Ok(text) = std::fs::read_to_string(vdir.status_file())
            && let Ok(report) = serde_json::from_str::<serde_json::Value>(&text)
        {
            let lease = report["lease"].as_str().unwrap_or("");
            if lease == "fenced" || lease == "expired" {
                let why = report["fenced"]
                    .as_str()
                    .unwrap_or("its lease could not be renewed");
                return abnormal(format!("the frontend holds I/O: lease {lease} ({why})"));
            }
        }
        match volume::get(&self.volumes, volume_id).await {
            Ok(Some(mv)) => match volume::degraded(&mv) {
                Some(message) => abnormal(message),
                None => VolumeCondition {
                    abnormal: false,
                    message: "both replicas in sync".into(),
                },
            },
            Ok(None) => abnormal("the MirroredVolume no longer exists".into()),
            Err(e) => VolumeCondition {
                abnormal: false,
                message: format!("health unknown: {e}"),
            },
        }
    }
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
