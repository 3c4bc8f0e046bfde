//! A Site's decision: its health from its nodes and their node plugins'
//! heartbeats, whether to fence it (and which volumes' epochs to bump
//! first), whether to unfence it, the taints its nodes should carry, and
//! the progress of a planned maintenance.
//!
//! Fencing a lost site, in order:
//! 1. every heartbeat of the site stale for longer than the threshold (the
//!    site is *lost*);
//! 2. every frontend lease there unchanged, on the operator's clock, for
//!    its duration plus the margin (the frontends have self-fenced);
//! 3. bump the epoch of every volume served there whose replica on the
//!    other site is in sync ([`SiteDecision::fence_volumes`]); a volume
//!    whose other replica is not in sync is left alone and reported
//!    ([`SiteDecision::blocked`]) — only the audited override moves it;
//! 4. mark the site fenced (the reconciler writes `status.fenced` only
//!    once every bump of step 3 succeeded).
//!
//! The volume decisions then remove the pods and VolumeAttachments of the
//! fenced site. A fenced site is unfenced once its heartbeats have been seen
//! changing steadily for the recovery period.

use std::time::Duration;

use twinvol_crds::{NodeName, SiteConditionType, SiteName};

use super::{Beat, CondPlan, Mono, Timings, VolumeName};

/// One node matched by the Site's selector.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInput {
    pub name: NodeName,
    /// The Node's Ready condition is True.
    pub ready: bool,
    /// The node plugin's heartbeat Lease as observed; `None` when there is
    /// none: no node plugin runs there (yet). A node plugin that died
    /// leaves its Lease behind, so a dead site is never mistaken for one
    /// not yet installed — and a site with no node plugin at all is never
    /// fenced.
    pub heartbeat: Option<Beat>,
    /// Which of the operator's taints the node carries now.
    pub taints: OurTaints,
}

/// The taints the operator manages on a Site's nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OurTaints {
    /// `twinvol.io/fenced:NoSchedule`: the site is fenced.
    pub fenced: bool,
    /// `twinvol.io/maintenance:NoSchedule`: the site is being drained.
    pub maintenance: bool,
    /// `node.kubernetes.io/out-of-service=twinvol:NoExecute`: fenced, and
    /// the Site asks for it (`spec.outOfServiceTaint`).
    pub out_of_service: bool,
}

/// One of [`OurTaints`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum OurTaint {
    Fenced,
    Maintenance,
    OutOfService,
}

/// Add or remove one taint on one node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct TaintChange {
    pub node: NodeName,
    pub taint: OurTaint,
    pub add: bool,
}

/// A volume whose frontend record names a node of this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendAtSite {
    pub volume: VolumeName,
    pub node: NodeName,
    /// Observations of the frontend's lease (holder, renewal, epoch).
    pub lease: Beat,
    pub lease_duration: Duration,
    /// The volume's replica on the other site is in the in-sync set.
    pub survivor_in_sync: bool,
}

impl FrontendAtSite {
    /// When the lease counts as expired on the operator's clock: its
    /// duration plus the margin after the last change the operator saw.
    pub fn expires_at(&self, margin: Duration) -> Mono {
        self.lease
            .last_change
            .plus(self.lease_duration)
            .plus(margin)
    }
}

/// Everything the Site decision looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteInput {
    pub name: SiteName,
    pub nodes: Vec<NodeInput>,
    /// `status.fenced` as last written.
    pub fenced: bool,
    /// The maintenance annotation's value (the admin's reason), if set.
    pub maintenance: Option<String>,
    /// `spec.outOfServiceTaint`.
    pub out_of_service_taint: bool,
    pub frontends: Vec<FrontendAtSite>,
    pub now: Mono,
}

/// A site's health class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    /// No node matches the selector.
    NoNodes,
    /// No node of the site has a node plugin heartbeat Lease.
    NoPlugins,
    /// Every node plugin heartbeats.
    Healthy,
    /// Some node plugins heartbeat, some are stale.
    Partial,
    /// No node plugin heartbeats: the site is lost.
    Lost,
}

