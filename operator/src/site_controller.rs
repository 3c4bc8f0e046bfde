//! The Site reconciler: reads the site's nodes and, fresh from the API
//! server, the node plugins' heartbeat Leases; observes them and the
//! frontend leases of the volumes served there on the operator's own clock;
//! asks [`decide::site::decide`]; then bumps epochs (fencing), writes the
//! Site's status, sets or clears taints, and publishes an Event for each
//! transition. It requeues itself every poll period: staleness is a matter
//! of time passing, which no watch event reports.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use serde_json::json;
use twinvol_crds::{MirroredVolume, NodeName, Site, SiteName};

use crate::annotations;
use crate::context::{Context, FIELD_MANAGER};
use crate::decide::site::{self, Fencing, FrontendAtSite, NodeInput, SiteDecision};
use crate::decide::{Beat, VolumeName};
use crate::error::{Error, Result, chain};
use crate::gather;
use crate::observe;
use crate::ops;
use crate::status;

/// The controller's name in metrics.
pub const NAME: &str = "site";

/// Reads the heartbeat Leases (a quorum read, so a watch that lags cannot
/// make a live node look stale) and observes them; returns each node's
/// beat and records the pools' capacities.
async fn heartbeats(ctx: &Context, nodes: &[String]) -> Result<HashMap<String, Beat>> {
    let api: Api<Lease> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let (k, v) = annotations::HEARTBEAT_LABEL;
    let leases = api
        .list(&ListParams::default().labels(&format!("{k}={v}")))
        .await
        .map_err(Error::kube(
            "listing heartbeat Leases in namespace",
            ctx.config.namespace.clone(),
        ))?;
    let by_name: HashMap<String, &Lease> = leases.items.iter().map(|l| (l.name_any(), l)).collect();
    let now = ctx.now();
    let mut beats = HashMap::new();
    let mut tracker = ctx.tracker();
    let mut memory = ctx.memory();
    for node in nodes {
        let key = observe::heartbeat_key(node);
        match by_name.get(&annotations::heartbeat_lease_name(node)) {
            Some(lease) => {
                let rv = lease.metadata.resource_version.clone().unwrap_or_default();
                beats.insert(node.clone(), tracker.observe(&key, &rv, now));
                if let Some(seconds) = lease
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                {
                    memory
                        .heartbeat_duration
                        .insert(node.clone(), std::time::Duration::from_secs(seconds));
                }
                if let Some(cap) = lease
                    .annotations()
                    .get(annotations::POOL_CAPACITY)
                    .and_then(|c| c.parse::<u64>().ok())
                {
                    memory.capacity.insert(node.clone(), cap);
                }
            }
            None => tracker.retain(&key, |_| false),
        }
    }
    Ok(beats)
}

/// The volumes whose frontend is recorded on one of `nodes`, observed: each
/// alive while its lease or its node's heartbeat changes (observed by
/// [`heartbeats`] just before).
fn frontends_at(
    ctx: &Context,
    site: &SiteName,
    nodes: &[String],
    volumes: &[Arc<MirroredVolume>],
) -> Vec<FrontendAtSite> {
    let now = ctx.now();
    let heartbeat_durations = ctx.memory().heartbeat_duration.clone();
    let mut tracker = ctx.tracker();
    let mut out = Vec::new();
    for mv in volumes {
        let status = gather::status(mv);
        let Some(frontend) = &status.frontend else {
            continue;
        };
        if !nodes.iter().any(|n| n == frontend.node.as_str()) {
            continue;
        }
        let Some(fp) = gather::frontend_fingerprint(&status) else {
            continue;
        };
        let name = VolumeName::new(mv.name_any());
        let lease = gather::frontend_liveness(
            tracker.observe(&observe::frontend_key(name.as_str()), &fp, now),
            tracker.get(&observe::heartbeat_key(frontend.node.as_str())),
        );
        let in_sync = gather::in_sync(mv);
        let survivor_in_sync = mv
            .spec
            .sites
            .iter()
            .filter(|s| *s != site)
            .all(|s| in_sync.contains(s));
        out.push(FrontendAtSite {
            volume: name,
            node: frontend.node.clone(),
            lease,
            lease_duration: gather::frontend_lease_duration(
                &status,
                ctx.config.timings.lease_duration,
                heartbeat_durations.get(frontend.node.as_str()).copied(),
            ),
            survivor_in_sync,
        });
    }
    out
}

