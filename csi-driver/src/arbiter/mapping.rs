//! The translation between a MirroredVolume (spec.sites, status, resourceVersion)
//! and the engine's [`VolumeRecord`], both ways, as pure functions over the
//! object's JSON so that they are unit-tested without an API server.
//!
//! Status is written as raw JSON, not through [`MirroredVolumeStatus`]: a
//! write must leave every field the arbiter does not own exactly as it
//! found it. The typed struct is used to check the fields the arbiter reads.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::core::DynamicObject;
use serde_json::{Map, Value};
use twinvol_crds::{MirroredVolumeStatus, NodeName, SiteName};
use twinvol_engine::arbiter::{FrontendId, Lease, Version, VolumeRecord};
use twinvol_engine::protocol::{Epoch, ReplicaId};

/// Why a MirroredVolume cannot be read as (or written from) a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("metadata.resourceVersion is missing")]
    NoResourceVersion,
    #[error("spec.sites is unreadable: {reason}")]
    Sites { reason: String },
    #[error("spec.sites must name two different Sites, found {sites:?}")]
    NotTwoSites { sites: Vec<String> },
    #[error("site {site:?} is not usable as a replica id: {reason}")]
    SiteNotReplicaId { site: String, reason: String },
    #[error("status is unreadable: {reason}")]
    Status { reason: String },
    #[error(
        "status.inSync is empty although a frontend has held the volume (status.epoch or status.frontend is set); the arbiter never empties it (the last in-sync replica cannot leave), so something else overwrote it: set it to the sites whose replica has every write"
    )]
    EmptyInSync,
    #[error("status.inSync names {site:?}, which is not one of spec.sites {sites:?}")]
    InSyncNotASite { site: String, sites: Vec<String> },
    #[error("status.frontend.leaseHolder is set but status.frontend.{missing} is not")]
    IncompleteLease { missing: &'static str },
    #[error("status.frontend.renewTime {time} is before 1970")]
    RenewTimeBeforeUnixEpoch { time: String },
    #[error("status.frontend.leaseDurationSeconds is negative ({seconds})")]
    NegativeLeaseDuration { seconds: i32 },
    #[error("lease renewal time {ms} ms is outside what a MicroTime holds")]
    RenewTimeOutOfRange { ms: u64 },
    #[error("epoch {epoch} does not fit status.epoch (int64)")]
    EpochTooLarge { epoch: u64 },
    #[error("the lease holder {holder:?} changed without a new epoch")]
    HolderChangedWithoutEpoch { holder: String },
}

/// The record a MirroredVolume holds. A missing status, or one whose
/// `inSync` is empty (absent: the CRD defaults it to `[]`) while epoch is 0
/// and there is no frontend, is a volume no frontend has used yet: epoch 0,
/// both sites in sync, no lease — what `VolumeRecord::new` gives.
pub fn record_from(object: &DynamicObject) -> Result<VolumeRecord, MappingError> {
    let version = object
        .metadata
        .resource_version
        .clone()
        .ok_or(MappingError::NoResourceVersion)?;
    let sites = sites(object)?;
    let replicas = sites
        .iter()
        .map(replica_id)
        .collect::<Result<BTreeSet<_>, _>>()?;
    let mut record = VolumeRecord::new(Version(version), replicas);
    let Some(raw) = raw_status(object) else {
        return Ok(record);
    };
    let status = typed_status(raw)?;
    record.epoch = Epoch(status.epoch.get());
    if status.in_sync.is_empty() {
        // The CRD defaults `inSync` to `[]` as soon as anyone writes a
        // status, so an empty set is also how "not written yet" looks.
        // It can mean that only while nothing else was written either: once
        // a lease was taken (epoch > 0, a frontend) an empty set is
        // somebody's bug, and guessing "both in sync" could serve stale data.
        if status.epoch.get() != 0 || status.frontend.is_some() {
            return Err(MappingError::EmptyInSync);
        }
    } else {
        record.in_sync = status
            .in_sync
            .iter()
            .map(|site| {
                if sites.contains(site) {
                    replica_id(site)
                } else {
                    Err(MappingError::InSyncNotASite {
                        site: site.to_string(),
                        sites: names(&sites),
                    })
                }
            })
            .collect::<Result<_, _>>()?;
    }
    record.lease = match status.frontend {
        Some(frontend) => match frontend.lease_holder {
            Some(holder) => {
                let renew_time = frontend.renew_time.ok_or(MappingError::IncompleteLease {
                    missing: "renewTime",
                })?;
                let seconds =
                    frontend
                        .lease_duration_seconds
                        .ok_or(MappingError::IncompleteLease {
                            missing: "leaseDurationSeconds",
                        })?;
                Some(Lease {
                    holder: FrontendId(holder),
                    epoch: Epoch(frontend.epoch.get()),
                    renewed_at_ms: ms_from_micro_time(&renew_time)?,
                    duration: Duration::from_secs(
                        u64::try_from(seconds)
                            .map_err(|_| MappingError::NegativeLeaseDuration { seconds })?,
                    ),
                })
            }
            None => None,
        },
        None => None,
    };
    Ok(record)
}

