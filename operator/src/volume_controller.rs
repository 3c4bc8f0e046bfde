//! The MirroredVolume reconciler: adds the finalizer, gathers the volume,
//! its two Sites (with heartbeats as observed by the Site reconciler), its
//! pods and VolumeAttachments, asks [`decide::volume::decide`], and applies
//! the answer in order — placement, the override, force-deletes, attachment
//! deletes, evictions, annotations, status — with an Event for each change
//! a user cares about. Deletion waits for the node plugins to remove the
//! replicas' data (they drop their entry from `status.replicas`), then
//! removes the finalizer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use twinvol_crds::{MirroredVolume, NodeName, SiteName};

use crate::annotations;
use crate::context::Context;
use crate::decide::VolumeName;
use crate::decide::placement::Candidate;
use crate::decide::site::{self, NodeInput};
use crate::decide::volume::{
    self, Finalize, FrontendInput, MoveReason, ReplicaInput, SiteView, VolumeDecision, VolumeInput,
};
use crate::error::{Error, Result, chain};
use crate::gather;
use crate::observe;
use crate::ops::{self, Evicted};
use crate::status;

/// The controller's name in metrics.
pub const NAME: &str = "mirroredvolume";

fn invalid(mv: &MirroredVolume, reason: impl Into<String>) -> Error {
    Error::Invalid {
        object: format!("MirroredVolume {}", mv.name_any()),
        reason: reason.into(),
    }
}

/// Builds the decision's input from the caches and the operator's
/// observations.
pub fn gather_input(ctx: &Context, mv: &MirroredVolume) -> Result<VolumeInput> {
    let name = VolumeName::new(mv.name_any());
    let sites = ctx.stores.sites.state();
    let nodes = ctx.stores.nodes.state();
    let volumes = ctx.stores.volumes.state();
    let node_sites = gather::node_sites(&nodes, &sites);
    let now = ctx.now();
    let timings = ctx.config.timings;
    let [a, b] = <[SiteName; 2]>::try_from(mv.spec.sites.clone())
        .map_err(|_| invalid(mv, "spec.sites must name exactly two Sites"))?;
    let size_bytes = mv
        .spec
        .size
        .bytes()
        .map_err(|e| invalid(mv, format!("spec.size: {e}")))?;
    let status = gather::status(mv);

    // Bytes and replicas already placed per node, by the other volumes.
    let mut used: HashMap<String, (u64, usize)> = HashMap::new();
    for other in volumes.iter().filter(|v| v.name_any() != name.as_str()) {
        let bytes = other.spec.size.bytes().unwrap_or(0);
        for r in other.status.iter().flat_map(|s| s.replicas.iter()) {
            if let Some(node) = &r.node {
                let e = used.entry(node.to_string()).or_default();
                e.0 = e.0.saturating_add(bytes);
                e.1 += 1;
            }
        }
    }

    let (site_views, frontend_has_lease) = {
        let tracker = ctx.tracker();
        let memory = ctx.memory();
        let views = [&a, &b]
            .iter()
            .map(|site_name| {
                let site = sites.iter().find(|s| s.name_any() == site_name.as_str());
                let site_nodes: Vec<_> = nodes
                    .iter()
                    .filter(|n| node_sites.get(&n.name_any()) == Some(*site_name))
                    .collect();
                let inputs: Vec<NodeInput> = site_nodes
                    .iter()
                    .filter_map(|n| {
                        Some(NodeInput {
                            name: NodeName::new(n.name_any()).ok()?,
                            ready: gather::node_ready(n),
                            heartbeat: tracker.get(&observe::heartbeat_key(&n.name_any())),
                            taints: gather::our_taints(n),
                        })
                    })
                    .collect();
                let report = site::health(&inputs, now, &timings);
                let fenced = site
                    .and_then(|s| s.status.as_ref())
                    .is_some_and(|s| s.fenced);
                SiteView {
                    name: (*site_name).clone(),
                    exists: site.is_some(),
                    fenced,
                    health: report.health,
                    recovered: !fenced && report.recovered(now, &timings),
                    maintenance: site.is_some_and(|s| gather::maintenance(s).is_some()),
                    candidates: inputs
                        .iter()
                        .map(|n| {
                            let (bytes, count) =
                                used.get(n.name.as_str()).copied().unwrap_or_default();
                            Candidate {
                                node: n.name.clone(),
                                ready: n.ready,
                                heartbeating: n
                                    .heartbeat
                                    .is_some_and(|b| !b.stale(now, timings.staleness)),
                                capacity: memory.capacity.get(n.name.as_str()).copied(),
                                used: bytes,
                                replicas: count,
                            }
                        })
                        .collect(),
                }
            })
            .collect::<Vec<_>>();
        (
            views,
            status
                .frontend
                .as_ref()
                .is_some_and(|f| f.lease_holder.is_some()),
        )
    };

    let claims = gather::claims_index(&ctx.stores.claims.state());
    let pvs = gather::pv_index(&ctx.stores.pvs.state());
    let pods = gather::pods_of_volume(&name, &ctx.stores.pods.state(), &claims, &pvs, &node_sites);
    let attachments =
        gather::attachments_of_volume(&name, &ctx.stores.attachments.state(), &pvs, &node_sites);
    let memory = ctx.memory();
    Ok(VolumeInput {
        deleting: mv.metadata.deletion_timestamp.is_some(),
        size_bytes,
        sites: [a, b],
        preferred: mv.spec.preferred_site.clone(),
        failback: mv.spec.failback,
        promote: gather::promote_request(mv),
        move_home: gather::move_home_requested(mv),
        epoch: status.epoch.get(),
        in_sync: gather::in_sync(mv),
        frontend: status.frontend.as_ref().map(|f| FrontendInput {
            node: f.node.clone(),
            site: node_sites.get(f.node.as_str()).cloned(),
            has_lease: frontend_has_lease,
        }),
        replicas: status
            .replicas
            .iter()
            .map(|r| ReplicaInput {
                site: r.site.clone(),
                node: r.node.clone(),
                state: Some(r.state),
                resync_remaining: r.resync_bytes_remaining.map(|b| b.get()),
            })
            .collect(),
        site_views,
        pods,
        attachments,
        last_move_home: memory.last_move_home.get(name.as_str()).copied(),
        eviction_refused: memory.eviction_refused.get(name.as_str()).cloned(),
        now,
        name,
    })
}

