//! The operator's writes to the API server, one function per kind of
//! change. The arbiter fields (`status.epoch`, `status.inSync`,
//! `status.frontend`) and the placement change only by a compare-and-swap:
//! a replace of the status with the resourceVersion that was read (HTTP 409
//! when anybody wrote in between), built with the arbiter mapping of
//! `twinvol_csi_driver` from a record changed by the engine's rules
//! ([`crate::decide::record`]). Conditions and Site status are merge
//! patches of fields only the operator writes. Every write names the
//! field manager `twinvol-operator`.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::ResourceExt;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, EvictParams, Patch, PatchParams, PostParams,
    Preconditions,
};
use kube::runtime::events::{Event, EventType};
use serde_json::{Value, json};
use twinvol_crds::{MirroredVolume, MirroredVolumeStatus, NodeName, ReplicaState, SiteName};
use twinvol_csi_driver::arbiter::mapping;
use twinvol_engine::protocol::ReplicaId;

use crate::annotations;
use crate::context::{Context, FIELD_MANAGER};
use crate::decide::site::{OurTaint, TaintChange};
use crate::decide::volume::{PodRef, Promotion};
use crate::decide::{VolumeName, record};
use crate::error::{Error, Result};
use crate::gather;
use crate::observe;

fn volumes(ctx: &Context) -> Api<DynamicObject> {
    Api::all_with(
        ctx.client.clone(),
        &ApiResource::erase::<MirroredVolume>(&()),
    )
}

