//! A simulation of a site loss with the real pieces: the engine's record
//! rules, the operator's [`Tracker`], [`site::decide`] and
//! [`record::fence`], over virtual time.
//!
//! Frontend A (site room-a) holds the lease and renews it every third of its
//! duration; room-a's node plugin heartbeats; at a random moment room-a goes
//! dark. The operator polls with a random observation lag (it sees the
//! world as it was a little earlier, as a watch does), restarts at random
//! moments (losing every observation), and runs on a wall clock skewed from
//! the frontend's. Frontend B (site room-b) takes the lease as soon as the
//! record lets it after the fencing. Checked at every step: never two
//! frontends whose leases are valid on their own clocks; the epoch never
//! decreases; at most one bump; and, long enough after the loss, the
//! fail-over happened with exactly one bump.
//!
//! [`Tracker`]: crate::observe::Tracker

use std::collections::BTreeSet;
use std::time::Duration;

use proptest::prelude::*;
use twinvol_engine::arbiter::{Change, FrontendId, Version, VolumeRecord};
use twinvol_engine::protocol::ReplicaId;

use super::record;
use super::site::{self, FrontendAtSite, NodeInput, OurTaints, SiteInput};
use super::testkit::*;
use super::{Mono, Timings};
use crate::observe::Tracker;

const STEP: u64 = 50;

fn r(s: &str) -> ReplicaId {
    ReplicaId::new(s).expect("valid")
}

#[derive(Debug, Clone)]
struct Params {
    blackout_at: Option<u64>,
    heartbeat_ms: u64,
    staleness_ms: u64,
    lease_ms: u64,
    margin_ms: u64,
    lag_ms: u64,
    restarts: Vec<u64>,
    skew_a: i64,
    skew_op: i64,
}

#[derive(Debug, Clone)]
struct Snapshot {
    at: u64,
    heartbeat: u64,
    record: VolumeRecord,
}

fn wall(t: u64, skew: i64) -> u64 {
    t.saturating_add_signed(skew + 1_000_000)
}

fn fingerprint(record: &VolumeRecord) -> Option<String> {
    record
        .lease
        .as_ref()
        .map(|l| format!("{}/{}/{}", l.holder, l.renewed_at_ms, record.epoch))
}

struct Outcome {
    bumps: u32,
    fenced_at: Option<u64>,
    b_acquired_at: Option<u64>,
}