/// The site's health with its counts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthReport {
    pub health: Health,
    pub nodes: usize,
    pub nodes_ready: usize,
    pub heartbeating: usize,
    /// Nodes whose heartbeat is stale, by name.
    pub stale: Vec<NodeName>,
    /// The earliest start of a proven run of heartbeats among the nodes
    /// heartbeating now.
    pub proven_since: Option<Mono>,
}

impl HealthReport {
    /// Heartbeats proven for at least the recovery period: a site a volume
    /// may move to, or that may be unfenced.
    pub fn recovered(&self, now: Mono, timings: &Timings) -> bool {
        self.health != Health::Lost
            && self.health != Health::NoNodes
            && self.health != Health::NoPlugins
            && self
                .proven_since
                .is_some_and(|s| now.since(s) >= timings.recovery)
    }
}

/// The health of a site from its nodes.
pub fn health(nodes: &[NodeInput], now: Mono, timings: &Timings) -> HealthReport {
    let mut stale = Vec::new();
    let mut proven_since: Option<Mono> = None;
    let mut heartbeating = 0;
    let mut with_plugin = 0;
    for node in nodes {
        let Some(beat) = node.heartbeat else {
            stale.push(node.name.clone());
            continue;
        };
        with_plugin += 1;
        if beat.stale(now, timings.staleness) {
            stale.push(node.name.clone());
        } else {
            heartbeating += 1;
            if let Some(since) = beat.proven_since {
                proven_since = Some(proven_since.map_or(since, |p| p.min(since)));
            }
        }
    }
    stale.sort();
    let health = if nodes.is_empty() {
        Health::NoNodes
    } else if with_plugin == 0 {
        Health::NoPlugins
    } else if heartbeating == 0 {
        Health::Lost
    } else if heartbeating < nodes.len() {
        Health::Partial
    } else {
        Health::Healthy
    };
    HealthReport {
        health,
        nodes: nodes.len(),
        nodes_ready: nodes.iter().filter(|n| n.ready).count(),
        heartbeating,
        stale,
        proven_since,
    }
}

/// Where fencing stands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fencing {
    /// Not lost, not fenced.
    NotFenced,
    /// Lost; these frontend leases have not expired (plus margin) yet.
    WaitingForLeases(Vec<(VolumeName, Duration)>),
    /// Lost and every lease expired: bump, then mark fenced.
    Fence,
    /// Fenced and still lost (or heartbeats not yet proven long enough).
    Fenced,
    /// Fenced; heartbeats seen again, not yet for the recovery period.
    Recovering { left: Duration },
    /// Fenced and recovered: unfence.
    Unfence,
}

/// What to do about a Site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SiteDecision {
    pub health: HealthReport,
    pub fencing: Fencing,
    /// The `status.fenced` to write (after every bump of `fence_volumes`).
    pub fenced: bool,
    /// Bump the epoch of these volumes (their frontend was here, its lease
    /// expired, their other replica is in sync), sorted.
    pub fence_volumes: Vec<VolumeName>,
    /// Volumes served here that do not fail over by themselves: their
    /// other replica is not in sync. Sorted.
    pub blocked: Vec<VolumeName>,
    /// Take over the leader Leases that pods on this site hold (the CSI
    /// sidecars'): the site is lost and not fenced yet, so its pods cannot
    /// renew them, and their standbys on the other site should not wait
    /// out the lease before attaching the volumes that move.
    pub release_leases: bool,
    /// Taints to add or remove, sorted.
    pub taints: Vec<TaintChange>,
    pub conditions: Vec<CondPlan>,
    pub requeue_after: Duration,
}

