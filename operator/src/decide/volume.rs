//! A MirroredVolume's decision: placement of its replicas, its conditions,
//! and what to do about its pods and VolumeAttachments.
//!
//! - **After a fail-over** (one of its sites fenced, the frontend no longer
//!   recorded there, the other site's replica in sync): force-delete (grace
//!   0) the volume's pods on the fenced site's nodes, then — once no pod of
//!   the volume is left on a node — delete the volume's VolumeAttachment to
//!   that node, so that the workload's controller recreates the pod and it
//!   attaches on the other site at once.
//! - **Blocked**: the frontend was on the fenced site and the other replica
//!   is not in sync — nothing moves; `Ready` says why and what the override
//!   is. With the override annotations (site to promote and a reason) the
//!   decision asks for the promotion ([`Promotion`]).
//! - **Planned maintenance** of the site serving the volume: its pods are
//!   evicted (honouring PodDisruptionBudgets) once the other site is
//!   healthy and its replica in sync — never before, so the application
//!   sees no I/O error.
//! - **Fail-back**: the frontend runs away from the preferred site while
//!   that site is healthy and its replica in sync — with `Automatic`, the
//!   pods are evicted (at most once per cool-down); with `Manual`, the
//!   `AwayFromHome` condition says so, and the move-home annotation triggers
//!   the same eviction.

use std::collections::BTreeSet;
use std::time::Duration;

use twinvol_crds::{Failback, NodeName, ReplicaState, SiteName, VolumeConditionType};

use super::placement::{self, Candidate};
use super::site::Health;
use super::{CondPlan, Mono, Timings, VolumeName};
use crate::annotations;

/// The override request read from the volume's annotations.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PromoteRequest {
    /// The site to promote, as written (may name no site of the volume).
    pub site: String,
    /// The admin's reason; required.
    pub reason: Option<String>,
}

/// The frontend recorded in the volume's status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendInput {
    pub node: NodeName,
    /// The site of that node, if any Site selects it.
    pub site: Option<SiteName>,
    /// The record holds a lease (it may have expired).
    pub has_lease: bool,
}

/// One replica entry of the status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaInput {
    pub site: SiteName,
    pub node: Option<NodeName>,
    pub state: Option<ReplicaState>,
    pub resync_remaining: Option<u64>,
}

/// One of the volume's two sites, as the volume decision sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteView {
    pub name: SiteName,
    /// A Site object of this name exists.
    pub exists: bool,
    /// `status.fenced` of the Site.
    pub fenced: bool,
    pub health: Health,
    /// Heartbeats proven for the recovery period and not fenced: a volume
    /// may move here.
    pub recovered: bool,
    /// The maintenance annotation is set on the Site.
    pub maintenance: bool,
    /// Its nodes, for placement.
    pub candidates: Vec<Candidate>,
}

/// A pod that uses the volume.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    /// The precondition of every delete: a pod recreated under the same
    /// name (a StatefulSet's) is never removed by mistake.
    pub uid: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInput {
    pub pod: PodRef,
    pub node: Option<NodeName>,
    pub site: Option<SiteName>,
    /// It has a deletionTimestamp.
    pub terminating: bool,
}

/// A VolumeAttachment of the volume's PersistentVolume.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachmentInput {
    pub name: String,
    pub node: NodeName,
    pub site: Option<SiteName>,
}

/// Everything the volume decision looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeInput {
    pub name: VolumeName,
    pub deleting: bool,
    pub size_bytes: u64,
    pub sites: [SiteName; 2],
    pub preferred: Option<SiteName>,
    pub failback: Failback,
    pub promote: Option<PromoteRequest>,
    /// The move-home annotation is set.
    pub move_home: bool,
    pub epoch: u64,
    pub in_sync: BTreeSet<SiteName>,
    pub frontend: Option<FrontendInput>,
    pub replicas: Vec<ReplicaInput>,
    /// The two sites, in any order (a missing Site has `exists: false`).
    pub site_views: Vec<SiteView>,
    pub pods: Vec<PodInput>,
    pub attachments: Vec<AttachmentInput>,
    /// When this operator last evicted the volume's pods to move it home.
    pub last_move_home: Option<Mono>,
    /// The last eviction refused (by a PodDisruptionBudget), for the message.
    pub eviction_refused: Option<String>,
    pub now: Mono,
}