/// The status to write for `after` (the rules' result from `before`, both
/// read from `object`): `epoch`, `inSync` and `frontend` set from `after`,
/// every other field of the current status kept as it is.
///
/// `node` is recorded as `frontend.node` when a lease is acquired (the
/// epoch changed); a renewal keeps the frontend entry and updates only its
/// lease fields; a release removes the entry.
pub fn status_after(
    object: &DynamicObject,
    before: &VolumeRecord,
    after: &VolumeRecord,
    node: &NodeName,
) -> Result<Value, MappingError> {
    let sites = sites(object)?;
    let mut status = raw_status(object)
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let epoch = int64(after.epoch.get())?;
    status.insert("epoch".into(), epoch.clone());
    let in_sync: Vec<Value> = sites
        .iter()
        .filter(|site| replica_id(site).is_ok_and(|r| after.in_sync.contains(&r)))
        .map(|site| Value::String(site.to_string()))
        .collect();
    status.insert("inSync".into(), Value::Array(in_sync));
    match &after.lease {
        None => {
            status.remove("frontend");
        }
        Some(lease) => {
            let acquired = after.epoch != before.epoch;
            let mut frontend = match status.get("frontend").and_then(Value::as_object) {
                Some(existing) if !acquired => existing.clone(),
                _ => {
                    let mut fresh = Map::new();
                    fresh.insert("node".into(), Value::String(node.to_string()));
                    fresh.insert("epoch".into(), int64(lease.epoch.get())?);
                    fresh
                }
            };
            if !acquired && before.lease.as_ref().map(|l| &l.holder) != Some(&lease.holder) {
                // The rules bump the epoch on every acquisition; anything
                // else changing the holder is a bug worth refusing.
                return Err(MappingError::HolderChangedWithoutEpoch {
                    holder: lease.holder.to_string(),
                });
            }
            frontend.insert(
                "leaseHolder".into(),
                Value::String(lease.holder.to_string()),
            );
            frontend.insert("renewTime".into(), micro_time_json(lease.renewed_at_ms)?);
            frontend.insert(
                "leaseDurationSeconds".into(),
                Value::from(lease_duration_seconds(lease.duration)),
            );
            status.insert("frontend".into(), Value::Object(frontend));
        }
    }
    Ok(Value::Object(status))
}

/// Whole seconds, rounded up: the API field holds seconds, and a lease the
/// arbiter records as longer than the holder's own only makes the next
/// frontend wait a little more — never less than the holder self-fences.
pub fn lease_duration_seconds(duration: Duration) -> i32 {
    let whole = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i32::try_from(whole).unwrap_or(i32::MAX)
}

/// Milliseconds since the Unix epoch, rounded up from the MicroTime's
/// microseconds: exact for every time this arbiter wrote (whole
/// milliseconds); for a finer time written by someone else, rounding up
/// never makes a lease look older than it is.
pub fn ms_from_micro_time(time: &MicroTime) -> Result<u64, MappingError> {
    let micros = u64::try_from(time.0.as_microsecond()).map_err(|_| {
        MappingError::RenewTimeBeforeUnixEpoch {
            time: time.0.to_string(),
        }
    })?;
    Ok(micros.div_ceil(1000))
}

/// The MicroTime of `ms` milliseconds since the Unix epoch (exact: a
/// MicroTime holds microseconds).
pub fn micro_time(ms: u64) -> Result<MicroTime, MappingError> {
    let out_of_range = || MappingError::RenewTimeOutOfRange { ms };
    let ms_i64 = i64::try_from(ms).map_err(|_| out_of_range())?;
    Timestamp::from_millisecond(ms_i64)
        .map(MicroTime)
        .map_err(|_| out_of_range())
}