/// Decides about one Site.
pub fn decide(input: &SiteInput, timings: &Timings) -> SiteDecision {
    let now = input.now;
    let report = health(&input.nodes, now, timings);
    let lost = report.health == Health::Lost;

    let mut frontends: Vec<&FrontendAtSite> = input.frontends.iter().collect();
    frontends.sort_by(|a, b| a.volume.cmp(&b.volume));
    let waiting: Vec<(VolumeName, Duration)> = frontends
        .iter()
        .filter(|f| now < f.expires_at(timings.margin))
        .map(|f| (f.volume.clone(), f.expires_at(timings.margin).since(now)))
        .collect();
    let expired = |f: &&&FrontendAtSite| now >= f.expires_at(timings.margin);

    let (fencing, fenced) = if !input.fenced {
        if !lost {
            (Fencing::NotFenced, false)
        } else if !waiting.is_empty() {
            (Fencing::WaitingForLeases(waiting.clone()), false)
        } else {
            (Fencing::Fence, true)
        }
    } else if report.recovered(now, timings) {
        (Fencing::Unfence, false)
    } else if !lost && report.proven_since.is_some() {
        let since = report.proven_since.unwrap_or(now);
        let left = timings.recovery.saturating_sub(now.since(since));
        (Fencing::Recovering { left }, true)
    } else {
        (Fencing::Fenced, true)
    };

    // Bumps happen only while the site is lost and the leases expired: on
    // fencing, and for a frontend that turned up on a fenced site and then
    // went quiet again.
    let may_bump = lost && matches!(fencing, Fencing::Fence | Fencing::Fenced);
    let (fence_volumes, blocked): (Vec<VolumeName>, Vec<VolumeName>) = if may_bump {
        let expired: Vec<&&FrontendAtSite> = frontends.iter().filter(expired).collect();
        (
            expired
                .iter()
                .filter(|f| f.survivor_in_sync)
                .map(|f| f.volume.clone())
                .collect(),
            expired
                .iter()
                .filter(|f| !f.survivor_in_sync)
                .map(|f| f.volume.clone())
                .collect(),
        )
    } else {
        (Vec::new(), Vec::new())
    };

    let taints = taint_changes(input, fenced);
    let conditions = conditions(input, &report, &fencing, &fence_volumes, &blocked);
    let requeue_after = match &fencing {
        Fencing::WaitingForLeases(w) => w
            .iter()
            .map(|(_, left)| *left)
            .min()
            .unwrap_or(timings.poll_period())
            .min(timings.poll_period()),
        _ => timings.poll_period(),
    };
    SiteDecision {
        health: report,
        fencing,
        fenced,
        fence_volumes,
        blocked,
        release_leases: lost && !input.fenced,
        taints,
        conditions,
        requeue_after,
    }
}

fn taint_changes(input: &SiteInput, fenced: bool) -> Vec<TaintChange> {
    let want = OurTaints {
        fenced,
        maintenance: input.maintenance.is_some(),
        out_of_service: fenced && input.out_of_service_taint,
    };
    let mut changes = Vec::new();
    for node in &input.nodes {
        for (taint, wanted, present) in [
            (OurTaint::Fenced, want.fenced, node.taints.fenced),
            (
                OurTaint::Maintenance,
                want.maintenance,
                node.taints.maintenance,
            ),
            (
                OurTaint::OutOfService,
                want.out_of_service,
                node.taints.out_of_service,
            ),
        ] {
            if wanted != present {
                changes.push(TaintChange {
                    node: node.name.clone(),
                    taint,
                    add: wanted,
                });
            }
        }
    }
    changes.sort();
    changes
}