/// The override to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Promotion {
    pub promote: SiteName,
    pub demote: SiteName,
    /// The frontend lease was on the lost site: bump the epoch too.
    pub bump_epoch: bool,
    pub reason: String,
}

/// Why a pod is evicted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum MoveReason {
    Maintenance,
    MoveHome,
}

/// What happens to the finalizer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finalize {
    /// Not being deleted: keep (or add) the finalizer.
    Keep,
    /// Being deleted: the node plugins of these sites have not removed
    /// their replica's data yet (their entry is still in status.replicas).
    WaitForNodePlugins(Vec<SiteName>),
    /// Every replica's data is gone: remove the finalizer.
    Release,
}

/// The volume's state, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum VolumeState {
    Unplaced,
    Synced,
    Degraded,
    Resyncing,
    FailoverBlocked,
    Deleting,
}

impl VolumeState {
    pub const ALL: [Self; 6] = [
        Self::Unplaced,
        Self::Synced,
        Self::Degraded,
        Self::Resyncing,
        Self::FailoverBlocked,
        Self::Deleting,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Unplaced => "Unplaced",
            Self::Synced => "Synced",
            Self::Degraded => "Degraded",
            Self::Resyncing => "Resyncing",
            Self::FailoverBlocked => "FailoverBlocked",
            Self::Deleting => "Deleting",
        }
    }
}

/// What to do about a volume. Every list is sorted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VolumeDecision {
    /// New placements to record.
    pub place: Vec<(SiteName, NodeName)>,
    pub promote: Option<Promotion>,
    pub force_delete: Vec<PodRef>,
    pub delete_attachments: Vec<String>,
    pub evict: Vec<(PodRef, MoveReason)>,
    /// Trigger annotations that have done their job.
    pub clear_annotations: Vec<&'static str>,
    pub conditions: Vec<CondPlan>,
    pub finalize: Finalize,
    pub state: VolumeState,
    pub requeue_after: Duration,
}

impl VolumeInput {
    fn view(&self, site: &SiteName) -> Option<&SiteView> {
        self.site_views.iter().find(|v| v.name == *site)
    }

    fn other(&self, site: &SiteName) -> &SiteName {
        if self.sites[0] == *site {
            &self.sites[1]
        } else {
            &self.sites[0]
        }
    }

    fn fenced(&self, site: &SiteName) -> bool {
        self.view(site).is_some_and(|v| v.fenced)
    }

    fn pods_on(&self, site: &SiteName) -> Vec<&PodInput> {
        let mut pods: Vec<&PodInput> = self
            .pods
            .iter()
            .filter(|p| p.site.as_ref() == Some(site))
            .collect();
        pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        pods
    }

    /// Where the volume is served: the frontend's site, or else the site of
    /// its pods when they all run on one.
    fn serving_site(&self) -> Option<SiteName> {
        if let Some(site) = self.frontend.as_ref().and_then(|f| f.site.clone()) {
            return Some(site);
        }
        let sites: BTreeSet<&SiteName> = self.pods.iter().filter_map(|p| p.site.as_ref()).collect();
        match sites.len() {
            1 => sites.into_iter().next().cloned(),
            _ => None,
        }
    }
}