/// Reconciles one MirroredVolume.
pub async fn reconcile(mv: Arc<MirroredVolume>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled(NAME);
    if !ctx.synced() {
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    let deleting = mv.metadata.deletion_timestamp.is_some();
    if !deleting {
        ops::finalizer(&ctx, &mv, true).await?;
    }
    let input = gather_input(&ctx, &mv)?;
    let decision = volume::decide(&input, &ctx.config.timings);
    tracing::debug!(volume = %input.name, ?input, ?decision, "decided");
    apply(&ctx, &mv, &input, &decision).await?;
    Ok(Action::requeue(decision.requeue_after))
}

async fn apply(
    ctx: &Context,
    mv: &MirroredVolume,
    input: &VolumeInput,
    d: &VolumeDecision,
) -> Result<()> {
    let name = &input.name;
    let me = mv.object_ref(&());

    if !d.place.is_empty() {
        let placed = ops::place(ctx, name, &d.place).await?;
        for (site, node) in &placed {
            ops::event(
                ctx,
                &me,
                false,
                "Placed",
                "Place",
                format!("the replica on {site} is placed on node {node}"),
            )
            .await;
        }
    }

    let mut cleared: Vec<&'static str> = Vec::new();
    if let Some(p) = &d.promote {
        let (from, to) = ops::promote_volume(ctx, name, p).await?;
        ctx.metrics.promotions.inc();
        tracing::warn!(volume = %name, promote = %p.promote, demote = %p.demote, reason = %p.reason, from, to, audit = true, "override carried out: an out-of-sync replica was promoted");
        ops::event(
            ctx,
            &me,
            true,
            "PromotedOutOfSync",
            "Promote",
            format!(
                "override {}={} (reason: {}): {}'s replica, not in sync, is now the in-sync one and {}'s left the in-sync set; epoch {from} -> {to}; the writes {} missed are lost",
                annotations::PROMOTE, p.promote, p.reason, p.promote, p.demote, p.promote
            ),
        )
        .await;
        ops::clear_annotations(
            ctx,
            name,
            &[annotations::PROMOTE, annotations::PROMOTE_REASON],
        )
        .await?;
        cleared.extend([annotations::PROMOTE, annotations::PROMOTE_REASON]);
    }

    for pod in &d.force_delete {
        if ops::force_delete_pod(ctx, pod).await? {
            tracing::warn!(volume = %name, pod = %format!("{}/{}", pod.namespace, pod.name), "force-deleted a pod on a fenced site");
            ops::event(
                ctx,
                &me,
                true,
                "PodDeleted",
                "FailOver",
                format!("force-deleted pod {}/{} (grace 0) on a fenced site so that it restarts on the other site", pod.namespace, pod.name),
            )
            .await;
        }
    }
    for va in &d.delete_attachments {
        if ops::delete_attachment(ctx, va).await? {
            tracing::warn!(volume = %name, attachment = %va, "deleted a VolumeAttachment to a node of a fenced site");
            ops::event(
                ctx,
                &me,
                false,
                "AttachmentDeleted",
                "FailOver",
                format!("deleted VolumeAttachment {va} to a node of a fenced site"),
            )
            .await;
        }
        // Also when the attachment was gone already: a restart between
        // the two writes must not leave the entry behind.
        if let Some(att) = input.attachments.iter().find(|a| a.name == *va) {
            let unique = format!("kubernetes.io/csi/{}^{name}", annotations::CSI_DRIVER);
            if ops::forget_volume_in_use(ctx, att.node.as_str(), &unique).await? {
                tracing::warn!(volume = %name, node = %att.node, "removed the volume from the fenced node's volumesInUse (so that the attach/detach controller detaches it now)");
            }
        }
    }

    for (pod, why) in &d.evict {
        let target = input
            .pods
            .iter()
            .find(|p| p.pod == *pod)
            .and_then(|p| p.site.as_ref())
            .map(|s| {
                input
                    .sites
                    .iter()
                    .find(|x| *x != s)
                    .cloned()
                    .unwrap_or_else(|| s.clone())
            });
        let target = target.map(|s| s.to_string()).unwrap_or_default();
        let outcome = ops::evict_pod(ctx, pod).await?;
        tracing::info!(volume = %name, pod = %format!("{}/{}", pod.namespace, pod.name), why = ?why, outcome = ?outcome, "eviction");
        match outcome {
            Evicted::Yes => {
                ctx.memory().eviction_refused.remove(name.as_str());
                if *why == MoveReason::MoveHome {
                    ctx.memory()
                        .last_move_home
                        .insert(name.to_string(), ctx.now());
                }
                let reason = match why {
                    MoveReason::Maintenance => "EvictedForMaintenance",
                    MoveReason::MoveHome => "EvictedToMoveHome",
                };
                ops::event(
                    ctx,
                    &me,
                    false,
                    reason,
                    "Move",
                    format!(
                        "evicted pod {}/{} so that it moves to {target}",
                        pod.namespace, pod.name
                    ),
                )
                .await;
            }
            Evicted::Gone => {}
            Evicted::Refused(msg) => {
                ctx.memory()
                    .eviction_refused
                    .insert(name.to_string(), msg.clone());
                ops::event(
                    ctx,
                    &me,
                    true,
                    "EvictionRefused",
                    "Move",
                    format!(
                        "eviction of pod {}/{} refused: {msg}; retrying",
                        pod.namespace, pod.name
                    ),
                )
                .await;
            }
        }
    }

    let rest: Vec<&str> = d
        .clear_annotations
        .iter()
        .copied()
        .filter(|a| !cleared.contains(a) && mv.annotations().contains_key(*a))
        .collect();
    if !rest.is_empty() {
        ops::clear_annotations(ctx, name, &rest).await?;
    }

    // Status: conditions and observedGeneration.
    let old = gather::status(mv);
    let now = Time(Timestamp::now());
    let (conditions, transitions) =
        status::merge(&old.conditions, &d.conditions, mv.metadata.generation, &now);
    if conditions != old.conditions || old.observed_generation != mv.metadata.generation {
        ops::patch_volume_status(
            ctx,
            name,
            json!({"conditions": conditions, "observedGeneration": mv.metadata.generation}),
        )
        .await?;
    }
    for t in transitions {
        let bad = match t.plan.type_ {
            "Ready" => !t.plan.is_true() && t.plan.reason != "NoFrontend",
            "Synced" | "Placed" => !t.plan.is_true(),
            "Degraded" | "Fenced" => t.plan.is_true(),
            _ => false,
        };
        if t.from.is_none() && !bad {
            continue;
        }
        tracing::info!(volume = %name, condition = t.plan.type_, status = %t.plan.status, reason = t.plan.reason, message = %t.plan.message, "volume condition changed");
        ops::event(
            ctx,
            &me,
            bad,
            t.plan.reason,
            t.plan.type_,
            t.plan.message.clone(),
        )
        .await;
    }

    ctx.metrics.volume_state(name.as_str(), Some(d.state));
    for r in &input.replicas {
        ctx.metrics
            .resync_remaining(name.as_str(), r.site.as_str(), r.resync_remaining);
    }
    match &d.finalize {
        Finalize::Release => {
            ops::finalizer(ctx, mv, false).await?;
            ctx.metrics.volume_state(name.as_str(), None);
            ops::event(
                ctx,
                &me,
                false,
                "ReplicasRemoved",
                "Delete",
                "every replica's data was removed: the volume is gone".into(),
            )
            .await;
        }
        Finalize::WaitForNodePlugins(sites) => {
            tracing::debug!(volume = %name, waiting = ?sites, "deletion waits for the node plugins to remove the replicas' data");
        }
        Finalize::Keep => {}
    }
    Ok(())
}

/// Logs a failed reconcile; the caller requeues.
pub fn log_failure(kind: &str, object: &str, error: &Error) {
    tracing::warn!(controller = kind, object, class = error.class(), error = %chain(error), "reconcile failed");
}