fn list(volumes: &[VolumeName]) -> String {
    volumes
        .iter()
        .map(VolumeName::as_str)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Whether a Site condition's transition is reported as a Warning Event
/// (the others are Normal): the site unhealthy — except while no node
/// plugin has ever run there, which is an install in progress (the
/// DaemonSet's pods starting), not an alarm; the condition still says
/// `NoNodePlugins` — or fenced.
pub fn transition_is_warning(type_: &str, is_true: bool, reason: &str) -> bool {
    (type_ == SiteConditionType::Healthy.as_str() && !is_true && reason != "NoNodePlugins")
        || (type_ == SiteConditionType::Fenced.as_str() && is_true)
}

fn conditions(
    input: &SiteInput,
    report: &HealthReport,
    fencing: &Fencing,
    fence_volumes: &[VolumeName],
    blocked: &[VolumeName],
) -> Vec<CondPlan> {
    let healthy = SiteConditionType::Healthy.as_str();
    let counts = format!(
        "{} of {} node plugins heartbeat; {} of {} nodes Ready",
        report.heartbeating, report.nodes, report.nodes_ready, report.nodes
    );
    let health = match report.health {
        Health::NoNodes => CondPlan::new(
            healthy,
            false,
            "NoNodes",
            "no node matches spec.nodeSelector",
        ),
        Health::NoPlugins => CondPlan::new(
            healthy,
            false,
            "NoNodePlugins",
            format!("no node plugin runs on the site's nodes yet ({counts})"),
        ),
        Health::Healthy => CondPlan::new(healthy, true, "Heartbeating", counts),
        Health::Partial => CondPlan::new(
            healthy,
            true,
            "PartlyHeartbeating",
            format!(
                "{counts}; stale: {}",
                report
                    .stale
                    .iter()
                    .map(NodeName::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Health::Lost => CondPlan::new(
            healthy,
            false,
            "HeartbeatsStale",
            format!("no node plugin of the site heartbeats ({counts}): the site is lost"),
        ),
    };

    let fenced_type = SiteConditionType::Fenced.as_str();
    let waiting_note = if blocked.is_empty() {
        String::new()
    } else {
        format!(
            "; not failed over (their replica on the other site is not in sync; see each volume): {}",
            list(blocked)
        )
    };
    let fenced = match fencing {
        Fencing::NotFenced => {
            CondPlan::new(fenced_type, false, "NotFenced", "the site is not fenced")
        }
        Fencing::WaitingForLeases(w) => CondPlan::new(
            fenced_type,
            false,
            "WaitingForLeases",
            format!(
                "the site is lost; waiting for the frontend leases there to expire before bumping epochs: {}",
                w.iter()
                    .map(|(v, left)| format!("{v} ({:.1}s left)", left.as_secs_f64()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ),
        Fencing::Fence | Fencing::Fenced => CondPlan::new(
            fenced_type,
            true,
            "SiteLost",
            format!(
                "the site was lost and its frontend leases expired; epochs bumped for the volumes served here{}{}",
                if fence_volumes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", list(fence_volumes))
                },
                waiting_note
            ),
        ),
        Fencing::Recovering { left } => CondPlan::new(
            fenced_type,
            true,
            "Recovering",
            format!(
                "node plugins heartbeat again; unfencing once they have for the recovery period ({:.1}s left)",
                left.as_secs_f64()
            ),
        ),
        Fencing::Unfence => CondPlan::new(
            fenced_type,
            false,
            "Recovered",
            "the site's node plugins heartbeat again: unfenced; its replicas resync",
        ),
    };

    let maintenance_type = SiteConditionType::Maintenance.as_str();
    let maintenance = match &input.maintenance {
        None => CondPlan::new(maintenance_type, false, "NotRequested", ""),
        Some(reason) => {
            let mut here: Vec<VolumeName> =
                input.frontends.iter().map(|f| f.volume.clone()).collect();
            here.sort();
            let why = if reason.is_empty() {
                String::new()
            } else {
                format!(" ({reason})")
            };
            if here.is_empty() {
                CondPlan::new(
                    maintenance_type,
                    true,
                    "Drained",
                    format!(
                        "maintenance requested{why}: no volume is served here any more; the site may be powered off"
                    ),
                )
            } else {
                CondPlan::new(
                    maintenance_type,
                    true,
                    "Draining",
                    format!(
                        "maintenance requested{why}: {} volume(s) still served here: {}",
                        here.len(),
                        list(&here)
                    ),
                )
            }
        }
    };
    vec![health, fenced, maintenance]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::testkit::*;

    #[test]
    fn only_a_lost_or_fenced_site_warns_not_one_whose_plugins_are_starting() {
        assert!(transition_is_warning("Healthy", false, "HeartbeatsStale"));
        assert!(transition_is_warning("Healthy", false, "NoNodes"));
        assert!(!transition_is_warning("Healthy", false, "NoNodePlugins"));
        assert!(!transition_is_warning("Healthy", true, "Heartbeating"));
        assert!(transition_is_warning("Fenced", true, "Fenced"));
        assert!(!transition_is_warning("Fenced", false, "NotFenced"));
    }

    fn site(nodes: Vec<NodeInput>, frontends: Vec<FrontendAtSite>, now_ms: u64) -> SiteInput {
        SiteInput {
            name: site_name("room-a"),
            nodes,
            fenced: false,
            maintenance: None,
            out_of_service_taint: false,
            frontends,
            now: Mono::from_millis(now_ms),
        }
    }

    #[test]
    fn a_site_with_fresh_heartbeats_is_healthy_and_not_fenced() {
        let input = site(
            vec![node("a1", Some(beat(9_000, Some(1_000))))],
            vec![],
            10_000,
        );
        let d = decide(&input, &timings());
        assert_eq!(d.health.health, Health::Healthy);
        assert_eq!(d.fencing, Fencing::NotFenced);
        assert!(!d.fenced && d.fence_volumes.is_empty() && d.taints.is_empty());
    }

    #[test]
    fn one_stale_node_is_partial_not_lost() {
        let input = site(
            vec![
                node("a1", Some(beat(9_000, Some(1_000)))),
                node("a2", Some(beat(1_000, Some(500)))),
            ],
            vec![],
            10_000,
        );
        let d = decide(&input, &timings());
        assert_eq!(d.health.health, Health::Partial);
        assert_eq!(d.health.stale, vec![node_name("a2")]);
        assert!(!d.fenced);
    }

    #[test]
    fn a_lost_site_waits_for_the_leases_then_bumps_and_fences() {
        let t = timings();
        // Heartbeats last changed at 1 s: stale after 1 s + 8 s.
        let nodes = vec![node("a1", Some(beat(1_000, Some(0))))];
        // The lease last changed at 2 s: expired at 2 + 10 + 2 = 14 s.
        let fe = frontend("vol-1", "a1", 2_000, true);
        let d = decide(&site(nodes.clone(), vec![fe.clone()], 9_000), &t);
        assert_eq!(d.health.health, Health::Healthy, "8 s is not stale yet");
        assert!(!d.release_leases, "a healthy site keeps its leader Leases");
        let d = decide(&site(nodes.clone(), vec![fe.clone()], 9_001), &t);
        assert_eq!(d.health.health, Health::Lost);
        assert!(matches!(d.fencing, Fencing::WaitingForLeases(_)));
        assert!(!d.fenced && d.fence_volumes.is_empty());
        assert!(
            d.release_leases,
            "lost: its pods' leader Leases are taken over at once"
        );
        let d = decide(&site(nodes.clone(), vec![fe.clone()], 13_999), &t);
        assert!(d.fence_volumes.is_empty(), "the lease has 1 ms left");
        let d = decide(&site(nodes.clone(), vec![fe.clone()], 14_000), &t);
        assert_eq!(d.fencing, Fencing::Fence);
        assert!(d.fenced);
        assert!(
            d.release_leases,
            "the fencing pass itself still takes them over"
        );
        let mut fenced = site(nodes, vec![fe], 20_000);
        fenced.fenced = true;
        assert!(
            !decide(&fenced, &t).release_leases,
            "once fenced the Leases are not listed again every poll"
        );
        assert_eq!(d.fence_volumes, vec![volume_name("vol-1")]);
        assert!(
            d.taints
                .iter()
                .all(|c| c.add && c.taint == OurTaint::Fenced)
        );
    }

    #[test]
    fn a_volume_whose_other_replica_is_not_in_sync_is_not_bumped() {
        let nodes = vec![node("a1", Some(beat(0, Some(0))))];
        let ok = frontend("vol-1", "a1", 0, true);
        let stuck = frontend("vol-2", "a1", 0, false);
        let d = decide(&site(nodes, vec![stuck, ok], 60_000), &timings());
        assert!(d.fenced);
        assert_eq!(d.fence_volumes, vec![volume_name("vol-1")]);
        assert_eq!(d.blocked, vec![volume_name("vol-2")]);
        let fenced = d
            .conditions
            .iter()
            .find(|c| c.type_ == "Fenced")
            .expect("a Fenced condition");
        assert!(fenced.message.contains("vol-2"), "{}", fenced.message);
    }

    #[test]
    fn a_site_without_any_node_plugin_is_not_lost_and_never_fenced() {
        let input = site(vec![node("a1", None), node("a2", None)], vec![], 60_000);
        let d = decide(&input, &timings());
        assert_eq!(d.health.health, Health::NoPlugins);
        assert!(!d.fenced);
        let with_dead_plugin = site(
            vec![node("a1", None), node("a2", Some(beat(0, Some(0))))],
            vec![],
            60_000,
        );
        let d = decide(&with_dead_plugin, &timings());
        assert_eq!(
            d.health.health,
            Health::Lost,
            "a plugin's Lease outlives the plugin"
        );
        assert!(d.fenced);
    }

    #[test]
    fn a_fenced_site_is_unfenced_only_after_heartbeats_were_proven_for_the_recovery_period() {
        let t = timings();
        let mut input = site(
            vec![node("a1", Some(beat(30_000, Some(25_000))))],
            vec![],
            30_500,
        );
        input.fenced = true;
        let d = decide(&input, &t);
        assert!(
            matches!(d.fencing, Fencing::Recovering { .. }),
            "{:?}",
            d.fencing
        );
        assert!(d.fenced);
        input.now = Mono::from_millis(35_000);
        input.nodes[0].heartbeat = Some(beat(35_000, Some(25_000)));
        let d = decide(&input, &t);
        assert_eq!(d.fencing, Fencing::Unfence);
        assert!(!d.fenced);
    }

    #[test]
    fn a_first_sighting_never_unfences() {
        let mut input = site(vec![node("a1", Some(beat(0, None)))], vec![], 5_000);
        input.fenced = true;
        let d = decide(&input, &timings());
        assert_eq!(d.fencing, Fencing::Fenced);
        assert!(d.fenced);
    }

    #[test]
    fn out_of_service_taint_only_when_asked_and_fenced() {
        let mut input = site(vec![node("a1", Some(beat(0, Some(0))))], vec![], 60_000);
        let d = decide(&input, &timings());
        assert!(!d.taints.iter().any(|c| c.taint == OurTaint::OutOfService));
        input.out_of_service_taint = true;
        let d = decide(&input, &timings());
        assert!(d.taints.contains(&TaintChange {
            node: node_name("a1"),
            taint: OurTaint::OutOfService,
            add: true
        }));
    }

    #[test]
    fn maintenance_reports_what_is_still_served_and_taints() {
        let mut input = site(
            vec![node("a1", Some(beat(9_000, Some(0))))],
            vec![frontend("vol-1", "a1", 9_000, true)],
            10_000,
        );
        input.maintenance = Some("power work".into());
        let d = decide(&input, &timings());
        let m = d
            .conditions
            .iter()
            .find(|c| c.type_ == "Maintenance")
            .expect("cond");
        assert_eq!(m.reason, "Draining");
        assert!(m.message.contains("vol-1") && m.message.contains("power work"));
        assert!(d.taints.contains(&TaintChange {
            node: node_name("a1"),
            taint: OurTaint::Maintenance,
            add: true
        }));
        input.frontends.clear();
        input.nodes[0].taints.maintenance = true;
        let d = decide(&input, &timings());
        let m = d
            .conditions
            .iter()
            .find(|c| c.type_ == "Maintenance")
            .expect("cond");
        assert_eq!(m.reason, "Drained");
        assert!(d.taints.is_empty());
    }
}
