//! Unit tests of the volume decision, one behaviour each.

use twinvol_crds::{Failback, ReplicaState};

use super::*;
use crate::decide::testkit::*;

fn cond<'a>(d: &'a VolumeDecision, type_: &str) -> &'a CondPlan {
    d.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .unwrap_or_else(|| panic!("no {type_} condition in {:?}", d.conditions))
}

/// room-a fenced, the frontend bumped away, room-b in sync.
fn failed_over() -> VolumeInput {
    let mut v = volume("vol");
    v.site_views = vec![fenced_view(A), healthy_view(B)];
    v.frontend = None;
    v.in_sync = in_sync(&[B]);
    v.epoch = 4;
    v
}

#[test]
fn a_healthy_synced_volume_needs_nothing() {
    let d = decide(&volume("vol"), &timings());
    assert!(d.place.is_empty() && d.force_delete.is_empty() && d.evict.is_empty());
    assert!(d.delete_attachments.is_empty() && d.promote.is_none());
    assert_eq!(d.state, VolumeState::Synced);
    assert!(cond(&d, "Ready").is_true());
    assert!(cond(&d, "Synced").is_true());
    assert!(!cond(&d, "Degraded").is_true());
    assert!(!cond(&d, "AwayFromHome").is_true());
}

#[test]
fn an_unplaced_volume_gets_one_replica_per_site() {
    let mut v = volume("vol");
    v.replicas.clear();
    v.frontend = None;
    v.pods.clear();
    let d = decide(&v, &timings());
    assert_eq!(
        d.place,
        vec![
            (site_name(A), node_name("room-a-n1")),
            (site_name(B), node_name("room-b-n1"))
        ]
    );
    assert!(cond(&d, "Placed").is_true());
}

#[test]
fn an_impossible_placement_is_a_condition_with_the_reason() {
    let mut v = volume("vol");
    v.replicas.retain(|r| r.site.as_str() == A);
    v.site_views[1].candidates.clear();
    let d = decide(&v, &timings());
    assert!(d.place.is_empty());
    let placed = cond(&d, "Placed");
    assert!(!placed.is_true());
    assert_eq!(placed.reason, "NoNodes");
    assert_eq!(d.state, VolumeState::Unplaced);
}

#[test]
fn after_the_bump_pods_go_first_then_attachments() {
    let v = failed_over();
    let d = decide(&v, &timings());
    assert_eq!(d.force_delete, vec![v.pods[0].pod.clone()]);
    assert!(
        d.delete_attachments.is_empty(),
        "the pod is still on that node"
    );
    let mut gone = v.clone();
    gone.pods.clear();
    let d = decide(&gone, &timings());
    assert!(d.force_delete.is_empty());
    assert_eq!(d.delete_attachments, vec!["csi-a".to_owned()]);
}

#[test]
fn pods_on_the_surviving_site_are_never_removed() {
    let mut v = failed_over();
    v.pods = vec![pod("app-0", B)];
    v.attachments = vec![attachment("csi-b", B)];
    let d = decide(&v, &timings());
    assert!(d.force_delete.is_empty() && d.delete_attachments.is_empty());
}

#[test]
fn no_fail_over_while_the_survivor_is_not_in_sync() {
    let mut v = volume("vol");
    v.site_views = vec![fenced_view(A), healthy_view(B)];
    v.in_sync = in_sync(&[A]);
    let d = decide(&v, &timings());
    assert!(d.force_delete.is_empty() && d.delete_attachments.is_empty());
    assert!(d.promote.is_none());
    assert_eq!(d.state, VolumeState::FailoverBlocked);
    let ready = cond(&d, "Ready");
    assert_eq!(ready.reason, "FailoverBlocked");
    assert!(
        ready.message.contains("twinvol.io/promote=room-b"),
        "{}",
        ready.message
    );
}

#[test]
fn the_override_promotes_only_the_survivor_and_only_with_a_reason() {
    let mut v = volume("vol");
    v.site_views = vec![fenced_view(A), healthy_view(B)];
    v.in_sync = in_sync(&[A]);
    v.promote = Some(PromoteRequest {
        site: B.into(),
        reason: None,
    });
    let d = decide(&v, &timings());
    assert!(d.promote.is_none(), "no reason, no promotion");
    assert!(cond(&d, "Ready").message.contains("has no reason"));
    v.promote = Some(PromoteRequest {
        site: A.into(),
        reason: Some("x".into()),
    });
    assert!(
        decide(&v, &timings()).promote.is_none(),
        "not the lost site"
    );
    v.promote = Some(PromoteRequest {
        site: B.into(),
        reason: Some("room-a burnt down".into()),
    });
    let d = decide(&v, &timings());
    assert_eq!(
        d.promote,
        Some(Promotion {
            promote: site_name(B),
            demote: site_name(A),
            bump_epoch: true,
            reason: "room-a burnt down".into()
        })
    );
    assert!(
        d.force_delete.is_empty(),
        "pods move once the promotion is recorded"
    );
}