fn post_params() -> PostParams {
    PostParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PostParams::default()
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

fn object(volume: &VolumeName) -> String {
    format!("MirroredVolume {volume}")
}

fn typed_status(obj: &DynamicObject, volume: &VolumeName) -> Result<MirroredVolumeStatus> {
    match obj.data.get("status").filter(|s| !s.is_null()) {
        None => Ok(MirroredVolumeStatus::default()),
        Some(s) => serde_json::from_value(s.clone()).map_err(|e| Error::Invalid {
            object: object(volume),
            reason: format!("status: {e}"),
        }),
    }
}

fn replica(site: &SiteName, volume: &VolumeName) -> Result<ReplicaId> {
    ReplicaId::new(site.as_str()).map_err(|e| Error::Invalid {
        object: object(volume),
        reason: format!("site {site} is no replica id: {e}"),
    })
}

/// What a fencing bump did.
#[derive(Debug, Clone)]
pub struct Bumped {
    pub from: u64,
    pub to: u64,
    pub frontend_node: Option<NodeName>,
    pub left_in_sync: bool,
}

async fn swap_status(
    ctx: &Context,
    volume: &VolumeName,
    mut obj: DynamicObject,
    status: Value,
) -> Result<DynamicObject> {
    let rv = obj.metadata.resource_version.clone();
    obj.data["status"] = status;
    obj.metadata.resource_version = rv;
    volumes(ctx)
        .replace_status(volume.as_str(), &post_params(), &obj)
        .await
        .map_err(Error::kube("writing the status of", object(volume)))
}

/// Fences the frontend of `volume` on the lost site `lost` (one
/// compare-and-swap): only if the lease read now is the one the operator
/// watched expire.
pub async fn fence_volume(ctx: &Context, volume: &VolumeName, lost: &SiteName) -> Result<Bumped> {
    let obj = volumes(ctx)
        .get(volume.as_str())
        .await
        .map_err(Error::kube("reading", object(volume)))?;
    let status = typed_status(&obj, volume)?;
    let fresh = gather::frontend_fingerprint(&status);
    let key = observe::frontend_key(volume.as_str());
    {
        let mut tracker = ctx.tracker();
        if fresh.as_deref() != tracker.value(&key) {
            if let Some(fp) = &fresh {
                tracker.observe(&key, fp, ctx.now());
            }
            return Err(Error::LeaseChanged {
                volume: volume.to_string(),
            });
        }
    }
    let before = mapping::record_from(&obj).map_err(|source| Error::Mapping {
        volume: volume.to_string(),
        source,
    })?;
    let lost_id = replica(lost, volume)?;
    // The fingerprint check above: the lease read now is the one watched
    // expire on the operator's clock, so the acquisition names it.
    let expired = before.lease.clone();
    let after = record::fence(&before, &lost_id, ctx.wall_ms(), expired).map_err(|source| {
        Error::Refused {
            volume: volume.to_string(),
            change: "fence",
            source,
        }
    })?;
    let node = status
        .frontend
        .as_ref()
        .map(|f| f.node.clone())
        .unwrap_or_else(|| NodeName::new("unknown").expect("a valid name"));
    let new_status =
        mapping::status_after(&obj, &before, &after, &node).map_err(|source| Error::Mapping {
            volume: volume.to_string(),
            source,
        })?;
    swap_status(ctx, volume, obj, new_status).await?;
    Ok(Bumped {
        from: before.epoch.get(),
        to: after.epoch.get(),
        frontend_node: status.frontend.map(|f| f.node),
        left_in_sync: before.in_sync.contains(&lost_id) && !after.in_sync.contains(&lost_id),
    })
}

/// Carries out the audited override (one compare-and-swap).
pub async fn promote_volume(
    ctx: &Context,
    volume: &VolumeName,
    promotion: &Promotion,
) -> Result<(u64, u64)> {
    let obj = volumes(ctx)
        .get(volume.as_str())
        .await
        .map_err(Error::kube("reading", object(volume)))?;
    let status = typed_status(&obj, volume)?;
    if promotion.bump_epoch {
        let fresh = gather::frontend_fingerprint(&status);
        let key = observe::frontend_key(volume.as_str());
        let tracker = ctx.tracker();
        let node = status.frontend.as_ref().map(|f| f.node.to_string());
        let heartbeat = node
            .as_ref()
            .and_then(|n| tracker.get(&observe::heartbeat_key(n)));
        let heartbeat_duration = node
            .as_ref()
            .and_then(|n| ctx.memory().heartbeat_duration.get(n).copied());
        let expired = tracker.get(&key).is_some_and(|b| {
            ctx.now()
                .since(gather::frontend_liveness(b, heartbeat).last_change)
                >= gather::frontend_lease_duration(
                    &status,
                    ctx.config.timings.lease_duration,
                    heartbeat_duration,
                ) + ctx.config.timings.margin
        });
        if fresh.as_deref() != tracker.value(&key) || !expired {
            return Err(Error::LeaseChanged {
                volume: volume.to_string(),
            });
        }
    }
    let before = mapping::record_from(&obj).map_err(|source| Error::Mapping {
        volume: volume.to_string(),
        source,
    })?;
    let after = record::promote(
        &before,
        &replica(&promotion.promote, volume)?,
        &replica(&promotion.demote, volume)?,
        promotion.bump_epoch,
        ctx.wall_ms(),
        // Checked above when bumping: the lease read now is the one watched
        // expire.
        before.lease.clone(),
    )
    .map_err(|source| Error::Refused {
        volume: volume.to_string(),
        change: "promote",
        source,
    })?;
    let node = NodeName::new("unknown").expect("a valid name");
    let new_status =
        mapping::status_after(&obj, &before, &after, &node).map_err(|source| Error::Mapping {
            volume: volume.to_string(),
            source,
        })?;
    swap_status(ctx, volume, obj, new_status).await?;
    Ok((before.epoch.get(), after.epoch.get()))
}

/// Records new placements (one compare-and-swap; a replica entry that
/// already has a node is never changed).
pub async fn place(
    ctx: &Context,
    volume: &VolumeName,
    placements: &[(SiteName, NodeName)],
) -> Result<Vec<(SiteName, NodeName)>> {
    let obj = volumes(ctx)
        .get(volume.as_str())
        .await
        .map_err(Error::kube("reading", object(volume)))?;
    let mv: MirroredVolume =
        serde_json::from_value(serde_json::to_value(&obj).map_err(|e| Error::Invalid {
            object: object(volume),
            reason: e.to_string(),
        })?)
        .map_err(|e| Error::Invalid {
            object: object(volume),
            reason: e.to_string(),
        })?;
    let in_sync = gather::in_sync(&mv);
    let mut status = obj
        .data
        .get("status")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let mut replicas: Vec<Value> = status
        .get("replicas")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let mut placed = Vec::new();
    for (site, node) in placements {
        match replicas
            .iter_mut()
            .find(|r| r.get("site").and_then(Value::as_str) == Some(site.as_str()))
        {
            Some(entry) if entry.get("node").is_some_and(|n| !n.is_null()) => continue,
            Some(entry) => {
                entry["node"] = Value::String(node.to_string());
            }
            None => {
                let state = if in_sync.contains(site) {
                    ReplicaState::InSync
                } else {
                    ReplicaState::OutOfSync
                };
                replicas.push(json!({"site": site, "node": node, "state": state}));
            }
        }
        placed.push((site.clone(), node.clone()));
    }
    if placed.is_empty() {
        return Ok(placed);
    }
    status.insert("replicas".into(), Value::Array(replicas));
    swap_status(ctx, volume, obj, Value::Object(status)).await?;
    Ok(placed)
}

/// Merge-patches the operator's own status fields of a MirroredVolume.
pub async fn patch_volume_status(ctx: &Context, volume: &VolumeName, patch: Value) -> Result<()> {
    volumes(ctx)
        .patch_status(
            volume.as_str(),
            &patch_params(),
            &Patch::Merge(json!({ "status": patch })),
        )
        .await
        .map_err(Error::kube("patching the status of", object(volume)))?;
    Ok(())
}

/// Removes the named annotations.
pub async fn clear_annotations(ctx: &Context, volume: &VolumeName, keys: &[&str]) -> Result<()> {
    let nulls: serde_json::Map<String, Value> = keys
        .iter()
        .map(|k| ((*k).to_owned(), Value::Null))
        .collect();
    volumes(ctx)
        .patch(
            volume.as_str(),
            &patch_params(),
            &Patch::Merge(json!({"metadata": {"annotations": nulls}})),
        )
        .await
        .map_err(Error::kube("clearing annotations of", object(volume)))?;
    Ok(())
}

/// Adds (`add`) or removes the operator's finalizer, guarded by the
/// resourceVersion read.
pub async fn finalizer(ctx: &Context, mv: &MirroredVolume, add: bool) -> Result<()> {
    let name = VolumeName::new(kube::ResourceExt::name_any(mv));
    let mut finalizers: Vec<String> = mv.metadata.finalizers.clone().unwrap_or_default();
    let has = finalizers.iter().any(|f| f == annotations::FINALIZER);
    if has == add {
        return Ok(());
    }
    if add {
        finalizers.push(annotations::FINALIZER.to_owned());
    } else {
        finalizers.retain(|f| f != annotations::FINALIZER);
    }
    volumes(ctx)
        .patch(
            name.as_str(),
            &patch_params(),
            &Patch::Merge(json!({"metadata": {
                "finalizers": finalizers,
                "resourceVersion": mv.metadata.resource_version,
            }})),
        )
        .await
        .map_err(Error::kube("updating the finalizers of", object(&name)))?;
    Ok(())
}

fn pod_object(pod: &PodRef) -> String {
    format!("Pod {}/{}", pod.namespace, pod.name)
}

/// Force-deletes a pod (grace 0), only the incarnation named by its uid.
/// Returns false if it was already gone.
pub async fn force_delete_pod(ctx: &Context, pod: &PodRef) -> Result<bool> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace);
    let params = DeleteParams {
        grace_period_seconds: Some(0),
        preconditions: Some(Preconditions {
            uid: Some(pod.uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(&pod.name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(false),
        Err(e) => Err(Error::kube("force-deleting", pod_object(pod))(e)),
    }
}

/// The outcome of an eviction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evicted {
    Yes,
    Gone,
    /// Refused (a PodDisruptionBudget): the API server's message.
    Refused(String),
}

/// Evicts a pod through the Eviction API (which honours
/// PodDisruptionBudgets).
pub async fn evict_pod(ctx: &Context, pod: &PodRef) -> Result<Evicted> {
    let api: Api<Pod> = Api::namespaced(ctx.client.clone(), &pod.namespace);
    let params = EvictParams {
        delete_options: Some(DeleteParams {
            preconditions: Some(Preconditions {
                uid: Some(pod.uid.clone()),
                resource_version: None,
            }),
            ..DeleteParams::default()
        }),
        post_options: post_params(),
    };
    match api.evict(&pod.name, &params).await {
        Ok(_) => Ok(Evicted::Yes),
        Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => Ok(Evicted::Gone),
        Err(kube::Error::Api(s)) if s.code == 429 => Ok(Evicted::Refused(s.message.clone())),
        Err(e) => Err(Error::kube("evicting", pod_object(pod))(e)),
    }
}

/// Deletes a VolumeAttachment.
pub async fn delete_attachment(ctx: &Context, name: &str) -> Result<bool> {
    let api: Api<VolumeAttachment> = Api::all(ctx.client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
        Err(e) => Err(Error::kube("deleting", format!("VolumeAttachment {name}"))(
            e,
        )),
    }
}

/// Deletes the leader Leases (the CSI sidecars') held by pods on `nodes`,
/// the nodes of a site found lost and not fenced yet: a pod there cannot
/// renew its Lease, and its standby on the other site would otherwise wait
/// out the lease (8 s by default) before it attaches the volumes that move.
/// Each delete is conditional on the resourceVersion read, so a Lease
/// renewed or taken over meanwhile stays. A holder that is alive after all
/// fails its next renewal and steps down (the sidecars exit), so two
/// leaders overlap for at most its retry period, and the attach and detach
/// calls they could both make are idempotent. Returns the names deleted.
pub async fn release_leases_held_on(
    ctx: &Context,
    site: &SiteName,
    nodes: &[String],
) -> Result<Vec<String>> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let leases = api
        .list(&kube::api::ListParams::default())
        .await
        .map_err(Error::kube(
            "listing Leases in namespace",
            ctx.config.namespace.clone(),
        ))?;
    let pods = ctx.stores.pods.state();
    let mut released = Vec::new();
    for lease in gather::leases_held_on(&leases.items, &pods, &ctx.config.namespace, nodes) {
        let name = lease.name_any();
        let holder = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.clone())
            .unwrap_or_default();
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: lease.metadata.uid.clone(),
                resource_version: lease.metadata.resource_version.clone(),
            }),
            ..DeleteParams::default()
        };
        match api.delete(&name, &params).await {
            Ok(_) => {
                tracing::warn!(lease = %name, holder = %holder, site = %site, "took over a leader Lease held on a lost site: its standby elsewhere leads now");
                released.push(name);
            }
            // Renewed, taken over or gone meanwhile: leave it.
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => {
                return Err(Error::kube("deleting", format!("Lease {name}"))(e));
            }
        }
    }
    Ok(released)
}