/// Reconciles one Site.
pub async fn reconcile(obj: Arc<Site>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciled(NAME);
    if !ctx.synced() {
        return Ok(Action::requeue(std::time::Duration::from_millis(500)));
    }
    let name = SiteName::new(obj.name_any()).map_err(|e| Error::Invalid {
        object: format!("Site {}", obj.name_any()),
        reason: e.to_string(),
    })?;
    let sites = ctx.stores.sites.state();
    let all_nodes = ctx.stores.nodes.state();
    let nodes: Vec<_> = all_nodes
        .iter()
        .filter(|n| gather::site_of(n.labels(), &sites).as_ref() == Some(&name))
        .cloned()
        .collect();
    let node_names: Vec<String> = nodes.iter().map(|n| n.name_any()).collect();
    let beats = heartbeats(&ctx, &node_names).await?;
    let volumes = ctx.stores.volumes.state();
    let frontends = frontends_at(&ctx, &name, &node_names, &volumes);
    let old = obj.status.clone().unwrap_or_default();
    let input = site::SiteInput {
        name: name.clone(),
        nodes: nodes
            .iter()
            .filter_map(|n| {
                Some(NodeInput {
                    name: NodeName::new(n.name_any()).ok()?,
                    ready: gather::node_ready(n),
                    heartbeat: beats.get(&n.name_any()).copied(),
                    taints: gather::our_taints(n),
                })
            })
            .collect(),
        fenced: old.fenced,
        maintenance: gather::maintenance(&obj),
        out_of_service_taint: obj.spec.out_of_service_taint,
        frontends,
        now: ctx.now(),
    };
    let decision = site::decide(&input, &ctx.config.timings);
    if decision.release_leases {
        // First, so that the standbys take over while the frontend leases
        // run out; a failure here delays an attachment, not the fencing.
        if let Err(e) = ops::release_leases_held_on(&ctx, &name, &node_names).await {
            tracing::warn!(site = %name, error = %chain(&e), "could not take over the leader Leases held on the lost site");
        }
    }
    apply(&ctx, &obj, &name, &decision).await?;
    let fenced = sites
        .iter()
        .filter(|s| {
            if s.name_any() == name.as_str() {
                decision.fenced
            } else {
                s.status.as_ref().is_some_and(|st| st.fenced)
            }
        })
        .count();
    ctx.metrics
        .sites_fenced
        .set(i64::try_from(fenced).unwrap_or(i64::MAX));
    Ok(Action::requeue(decision.requeue_after))
}