#[test]
fn a_done_override_is_cleared() {
    let mut v = failed_over();
    v.promote = Some(PromoteRequest {
        site: B.into(),
        reason: Some("done".into()),
    });
    let d = decide(&v, &timings());
    assert!(d.promote.is_none());
    assert_eq!(
        d.clear_annotations,
        vec![annotations::PROMOTE, annotations::PROMOTE_REASON]
    );
}

#[test]
fn maintenance_drains_only_to_a_healthy_in_sync_site() {
    let mut v = volume("vol");
    v.site_views[0].maintenance = true;
    let d = decide(&v, &timings());
    assert_eq!(
        d.evict,
        vec![(v.pods[0].pod.clone(), MoveReason::Maintenance)]
    );
    v.in_sync = in_sync(&[A]);
    let d = decide(&v, &timings());
    assert!(
        d.evict.is_empty(),
        "room-b is not in sync: no I/O error for the app"
    );
    assert_eq!(cond(&d, "AwayFromHome").reason, "DrainWaiting");
}

#[test]
fn automatic_failback_moves_home_once_in_sync_and_recovered() {
    let mut v = volume("vol");
    v.frontend = Some(FrontendInput {
        node: node_name("room-b-n1"),
        site: Some(site_name(B)),
        has_lease: true,
    });
    v.pods = vec![pod("app-0", B)];
    v.in_sync = in_sync(&[B]);
    let d = decide(&v, &timings());
    assert!(d.evict.is_empty());
    assert_eq!(cond(&d, "AwayFromHome").reason, "HomeNotReady");
    v.in_sync = in_sync(&[A, B]);
    v.site_views[0].recovered = false;
    assert!(decide(&v, &timings()).evict.is_empty());
    v.site_views[0].recovered = true;
    let d = decide(&v, &timings());
    assert_eq!(d.evict, vec![(v.pods[0].pod.clone(), MoveReason::MoveHome)]);
    v.last_move_home = Some(v.now);
    let d = decide(&v, &timings());
    assert!(d.evict.is_empty(), "cool-down");
    assert_eq!(cond(&d, "AwayFromHome").reason, "MoveHomeCoolingDown");
}

#[test]
fn manual_failback_waits_for_the_annotation() {
    let mut v = volume("vol");
    v.failback = Failback::Manual;
    v.frontend = Some(FrontendInput {
        node: node_name("room-b-n1"),
        site: Some(site_name(B)),
        has_lease: true,
    });
    v.pods = vec![pod("app-0", B)];
    let d = decide(&v, &timings());
    assert!(d.evict.is_empty());
    let away = cond(&d, "AwayFromHome");
    assert!(away.is_true());
    assert_eq!(away.reason, "ManualFailback");
    assert!(away.message.contains("runs away from home"));
    v.move_home = true;
    let d = decide(&v, &timings());
    assert_eq!(d.evict.len(), 1);
    assert_eq!(d.clear_annotations, vec![annotations::MOVE_HOME]);
}

#[test]
fn resync_progress_shows_in_the_resyncing_condition() {
    let mut v = volume("vol");
    v.in_sync = in_sync(&[A]);
    v.replicas[1].state = Some(ReplicaState::Resyncing);
    v.replicas[1].resync_remaining = Some(4096);
    let d = decide(&v, &timings());
    let r = cond(&d, "Resyncing");
    assert!(r.is_true());
    assert!(
        r.message.contains("room-b: 4096 bytes left"),
        "{}",
        r.message
    );
    assert_eq!(d.state, VolumeState::Resyncing);
}

#[test]
fn deletion_waits_for_the_node_plugins_to_remove_the_data() {
    let mut v = volume("vol");
    v.deleting = true;
    let d = decide(&v, &timings());
    assert_eq!(
        d.finalize,
        Finalize::WaitForNodePlugins(vec![site_name(A), site_name(B)])
    );
    v.replicas.clear();
    assert_eq!(decide(&v, &timings()).finalize, Finalize::Release);
}