/// Removes `volume` (a unique volume name, `kubernetes.io/csi/<driver>^<handle>`)
/// from a fenced node's `status.volumesInUse`. The kubelet of a node that
/// lost power last reported the volume mounted there; until that entry
/// goes, the attach/detach controller does not detach it (it waits for the
/// unmount, or 6 minutes) and finds the VolumeAttachment deleted only at
/// its next periodic sync (every minute), so the pod recreated on the other
/// site waits that long for its attachment. The node's storage is fenced
/// (its epoch is bumped), so the volume is no longer in use there; a
/// kubelet that returns reports what it really has mounted again. Returns
/// whether the entry was there.
pub async fn forget_volume_in_use(ctx: &Context, node: &str, volume: &str) -> Result<bool> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let Some(current) = api
        .get_opt(node)
        .await
        .map_err(Error::kube("reading", format!("Node {node}")))?
    else {
        return Ok(false);
    };
    let listed = current
        .status
        .as_ref()
        .and_then(|s| s.volumes_in_use.as_ref())
        .is_some_and(|v| v.iter().any(|u| u == volume));
    if !listed {
        return Ok(false);
    }
    let patch = json!({"status": {"$deleteFromPrimitiveList/volumesInUse": [volume]}});
    api.patch_status(node, &PatchParams::default(), &Patch::Strategic(patch))
        .await
        .map_err(Error::kube(
            "patching the status of",
            format!("Node {node}"),
        ))?;
    Ok(true)
}