fn names(sites: &BTreeSet<SiteName>) -> String {
    sites
        .iter()
        .map(SiteName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Decides about one volume.
pub fn decide(input: &VolumeInput, timings: &Timings) -> VolumeDecision {
    let mut d = VolumeDecision {
        place: Vec::new(),
        promote: None,
        force_delete: Vec::new(),
        delete_attachments: Vec::new(),
        evict: Vec::new(),
        clear_annotations: Vec::new(),
        conditions: Vec::new(),
        finalize: Finalize::Keep,
        state: VolumeState::Synced,
        requeue_after: Duration::from_secs(60),
    };

    if input.deleting {
        let mut waiting: Vec<SiteName> = input
            .replicas
            .iter()
            .filter(|r| r.node.is_some())
            .map(|r| r.site.clone())
            .collect();
        waiting.sort();
        waiting.dedup();
        d.finalize = if waiting.is_empty() {
            Finalize::Release
        } else {
            Finalize::WaitForNodePlugins(waiting)
        };
        d.state = VolumeState::Deleting;
        d.requeue_after = timings.poll_period().max(Duration::from_secs(5));
        return d;
    }

    let placed = placement_step(input, &mut d);
    let (ready, blocked) = failover_step(input, timings, &mut d);
    let away = moves_step(input, timings, &mut d);

    let synced = input.sites.iter().all(|s| input.in_sync.contains(s));
    let resyncing: Vec<&ReplicaInput> = {
        let mut r: Vec<&ReplicaInput> = input
            .replicas
            .iter()
            .filter(|r| r.state == Some(ReplicaState::Resyncing))
            .collect();
        r.sort_by(|a, b| a.site.cmp(&b.site));
        r
    };
    let out: BTreeSet<SiteName> = input
        .sites
        .iter()
        .filter(|s| !input.in_sync.contains(*s))
        .cloned()
        .collect();
    let fenced: BTreeSet<SiteName> = input
        .sites
        .iter()
        .filter(|s| input.fenced(s))
        .cloned()
        .collect();

    let t = |c: VolumeConditionType| c.as_str();
    d.conditions.push(ready);
    d.conditions.push(if synced {
        CondPlan::new(
            t(VolumeConditionType::Synced),
            true,
            "BothInSync",
            "both replicas are in the in-sync set",
        )
    } else {
        CondPlan::new(
            t(VolumeConditionType::Synced),
            false,
            "OutOfSync",
            format!("out of the in-sync set: {}", names(&out)),
        )
    });
    d.conditions.push(if synced {
        CondPlan::new(t(VolumeConditionType::Degraded), false, "BothInSync", "")
    } else {
        CondPlan::new(
            t(VolumeConditionType::Degraded),
            true,
            "OneCopy",
            format!(
                "writes reach only {}; {} misses them until it resyncs",
                names(&input.in_sync),
                names(&out)
            ),
        )
    });
    d.conditions.push(if resyncing.is_empty() {
        CondPlan::new(t(VolumeConditionType::Resyncing), false, "NotResyncing", "")
    } else {
        CondPlan::new(
            t(VolumeConditionType::Resyncing),
            true,
            "Resyncing",
            resyncing
                .iter()
                .map(|r| match r.resync_remaining {
                    Some(left) => format!("{}: {left} bytes left", r.site),
                    None => format!("{}: resyncing", r.site),
                })
                .collect::<Vec<_>>()
                .join("; "),
        )
    });
    d.conditions.push(if fenced.is_empty() {
        CondPlan::new(
            t(VolumeConditionType::Fenced),
            false,
            "NotFenced",
            "no replica's site is fenced",
        )
    } else {
        CondPlan::new(
            t(VolumeConditionType::Fenced),
            true,
            "SiteFenced",
            format!("a replica's site is fenced (lost): {}", names(&fenced)),
        )
    });
    let placed_ok = placed.is_true();
    d.conditions.push(placed);
    d.conditions.push(away);
    d.conditions.sort_by(|a, b| a.type_.cmp(b.type_));

    d.state = if !placed_ok {
        d.requeue_after = d.requeue_after.min(Duration::from_secs(10));
        VolumeState::Unplaced
    } else if blocked {
        VolumeState::FailoverBlocked
    } else if !resyncing.is_empty() {
        VolumeState::Resyncing
    } else if !synced {
        VolumeState::Degraded
    } else {
        VolumeState::Synced
    };
    d.force_delete.sort();
    d.delete_attachments.sort();
    d.evict.sort();
    d.clear_annotations.sort();
    d.clear_annotations.dedup();
    d
}

/// Places the replicas not placed yet; returns the `Placed` condition.
fn placement_step(input: &VolumeInput, d: &mut VolumeDecision) -> CondPlan {
    let placed_type = VolumeConditionType::Placed.as_str();
    let mut problems = Vec::new();
    let mut reason = "Placed";
    let mut where_: Vec<String> = Vec::new();
    for site in &input.sites {
        if let Some(node) = input
            .replicas
            .iter()
            .find(|r| r.site == *site)
            .and_then(|r| r.node.clone())
        {
            where_.push(format!("{site} on {node}"));
            continue;
        }
        let view = input.view(site);
        let exists = view.is_some_and(|v| v.exists);
        let candidates = view.map(|v| v.candidates.as_slice()).unwrap_or(&[]);
        match placement::place(site, exists, candidates, input.size_bytes) {
            Ok(node) => {
                where_.push(format!("{site} on {node}"));
                d.place.push((site.clone(), node));
            }
            Err(impossible) => {
                reason = impossible.reason;
                problems.push(impossible.message);
            }
        }
    }
    d.place.sort();
    if problems.is_empty() {
        CondPlan::new(
            placed_type,
            true,
            "Placed",
            format!("replicas: {}", where_.join(", ")),
        )
    } else {
        CondPlan::new(placed_type, false, reason, problems.join("; "))
    }
}

/// Fail-over clean-up and the override; returns the `Ready` condition and
/// whether the volume is blocked.
fn failover_step(
    input: &VolumeInput,
    timings: &Timings,
    d: &mut VolumeDecision,
) -> (CondPlan, bool) {
    let ready_type = VolumeConditionType::Ready.as_str();
    let frontend_site = input.frontend.as_ref().and_then(|f| f.site.clone());
    let mut ready = match &input.frontend {
        Some(f) => CondPlan::new(
            ready_type,
            true,
            "Serving",
            format!(
                "served by the frontend on {}{} at epoch {}",
                f.node,
                f.site
                    .as_ref()
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default(),
                input.epoch
            ),
        ),
        None => CondPlan::new(
            ready_type,
            false,
            "NoFrontend",
            "no frontend serves the volume (no pod uses it yet)",
        ),
    };
    if let Some(site) = &frontend_site
        && !input.fenced(site)
        && input.view(site).is_some_and(|v| v.health == Health::Lost)
    {
        ready = CondPlan::new(
            ready_type,
            false,
            "SiteLost",
            format!(
                "the frontend's site {site} is lost: waiting for its lease to expire before failing over"
            ),
        );
    }

    let mut blocked = false;
    let mut promote_note: Option<String> = None;
    for lost in &input.sites {
        if !input.fenced(lost) {
            continue;
        }
        let survivor = input.other(lost);
        if input.fenced(survivor) {
            ready = CondPlan::new(
                ready_type,
                false,
                "BothSitesFenced",
                "both sites are fenced: the volume waits for one to return",
            );
            continue;
        }
        let frontend_there = frontend_site.as_ref() == Some(lost);
        let survivor_in_sync = input.in_sync.contains(survivor);
        if survivor_in_sync && !frontend_there {
            // Failed over (or idle): clear the lost site of the volume's pods,
            // then of its attachments.
            let pods = input.pods_on(lost);
            d.force_delete.extend(pods.iter().map(|p| p.pod.clone()));
            let busy_nodes: BTreeSet<&NodeName> =
                pods.iter().filter_map(|p| p.node.as_ref()).collect();
            d.delete_attachments.extend(
                input
                    .attachments
                    .iter()
                    .filter(|a| a.site.as_ref() == Some(lost) && !busy_nodes.contains(&a.node))
                    .map(|a| a.name.clone()),
            );
            if !pods.is_empty() || !d.delete_attachments.is_empty() {
                d.requeue_after = d.requeue_after.min(timings.poll_period());
                ready = CondPlan::new(
                    ready_type,
                    false,
                    "FailingOver",
                    format!("{lost} is fenced: moving the volume's pods to {survivor}"),
                );
            }
            continue;
        }
        if survivor_in_sync {
            // The frontend is still recorded on the fenced site although the
            // survivor is in sync: the Site reconciler bumps it next.
            ready = CondPlan::new(
                ready_type,
                false,
                "FailingOver",
                format!("{lost} is fenced: fencing the volume's frontend there"),
            );
            d.requeue_after = d.requeue_after.min(timings.poll_period());
            continue;
        }
        // The survivor is not in sync: only the override moves the volume.
        match &input.promote {
            Some(req) if req.site == survivor.as_str() => match &req.reason {
                Some(reason) if !reason.trim().is_empty() => {
                    d.promote = Some(Promotion {
                        promote: survivor.clone(),
                        demote: lost.clone(),
                        bump_epoch: frontend_there
                            && input.frontend.as_ref().is_some_and(|f| f.has_lease),
                        reason: reason.clone(),
                    });
                    d.requeue_after = d.requeue_after.min(timings.poll_period());
                    promote_note = Some(format!(
                        "promoting {survivor} as asked ({reason}); the writes it missed are lost"
                    ));
                }
                _ => {
                    promote_note = Some(format!(
                        "the override names {survivor} but has no reason: set {} too",
                        annotations::PROMOTE_REASON
                    ));
                }
            },
            Some(req) => {
                promote_note = Some(format!(
                    "the override names {:?}, which is not the surviving site {survivor}: ignored",
                    req.site
                ));
            }
            None => {}
        }
        if d.promote.is_none() {
            blocked = true;
        }
        ready = CondPlan::new(
            ready_type,
            false,
            if d.promote.is_some() {
                "Promoting"
            } else {
                "FailoverBlocked"
            },
            format!(
                "{lost} is lost and {survivor}'s replica is not in sync: the volume does not fail over by itself, it waits for {lost} to return (its replica holds the only complete copy). To accept losing the writes {survivor} misses: kubectl annotate mirroredvolume {} {}={survivor} {}='<why>'{}",
                input.name,
                annotations::PROMOTE,
                annotations::PROMOTE_REASON,
                promote_note
                    .as_ref()
                    .map(|n| format!(". {n}"))
                    .unwrap_or_default()
            ),
        );
    }
    // An override that has done its job (or is moot: nothing is lost) is
    // cleared so that it cannot act again later without being asked.
    if let Some(req) = &input.promote
        && d.promote.is_none()
        && input.sites.iter().any(|s| s.as_str() == req.site)
        && input.in_sync.iter().any(|s| s.as_str() == req.site)
    {
        d.clear_annotations.push(annotations::PROMOTE);
        d.clear_annotations.push(annotations::PROMOTE_REASON);
    }
    (ready, blocked)
}

/// Maintenance drains and fail-back; returns the `AwayFromHome` condition.
fn moves_step(input: &VolumeInput, timings: &Timings, d: &mut VolumeDecision) -> CondPlan {
    let away_type = VolumeConditionType::AwayFromHome.as_str();
    let at_home = |msg: &str| CondPlan::new(away_type, false, "AtHome", msg.to_owned());
    let Some(serving) = input.serving_site() else {
        return at_home("no frontend serves the volume");
    };
    if input.fenced(&serving) {
        // Fail-over territory, handled above.
        return at_home("");
    }
    let other = input.other(&serving).clone();
    let other_view = input.view(&other);
    let other_ready = other_view.is_some_and(|v| v.recovered && !v.fenced && !v.maintenance);
    let other_in_sync = input.in_sync.contains(&other);
    let can_move = other_ready && other_in_sync;
    let why_not = || {
        if !other_in_sync {
            format!("{other}'s replica is not in sync yet")
        } else if other_view.is_some_and(|v| v.maintenance) {
            format!("{other} is under maintenance")
        } else {
            format!("{other} is not healthy (for the recovery period) yet")
        }
    };
    let refused = input
        .eviction_refused
        .as_ref()
        .map(|e| format!("; the last eviction was refused: {e}"))
        .unwrap_or_default();
    let pods: Vec<PodRef> = input
        .pods_on(&serving)
        .iter()
        .filter(|p| !p.terminating)
        .map(|p| p.pod.clone())
        .collect();

    if input.view(&serving).is_some_and(|v| v.maintenance) {
        if can_move {
            d.evict
                .extend(pods.iter().map(|p| (p.clone(), MoveReason::Maintenance)));
            d.requeue_after = d
                .requeue_after
                .min(timings.poll_period().max(Duration::from_secs(2)));
        }
        let message = if can_move {
            format!("{serving} is under maintenance: moving to {other}{refused}")
        } else {
            format!(
                "{serving} is under maintenance, but the volume cannot move: {}",
                why_not()
            )
        };
        let is_home = input.preferred.as_ref() == Some(&serving);
        return CondPlan::new(
            away_type,
            !is_home,
            if can_move { "Draining" } else { "DrainWaiting" },
            message,
        );
    }

    let Some(home) = &input.preferred else {
        return CondPlan::new(away_type, false, "NoPreferredSite", "");
    };
    if *home == serving {
        return at_home(&format!("served on its preferred site {home}"));
    }
    // Away from home: `other` is home.
    if !can_move {
        return CondPlan::new(
            away_type,
            true,
            "HomeNotReady",
            format!(
                "served on {serving}, away from its preferred site {home}: {}",
                why_not()
            ),
        );
    }
    match input.failback {
        Failback::Automatic => {
            let cooled = input
                .last_move_home
                .is_none_or(|t| input.now.since(t) >= timings.move_home_cooldown);
            if cooled {
                d.evict
                    .extend(pods.iter().map(|p| (p.clone(), MoveReason::MoveHome)));
                d.requeue_after = d.requeue_after.min(Duration::from_secs(2));
                CondPlan::new(
                    away_type,
                    true,
                    "MovingHome",
                    format!("served on {serving}: moving home to {home}{refused}"),
                )
            } else {
                CondPlan::new(
                    away_type,
                    true,
                    "MoveHomeCoolingDown",
                    format!(
                        "served on {serving}, away from {home}: a move home was tried recently; trying again after the cool-down"
                    ),
                )
            }
        }
        Failback::Manual => {
            if input.move_home {
                d.evict
                    .extend(pods.iter().map(|p| (p.clone(), MoveReason::MoveHome)));
                d.clear_annotations.push(annotations::MOVE_HOME);
                d.requeue_after = d.requeue_after.min(Duration::from_secs(2));
                CondPlan::new(
                    away_type,
                    true,
                    "MovingHome",
                    format!("served on {serving}: moving home to {home} as asked{refused}"),
                )
            } else {
                CondPlan::new(
                    away_type,
                    true,
                    "ManualFailback",
                    format!(
                        "runs away from home: served on {serving}, while its preferred site {home} is back and in sync; failback is Manual: kubectl annotate mirroredvolume {} {}=true to move it home",
                        input.name,
                        annotations::MOVE_HOME
                    ),
                )
            }
        }
    }
}

#[cfg(test)]
#[path = "volume_tests.rs"]
mod tests;
