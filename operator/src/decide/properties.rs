//! Properties of the decisions over arbitrary snapshots:
//! - the same snapshot always gives the same decision, whatever the order
//!   of its lists;
//! - a site's volumes are bumped only once the site is lost and their
//!   lease expired on the operator's clock, and never when the other
//!   replica is not in sync;
//! - pods and attachments are removed only on a fenced site, only once the
//!   frontend is no longer recorded there, and only when the other site's
//!   replica is in sync (or the override was asked for, which is a
//!   promotion, not a removal);
//! - a volume is moved by eviction only to a site whose replica is in sync.

use std::time::Duration;

use proptest::prelude::*;
use twinvol_crds::{Failback, ReplicaState};

use super::site::{self, FrontendAtSite, Health, NodeInput, OurTaints, SiteInput};
use super::testkit::*;
use super::volume::{self, FrontendInput, PromoteRequest, ReplicaInput, SiteView, VolumeInput};
use super::{Beat, Mono};

fn arb_beat() -> impl Strategy<Value = Option<Beat>> {
    prop::option::of(
        (0u64..60_000, prop::option::of(0u64..60_000)).prop_map(|(last, proven)| Beat {
            last_change: Mono::from_millis(last),
            proven_since: proven.map(|p| Mono::from_millis(p.min(last))),
        }),
    )
}

fn arb_site_input() -> impl Strategy<Value = SiteInput> {
    (
        prop::collection::vec((any::<bool>(), arb_beat(), any::<[bool; 3]>()), 0..4),
        any::<bool>(),
        prop::option::of("[a-z ]{0,8}"),
        any::<bool>(),
        prop::collection::vec((0u64..60_000, 1u64..20, any::<bool>()), 0..4),
        0u64..30_000,
        0u64..90_000,
    )
        .prop_map(
            |(nodes, fenced, maintenance, oos, frontends, since, now)| SiteInput {
                name: site_name(A),
                nodes: nodes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (ready, heartbeat, t))| NodeInput {
                        name: node_name(&format!("a{i}")),
                        ready,
                        heartbeat,
                        taints: OurTaints {
                            fenced: t[0],
                            maintenance: t[1],
                            out_of_service: t[2],
                        },
                    })
                    .collect(),
                fenced,
                maintenance,
                out_of_service_taint: oos,
                frontends: frontends
                    .into_iter()
                    .enumerate()
                    .map(|(i, (changed, secs, in_sync))| FrontendAtSite {
                        volume: volume_name(&format!("vol-{i}")),
                        node: node_name("a0"),
                        lease: beat(changed, Some(changed)),
                        lease_duration: Duration::from_secs(secs),
                        survivor_in_sync: in_sync,
                    })
                    .collect(),
                now: Mono::from_millis(since + now),
            },
        )
}