fn taint(which: OurTaint, site: &str) -> Taint {
    match which {
        OurTaint::Fenced => Taint {
            key: annotations::TAINT_FENCED.into(),
            value: Some(site.to_owned()),
            effect: "NoSchedule".into(),
            time_added: None,
        },
        OurTaint::Maintenance => Taint {
            key: annotations::TAINT_MAINTENANCE.into(),
            value: Some(site.to_owned()),
            effect: "NoSchedule".into(),
            time_added: None,
        },
        OurTaint::OutOfService => Taint {
            key: annotations::TAINT_OUT_OF_SERVICE.into(),
            value: Some(annotations::OUT_OF_SERVICE_VALUE.into()),
            effect: "NoExecute".into(),
            time_added: None,
        },
    }
}

fn is(which: OurTaint, t: &Taint) -> bool {
    match which {
        OurTaint::Fenced => t.key == annotations::TAINT_FENCED,
        OurTaint::Maintenance => t.key == annotations::TAINT_MAINTENANCE,
        OurTaint::OutOfService => {
            t.key == annotations::TAINT_OUT_OF_SERVICE
                && t.value.as_deref() == Some(annotations::OUT_OF_SERVICE_VALUE)
        }
    }
}

/// Applies the taint changes of one node (guarded by its resourceVersion).
pub async fn set_taints(
    ctx: &Context,
    site: &SiteName,
    node: &str,
    changes: &[&TaintChange],
) -> Result<()> {
    let api: Api<Node> = Api::all(ctx.client.clone());
    let current = api
        .get(node)
        .await
        .map_err(Error::kube("reading", format!("Node {node}")))?;
    let mut taints: Vec<Taint> = current
        .spec
        .as_ref()
        .and_then(|s| s.taints.clone())
        .unwrap_or_default();
    for change in changes {
        taints.retain(|t| !is(change.taint, t));
        if change.add {
            taints.push(taint(change.taint, site.as_str()));
        }
    }
    api.patch(
        node,
        &patch_params(),
        &Patch::Merge(json!({
            "metadata": {"resourceVersion": current.metadata.resource_version},
            "spec": {"taints": taints},
        })),
    )
    .await
    .map_err(Error::kube("tainting", format!("Node {node}")))?;
    Ok(())
}

/// Publishes an Event (failures are logged, never fatal: Events are the
/// user's window, not the operator's state).
pub async fn event(
    ctx: &Context,
    regarding: &ObjectReference,
    warning: bool,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, regarding).await {
        tracing::warn!(error = %e, reason, "could not publish an Event");
    }
}