async fn apply(ctx: &Context, obj: &Site, name: &SiteName, d: &SiteDecision) -> Result<()> {
    // 1. Bump the epochs (fencing); the site is marked fenced only once all
    //    of them are recorded.
    let mut all_bumped = true;
    for volume in &d.fence_volumes {
        match ops::fence_volume(ctx, volume, name).await {
            Ok(b) => {
                ctx.metrics.failovers.inc();
                tracing::warn!(volume = %volume, site = %name, from = b.from, to = b.to, "fenced the frontend of a lost site: epoch bumped");
                if let Some(mv) = ctx
                    .stores
                    .volumes
                    .get(&kube::runtime::reflector::ObjectRef::new(volume.as_str()))
                {
                    let node = b
                        .frontend_node
                        .as_ref()
                        .map(|n| format!(" on {n}"))
                        .unwrap_or_default();
                    ops::event(
                        ctx,
                        &mv.object_ref(&()),
                        true,
                        "FailedOver",
                        "Fence",
                        format!(
                            "site {name} is lost and the frontend{node} let its lease expire: epoch {} -> {}{}; its pods there are removed so that they restart on the other site",
                            b.from,
                            b.to,
                            if b.left_in_sync {
                                format!("; {name}'s replica left the in-sync set")
                            } else {
                                String::new()
                            }
                        ),
                    )
                    .await;
                }
            }
            Err(e) => {
                all_bumped = false;
                tracing::warn!(volume = %volume, site = %name, error = %chain(&e), "could not fence a volume yet");
            }
        }
    }
    let fenced = if all_bumped {
        d.fenced
    } else {
        obj.status.as_ref().is_some_and(|s| s.fenced)
    };

    // 2. The status.
    let old = obj.status.clone().unwrap_or_default();
    let now = Time(Timestamp::now());
    let mut plans = d.conditions.clone();
    if !all_bumped && d.fencing == Fencing::Fence {
        // Not fenced yet: say what is going on.
        for p in &mut plans {
            if p.type_ == "Fenced" {
                p.status = twinvol_crds::ConditionStatus::False;
                p.reason = "Fencing";
            }
        }
    }
    let (conditions, transitions) =
        status::merge(&old.conditions, &plans, obj.metadata.generation, &now);
    let health_changed = transitions.iter().any(|t| {
        t.plan.type_ == "Healthy"
            && t.from.as_ref().map(|f| &f.0) != Some(&t.plan.status.as_str().to_owned())
    });
    let last_transition =
        if fenced != old.fenced || health_changed || old.last_transition_time.is_none() {
            Some(now.clone())
        } else {
            old.last_transition_time.clone()
        };
    let new_status = json!({
        "observedGeneration": obj.metadata.generation,
        "nodesReady": i32::try_from(d.health.nodes_ready).unwrap_or(i32::MAX),
        "pluginsHeartbeating": i32::try_from(d.health.heartbeating).unwrap_or(i32::MAX),
        "fenced": fenced,
        "lastTransitionTime": last_transition,
        "conditions": conditions,
    });
    let old_json = serde_json::to_value(&old).unwrap_or_default();
    if new_status != old_json {
        let api: Api<Site> = Api::all(ctx.client.clone());
        api.patch_status(
            name.as_str(),
            &PatchParams {
                field_manager: Some(FIELD_MANAGER.to_owned()),
                ..PatchParams::default()
            },
            &Patch::Merge(json!({ "status": new_status })),
        )
        .await
        .map_err(Error::kube(
            "patching the status of",
            format!("Site {name}"),
        ))?;
    }
    for t in transitions {
        let warning = site::transition_is_warning(t.plan.type_, t.plan.is_true(), t.plan.reason);
        if t.from.is_none() && !warning {
            continue;
        }
        tracing::info!(site = %name, condition = t.plan.type_, status = %t.plan.status, reason = t.plan.reason, message = %t.plan.message, "site condition changed");
        ops::event(
            ctx,
            &obj.object_ref(&()),
            warning,
            t.plan.reason,
            t.plan.type_,
            t.plan.message.clone(),
        )
        .await;
    }

    // 3. Taints, once the status says what they mean.
    let mut by_node: BTreeMap<&str, Vec<&site::TaintChange>> = BTreeMap::new();
    for change in &d.taints {
        if change.taint != site::OurTaint::Maintenance && !all_bumped && change.add {
            continue;
        }
        by_node
            .entry(change.node.as_str())
            .or_default()
            .push(change);
    }
    for (node, changes) in by_node {
        ops::set_taints(ctx, name, node, &changes).await?;
    }
    if all_bumped {
        Ok(())
    } else {
        Err(Error::Conflict {
            object: format!("Site {name} (fencing its volumes)"),
        })
    }
}