fn simulate(p: &Params, end: u64) -> Result<Outcome, TestCaseError> {
    let timings = Timings {
        heartbeat_period: Duration::from_millis(p.heartbeat_ms),
        staleness: Duration::from_millis(p.staleness_ms),
        lease_duration: Duration::from_millis(p.lease_ms),
        margin: Duration::from_millis(p.margin_ms),
        recovery: Duration::from_secs(5),
        move_home_cooldown: Duration::from_secs(300),
    };
    let lease = Duration::from_millis(p.lease_ms);
    let a = FrontendId("room-a-n1/fe".into());
    let b = FrontendId("room-b-n1/fe".into());
    let mut rec = VolumeRecord::new(Version("0".into()), BTreeSet::from([r(A), r(B)]))
        .apply(
            Change::AcquireLease {
                holder: a.clone(),
                duration: lease,
                now_ms: wall(0, p.skew_a),
                replaces: None,
            },
            Version("1".into()),
        )
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let a_lease = rec.lease.as_ref().expect("just acquired").id();
    let mut a_valid_until = p.lease_ms;
    let mut a_fenced = false;
    let mut a_next_renew = p.lease_ms / 3;
    let mut heartbeat = 0u64;
    let mut b_acquired_at = None;
    let mut history: Vec<Snapshot> = Vec::new();
    let mut tracker = Tracker::new(timings.staleness);
    let mut next_poll = 0;
    let mut site_fenced = false;
    let mut fenced_at = None;
    let mut bumps = 0;
    let mut last_epoch = rec.epoch;
    let poll = u64::try_from(timings.poll_period().as_millis()).unwrap_or(1_000);

    let mut t = 0;
    while t <= end {
        let dark = p.blackout_at.is_some_and(|b| t >= b);
        if !dark {
            if t % p.heartbeat_ms == 0 {
                heartbeat += 1;
            }
            if !a_fenced && t >= a_next_renew {
                match rec.apply(
                    Change::RenewLease {
                        lease: a_lease.clone(),
                        now_ms: wall(t, p.skew_a),
                    },
                    rec.version.clone(),
                ) {
                    Ok(next) => {
                        rec = next;
                        a_valid_until = t + p.lease_ms;
                    }
                    Err(_) => a_fenced = true,
                }
                a_next_renew = t + p.lease_ms / 3;
            }
        }
        history.push(Snapshot {
            at: t,
            heartbeat,
            record: rec.clone(),
        });

        if p.restarts.contains(&t) {
            tracker = Tracker::new(timings.staleness);
            next_poll = t;
        }
        if t >= next_poll {
            next_poll = t + poll;
            let now = Mono::from_millis(t);
            let seen_at = t.saturating_sub(p.lag_ms);
            let seen = history
                .iter()
                .rev()
                .find(|s| s.at <= seen_at)
                .unwrap_or(&history[0])
                .clone();
            let hb = tracker.observe("hb/room-a-n1", &seen.heartbeat.to_string(), now);
            let mut frontends = Vec::new();
            if let Some(l) = &seen.record.lease
                && l.holder == a
                && let Some(fp) = fingerprint(&seen.record)
            {
                let beat = tracker.observe("fe/vol", &fp, now);
                frontends.push(FrontendAtSite {
                    volume: volume_name("vol"),
                    node: node_name("room-a-n1"),
                    lease: beat,
                    lease_duration: l.duration,
                    survivor_in_sync: seen.record.in_sync.contains(&r(B)),
                });
            }
            let input = SiteInput {
                name: site_name(A),
                nodes: vec![NodeInput {
                    name: node_name("room-a-n1"),
                    ready: true,
                    heartbeat: Some(hb),
                    taints: OurTaints::default(),
                }],
                fenced: site_fenced,
                maintenance: None,
                out_of_service_taint: false,
                frontends,
                now,
            };
            let decision = site::decide(&input, &timings);
            let mut all_done = true;
            for _ in &decision.fence_volumes {
                // The compare-and-swap re-reads the object: a lease that
                // changed since it was observed is not fenced.
                let fresh = fingerprint(&rec);
                if fresh.is_some() && fresh.as_deref() != tracker.value("fe/vol") {
                    all_done = false;
                    continue;
                }
                // The lease it watched expire is the one read now.
                match record::fence(&rec, &r(A), wall(t, p.skew_op), rec.lease.clone()) {
                    Ok(next) => {
                        if next.epoch != rec.epoch {
                            bumps += 1;
                        }
                        rec = next;
                    }
                    Err(_) => all_done = false,
                }
            }
            if all_done && decision.fenced && !site_fenced {
                site_fenced = true;
                fenced_at = Some(t);
            }
        }

        // Frontend B starts once the pod moved: after the site was fenced.
        if site_fenced
            && b_acquired_at.is_none()
            && let Ok(next) = rec.apply(
                Change::AcquireLease {
                    holder: b.clone(),
                    duration: lease,
                    now_ms: wall(t, 0),
                    replaces: None,
                },
                rec.version.clone(),
            )
        {
            rec = next;
            b_acquired_at = Some(t);
        }

        let a_valid = !a_fenced && t < a_valid_until;
        let b_valid = b_acquired_at.is_some();
        prop_assert!(
            !(a_valid && b_valid),
            "two valid leases at t={t}: A valid until {a_valid_until}, B acquired at {b_acquired_at:?}"
        );
        prop_assert!(rec.epoch >= last_epoch, "the epoch went down at t={t}");
        last_epoch = rec.epoch;
        prop_assert!(bumps <= 1, "{bumps} bumps");
        t += STEP;
    }
    Ok(Outcome {
        bumps,
        fenced_at,
        b_acquired_at,
    })
}

fn params() -> impl Strategy<Value = Params> {
    (
        0u64..600,
        (1u64..6).prop_map(|k| k * 500),
        4u64..20,
        4u64..30,
        0u64..60,
        0u64..40,
        prop::collection::vec(0u64..1_600, 0..4),
        -3_000i64..3_000,
        -3_000i64..3_000,
    )
        .prop_map(
            |(blackout, heartbeat_ms, stale, lease, margin, lag, restarts, skew_a, skew_op)| {
                Params {
                    blackout_at: Some(blackout * STEP),
                    heartbeat_ms,
                    staleness_ms: stale * 500,
                    lease_ms: lease * 500,
                    margin_ms: margin * STEP,
                    lag_ms: lag * STEP,
                    restarts: restarts.into_iter().map(|r| r * STEP).collect(),
                    skew_a,
                    skew_op,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn a_site_loss_fails_over_once_and_never_gives_two_valid_leases(p in params()) {
        let last = p.restarts.iter().copied().max().unwrap_or(0).max(p.blackout_at.unwrap_or(0));
        let end = last + p.staleness_ms + p.lease_ms + p.margin_ms + p.lag_ms + 4_000;
        let out = simulate(&p, end)?;
        prop_assert_eq!(out.bumps, 1, "exactly one bump; fenced at {:?}", out.fenced_at);
        prop_assert!(out.fenced_at.is_some());
        prop_assert!(out.b_acquired_at.is_some());
    }

    #[test]
    fn without_a_fault_nothing_fails_over(mut p in params()) {
        p.blackout_at = None;
        // Timings that leave room for the heartbeat period and the lag.
        p.staleness_ms = p.staleness_ms.max(p.heartbeat_ms + p.lag_ms + 1_000);
        p.lease_ms = p.lease_ms.max(p.lag_ms + 1_500);
        let out = simulate(&p, 60_000)?;
        prop_assert_eq!(out.bumps, 0);
        prop_assert_eq!(out.fenced_at, None);
    }
}
