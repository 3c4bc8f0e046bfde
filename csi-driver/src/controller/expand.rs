//! ControllerExpandVolume: a volume grows by raising its MirroredVolume's
//! `spec.size` (the CRD refuses a smaller one). The bytes grow on the
//! node: NodeExpandVolume asks the volume's frontend to grow every in-sync
//! replica, and a frontend started later grows replicas smaller than
//! `spec.size` itself — so `node_expansion_required` is always true.

use kube::api::{Patch, PatchParams};
use twinvol_crds::VolumeSize;

use crate::capability;
use crate::error::{CsiError, CsiResult};
use crate::params;
use crate::proto::csi::{ControllerExpandVolumeRequest, ControllerExpandVolumeResponse};
use crate::volume;

use super::ControllerService;

impl ControllerService {
    pub(super) async fn expand_impl(
        &self,
        request: ControllerExpandVolumeRequest,
    ) -> CsiResult<ControllerExpandVolumeResponse> {
        if request.volume_id.is_empty() {
            return Err(CsiError::MissingField { field: "volume_id" });
        }
        let range = request
            .capacity_range
            .as_ref()
            .ok_or(CsiError::MissingField {
                field: "capacity_range",
            })?;
        if let Some(cap) = &request.volume_capability {
            capability::check(cap)?;
        }
        let name = request.volume_id.clone();
        let _guard = self.locks.try_lock(&name)?;
        let mv = volume::require(&self.volumes, &name).await?;
        let current = volume::size_bytes(&mv)?;
        let (required, limit) = (range.required_bytes, range.limit_bytes);
        // Never shrinks: a range the current size already satisfies is
        // answered with it; one whose limit is below it is out of range.
        if params::size_fits(current, required, limit) {
            return Ok(response(current));
        }
        let size = params::size_for(required, limit)?;
        if size < current {
            return Err(CsiError::CapacityOutOfRange {
                reason: format!(
                    "volume {name} has {current} bytes and cannot shrink to at most {limit} bytes"
                ),
            });
        }
        let quantity = VolumeSize::from_bytes(size).map_err(|e| CsiError::InvalidField {
            field: "capacity_range",
            value: size.to_string(),
            reason: e.to_string(),
        })?;
        let patch = serde_json::json!({ "spec": { "size": quantity } });
        self.volumes
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| CsiError::kube(format!("growing spec.size of {name}"), e))?;
        tracing::info!(volume = %name, from = current, to = size, "spec.size raised; the node grows the replicas");
        Ok(response(size))
    }
}

fn response(size: u64) -> ControllerExpandVolumeResponse {
    ControllerExpandVolumeResponse {
        capacity_bytes: i64::try_from(size).unwrap_or(i64::MAX),
        node_expansion_required: true,
    }
}