fn micro_time_json(ms: u64) -> Result<Value, MappingError> {
    serde_json::to_value(micro_time(ms)?).map_err(|_| MappingError::RenewTimeOutOfRange { ms })
}

fn int64(value: u64) -> Result<Value, MappingError> {
    i64::try_from(value)
        .map(Value::from)
        .map_err(|_| MappingError::EpochTooLarge { epoch: value })
}

fn raw_status(object: &DynamicObject) -> Option<&Value> {
    object.data.get("status").filter(|s| !s.is_null())
}

fn typed_status(raw: &Value) -> Result<MirroredVolumeStatus, MappingError> {
    serde_json::from_value(raw.clone()).map_err(|e| MappingError::Status {
        reason: e.to_string(),
    })
}

fn sites(object: &DynamicObject) -> Result<Vec<SiteName>, MappingError> {
    let raw = object
        .data
        .pointer("/spec/sites")
        .cloned()
        .ok_or_else(|| MappingError::Sites {
            reason: "missing".into(),
        })?;
    let sites: Vec<SiteName> = serde_json::from_value(raw).map_err(|e| MappingError::Sites {
        reason: e.to_string(),
    })?;
    if sites.len() != 2 || sites[0] == sites[1] {
        return Err(MappingError::NotTwoSites {
            sites: names(&sites),
        });
    }
    Ok(sites)
}

fn replica_id(site: &SiteName) -> Result<ReplicaId, MappingError> {
    ReplicaId::new(site.as_str()).map_err(|e| MappingError::SiteNotReplicaId {
        site: site.to_string(),
        reason: e.to_string(),
    })
}