fn arb_view(site: &'static str) -> impl Strategy<Value = SiteView> {
    (
        any::<bool>(),
        0usize..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(
            move |(fenced, health, recovered, maintenance, exists)| SiteView {
                exists: exists || fenced,
                fenced,
                health: [
                    Health::Healthy,
                    Health::Partial,
                    Health::Lost,
                    Health::NoNodes,
                ][health],
                recovered,
                maintenance,
                ..healthy_view(site)
            },
        )
}

fn arb_volume_input() -> impl Strategy<Value = VolumeInput> {
    let site = prop_oneof![Just(A), Just(B)];
    (
        (arb_view(A), arb_view(B)),
        prop::collection::vec((site.clone(), any::<bool>()), 0..4),
        prop::option::of((site.clone(), any::<bool>())),
        0usize..3,
        prop::option::of((
            prop_oneof![Just(A), Just(B), Just("room-z")],
            prop::option::of("[a-z]{0,4}"),
        )),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(site.clone()),
        prop::collection::vec(site.clone(), 0..3),
        (any::<bool>(), prop::option::of(0u64..400_000)),
    )
        .prop_map(
            |(
                views,
                pods,
                frontend,
                sync,
                promote,
                manual,
                move_home,
                preferred,
                vas,
                (deleting, last_move),
            )| {
                let mut v = volume("vol");
                v.site_views = vec![views.0, views.1];
                v.pods = pods
                    .iter()
                    .enumerate()
                    .map(|(i, (s, terminating))| {
                        let mut p = pod(&format!("app-{i}"), s);
                        p.terminating = *terminating;
                        p
                    })
                    .collect();
                v.frontend = frontend.map(|(s, has_lease)| FrontendInput {
                    node: node_name(&format!("{s}-n1")),
                    site: Some(site_name(s)),
                    has_lease,
                });
                v.in_sync = in_sync(match sync {
                    0 => &[A, B],
                    1 => &[A],
                    _ => &[B],
                });
                v.promote = promote.map(|(s, reason)| PromoteRequest {
                    site: s.into(),
                    reason,
                });
                v.failback = if manual {
                    Failback::Manual
                } else {
                    Failback::Automatic
                };
                v.move_home = move_home;
                v.preferred = preferred.map(site_name);
                v.attachments = vas
                    .iter()
                    .enumerate()
                    .map(|(i, s)| attachment(&format!("csi-{i}"), s))
                    .collect();
                v.deleting = deleting;
                v.last_move_home = last_move.map(Mono::from_millis);
                v.replicas = vec![ReplicaInput {
                    site: site_name(A),
                    node: Some(node_name("room-a-n1")),
                    state: Some(ReplicaState::Resyncing),
                    resync_remaining: Some(7),
                }];
                v
            },
        )
}

fn shuffled_site(mut s: SiteInput) -> SiteInput {
    s.nodes.reverse();
    s.frontends.reverse();
    s
}

fn shuffled_volume(mut v: VolumeInput) -> VolumeInput {
    v.site_views.reverse();
    v.pods.reverse();
    v.attachments.reverse();
    v.replicas.reverse();
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_same_site_snapshot_gives_the_same_decision(s in arb_site_input()) {
        let t = timings();
        let d = site::decide(&s, &t);
        prop_assert_eq!(&d, &site::decide(&s.clone(), &t));
        prop_assert_eq!(&d, &site::decide(&shuffled_site(s), &t));
    }

    #[test]
    fn a_site_bumps_only_expired_leases_of_a_lost_site_with_an_in_sync_survivor(s in arb_site_input()) {
        let t = timings();
        let d = site::decide(&s, &t);
        if !d.fence_volumes.is_empty() {
            prop_assert_eq!(d.health.health, Health::Lost);
        }
        for v in &d.fence_volumes {
            let f = s.frontends.iter().find(|f| f.volume == *v).expect("one of the site's volumes");
            prop_assert!(f.survivor_in_sync, "{v} bumped with its survivor out of sync");
            prop_assert!(s.now >= f.lease.last_change.plus(f.lease_duration).plus(t.margin),
                "{v} bumped before its lease expired plus the margin");
        }
        if d.fenced && !s.fenced {
            // Fencing a site that was not fenced needs every lease there expired.
            for f in &s.frontends {
                prop_assert!(s.now >= f.expires_at(t.margin));
            }
        }
    }

    #[test]
    fn the_same_volume_snapshot_gives_the_same_decision(v in arb_volume_input()) {
        let t = timings();
        let d = volume::decide(&v, &t);
        prop_assert_eq!(&d, &volume::decide(&v.clone(), &t));
        prop_assert_eq!(&d, &volume::decide(&shuffled_volume(v), &t));
    }

    #[test]
    fn pods_move_off_a_fenced_site_only_to_an_in_sync_survivor(v in arb_volume_input()) {
        let d = volume::decide(&v, &timings());
        let fenced = |s: &twinvol_crds::SiteName| v.site_views.iter().any(|x| x.name == *s && x.fenced);
        for p in &d.force_delete {
            let pod = v.pods.iter().find(|x| x.pod == *p).expect("a pod of the volume");
            let site = pod.site.clone().expect("a pod on a site");
            prop_assert!(fenced(&site), "{} force-deleted on a site that is not fenced", p.name);
            let other = if site.as_str() == A { site_name(B) } else { site_name(A) };
            prop_assert!(v.in_sync.contains(&other), "force-deleted while {other} is not in sync");
            prop_assert!(!fenced(&other));
            prop_assert!(v.frontend.as_ref().and_then(|f| f.site.clone()) != Some(site));
        }
        for a in &d.delete_attachments {
            let va = v.attachments.iter().find(|x| x.name == *a).expect("an attachment of the volume");
            let site = va.site.clone().expect("on a site");
            prop_assert!(fenced(&site));
            prop_assert!(!v.pods.iter().any(|p| p.node.as_ref() == Some(&va.node)),
                "attachment {a} deleted while a pod of the volume is on its node");
        }
        if let Some(p) = &d.promote {
            let req = v.promote.as_ref().expect("a promotion only when asked");
            prop_assert_eq!(req.site.as_str(), p.promote.as_str());
            prop_assert!(req.reason.as_ref().is_some_and(|r| !r.trim().is_empty()));
            prop_assert!(fenced(&p.demote));
        }
        for (p, _) in &d.evict {
            let pod = v.pods.iter().find(|x| x.pod == *p).expect("a pod of the volume");
            let site = pod.site.clone().expect("on a site");
            let other = if site.as_str() == A { site_name(B) } else { site_name(A) };
            prop_assert!(v.in_sync.contains(&other), "evicted towards {other}, which is not in sync");
            prop_assert!(!pod.terminating);
        }
        if v.deleting {
            prop_assert!(d.force_delete.is_empty() && d.evict.is_empty() && d.place.is_empty());
        }
    }
}