fn names(sites: &[SiteName]) -> Vec<String> {
    sites.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use twinvol_engine::arbiter::{Change, LeaseId};

    use super::*;

    fn object(status: Option<Value>) -> DynamicObject {
        let mut data = json!({"spec": {"size": "1Gi", "sites": ["room-a", "room-b"]}});
        if let Some(status) = status {
            data["status"] = status;
        }
        serde_json::from_value(json!({
            "apiVersion": "twinvol.io/v1alpha1",
            "kind": "MirroredVolume",
            "metadata": {"name": "vol", "resourceVersion": "42"},
        }))
        .map(|mut o: DynamicObject| {
            o.data = data;
            o
        })
        .expect("a valid object")
    }

    fn r(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("valid")
    }

    fn node() -> NodeName {
        NodeName::new("node-a1").expect("valid")
    }

    #[test]
    fn a_volume_without_status_is_epoch_zero_both_in_sync_no_lease() {
        let record = record_from(&object(None)).expect("maps");
        assert_eq!(record.version, Version("42".into()));
        assert_eq!(record.epoch, Epoch(0));
        assert_eq!(record.in_sync, [r("room-a"), r("room-b")].into());
        assert_eq!(record.lease, None);
        let operator_only = object(Some(json!({"conditions": [], "observedGeneration": 1})));
        assert_eq!(record_from(&operator_only).expect("maps"), record);
        // What the API server stores for that: the CRD's defaults filled in.
        let defaulted = object(Some(json!({"epoch": 0, "inSync": [], "conditions": []})));
        assert_eq!(record_from(&defaulted).expect("maps"), record);
    }

    #[test]
    fn an_emptied_or_foreign_in_sync_set_or_a_half_lease_is_corrupt() {
        assert_eq!(
            record_from(&object(Some(json!({"epoch": 2, "inSync": []})))),
            Err(MappingError::EmptyInSync)
        );
        let lease = json!({"node": "n", "epoch": 0, "leaseHolder": "fe-1",
                           "renewTime": "2026-01-01T00:00:00.000000Z",
                           "leaseDurationSeconds": 10});
        assert_eq!(
            record_from(&object(Some(json!({"inSync": [], "frontend": lease})))),
            Err(MappingError::EmptyInSync)
        );
        assert!(matches!(
            record_from(&object(Some(json!({"inSync": ["room-c"]})))),
            Err(MappingError::InSyncNotASite { .. })
        ));
        assert!(matches!(
            record_from(&object(Some(json!({"epoch": "seven"})))),
            Err(MappingError::Status { .. })
        ));
        assert_eq!(
            record_from(&object(Some(json!({"inSync": ["room-a"], "frontend": {
                "node": "n", "epoch": 1, "leaseHolder": "fe-1", "leaseDurationSeconds": 10
            }})))),
            Err(MappingError::IncompleteLease {
                missing: "renewTime"
            })
        );
    }

    #[test]
    fn the_lease_maps_to_the_frontend_fields_exactly() {
        let before = record_from(&object(None)).expect("maps");
        let after = before
            .apply(
                Change::AcquireLease {
                    holder: FrontendId("fe-1".into()),
                    duration: Duration::from_secs(10),
                    now_ms: 1_764_078_000_123,
                    replaces: None,
                },
                before.version.clone(),
            )
            .expect("allowed");
        let status = status_after(&object(None), &before, &after, &node()).expect("maps");
        assert_eq!(status["epoch"], 1);
        assert_eq!(status["inSync"], json!(["room-a", "room-b"]));
        assert_eq!(
            status["frontend"],
            json!({
                "node": "node-a1",
                "epoch": 1,
                "leaseHolder": "fe-1",
                "renewTime": "2025-11-25T13:40:00.123000Z",
                "leaseDurationSeconds": 10,
            })
        );
        let back = record_from(&object(Some(status))).expect("maps");
        assert_eq!(back, after, "what is written reads back as the same record");
    }

    #[test]
    fn a_renewal_keeps_the_frontend_entry_and_a_release_removes_it() {
        let held = object(Some(json!({
            "epoch": 3,
            "inSync": ["room-b"],
            "frontend": {
                "node": "node-b2", "epoch": 3, "leaseName": "twinvol-vol",
                "leaseHolder": "fe-1", "renewTime": "2026-01-01T00:00:00.000000Z",
                "leaseDurationSeconds": 10,
            },
            "replicas": [{"site": "room-a", "state": "OutOfSync"}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "Serving",
                            "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}],
            "observedGeneration": 4,
        })));
        let before = record_from(&held).expect("maps");
        let renewed = before
            .apply(
                Change::RenewLease {
                    lease: LeaseId {
                        holder: FrontendId("fe-1".into()),
                        epoch: Epoch(3),
                    },
                    now_ms: 1_767_225_605_000,
                },
                before.version.clone(),
            )
            .expect("allowed");
        let status = status_after(&held, &before, &renewed, &node()).expect("maps");
        let original = held.data["status"].clone();
        for kept in ["replicas", "conditions", "observedGeneration"] {
            assert_eq!(status[kept], original[kept], "{kept} is kept");
        }
        assert_eq!(status["inSync"], json!(["room-b"]));
        assert_eq!(
            status["frontend"]["node"], "node-b2",
            "not the caller's node"
        );
        assert_eq!(status["frontend"]["leaseName"], "twinvol-vol");
        assert_eq!(
            status["frontend"]["renewTime"],
            "2026-01-01T00:00:05.000000Z"
        );

        let released = before
            .apply(
                Change::ReleaseLease {
                    lease: LeaseId {
                        holder: FrontendId("fe-1".into()),
                        epoch: Epoch(3),
                    },
                },
                before.version.clone(),
            )
            .expect("allowed");
        let status = status_after(&held, &before, &released, &node()).expect("maps");
        assert!(status.get("frontend").is_none());
        assert_eq!(status["epoch"], 3, "a release keeps the epoch");
        assert_eq!(status["observedGeneration"], 4);
    }

    #[test]
    fn durations_round_up_to_whole_seconds_and_times_round_up_to_milliseconds() {
        assert_eq!(lease_duration_seconds(Duration::from_secs(10)), 10);
        assert_eq!(lease_duration_seconds(Duration::from_millis(1_500)), 2);
        assert_eq!(lease_duration_seconds(Duration::ZERO), 0);
        assert_eq!(lease_duration_seconds(Duration::MAX), i32::MAX);
        let t = micro_time(1_764_078_000_123).expect("in range");
        assert_eq!(ms_from_micro_time(&t), Ok(1_764_078_000_123));
        let finer: MicroTime =
            serde_json::from_value(json!("2025-11-25T13:40:00.123001Z")).expect("parses");
        assert_eq!(ms_from_micro_time(&finer), Ok(1_764_078_000_124));
        let old: MicroTime =
            serde_json::from_value(json!("1969-12-31T23:59:59.000000Z")).expect("parses");
        assert!(ms_from_micro_time(&old).is_err());
    }
}
