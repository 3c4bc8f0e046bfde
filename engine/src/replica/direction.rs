//! Which way a resync may go (design invariant 3): decided by the
//! arbiter's record, the way DRBD's generation identifiers decide a sync's
//! direction — never by a dirty-tracking header alone, which can outlive
//! its reason (a `PeerState { in sync }` lost with its source, a successor
//! frontend that never tells a replica to stop tracking).
//!
//! The frontend tells each replica the record as it stands (a
//! [`SyncView`]: epoch, the frontend's sequence number of it, version and
//! in-sync set) whenever it learns a new one, before relying on it; each
//! replica persists the newest view it learned. Then:
//!
//! - **a source** copies only while its own view lists it in sync and its
//!   peer out ([`may_copy`]), and carries that view as its claim
//!   ([`SyncClaim`]) when it opens its session on the target;
//! - **a target** judges the claim against what it knows ([`judge_copy`]):
//!   the newer of the two views decides (a target that knows a newer record
//!   wins; one that knows an older record learns the claim's), and a copy is
//!   accepted only if that view lists the source in sync and the target
//!   out. A refusal carries the target's view, so that a stale source
//!   learns it and stops.
//!
//! Why the order of views is the arbiter's order: only the lease holder of
//! an epoch changes the in-sync set during that epoch, every acquisition
//! bumps the epoch, and a holder numbers the records it publishes, so
//! `(epoch, seq)` sorts views as the arbiter's history does. Why the
//! newest view a replica *knows* is enough: a frontend tells the survivor
//! the record that drops its peer before it acknowledges anything without
//! that peer, so a replica whose data is newer than its peer's always
//! knows a record at least as new as the peer's claim.

use crate::protocol::{ReplicaId, SyncClaim, SyncView};

use super::meta::StoredView;

/// What a replica's own view makes of it, for its logs at startup and on
/// every new view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncRole {
    /// No view learned yet (a new volume, or one from before views).
    Unknown,
    /// In sync, its peer out: it tracks what the peer misses and resyncs it.
    Source,
    /// Both in sync: no dirty tracking, no resync.
    BothInSync,
    /// Out of sync: the peer is the source; its own tracking means nothing.
    OutOfSync,
}

impl SyncRole {
    pub fn of(known: Option<&StoredView>) -> Self {
        match known {
            None => SyncRole::Unknown,
            Some(k) => match (k.me_in_sync(), k.peer_in_sync()) {
                (true, false) => SyncRole::Source,
                (true, true) => SyncRole::BothInSync,
                (false, _) => SyncRole::OutOfSync,
            },
        }
    }
}

/// Whether this replica (per its own view) may copy to its peer: `Err`
/// says why not, for its log and status.
pub fn may_copy(known: Option<&StoredView>, tracked_peer: &ReplicaId) -> Result<(), String> {
    let Some(k) = known else {
        return Err(
            "no frontend has told this replica the arbiter's record yet; waiting for one"
                .to_owned(),
        );
    };
    if k.peer != *tracked_peer {
        return Err(format!(
            "its dirty bitmap tracks {tracked_peer}, but its peer in the record is {}",
            k.peer
        ));
    }
    if !k.me_in_sync() {
        return Err(format!(
            "the record (version {}) lists this replica, {}, out of sync",
            k.view.arbiter_version, k.me
        ));
    }
    if k.peer_in_sync() {
        return Err(format!(
            "the record (version {}) lists its peer {} in sync",
            k.view.arbiter_version, k.peer
        ));
    }
    Ok(())
}

/// A target's verdict on a resync source's claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Copies may land. `learn`: the claim's view is newer than what this
    /// replica knows, to persist (as this replica's view) before answering.
    Accept { learn: Option<StoredView> },
    /// Refused: the newest view known, and why.
    Refuse { newest: SyncView, reason: String },
}

/// Judges `claim` against `known` (this replica's view; `None`: it never
/// learned one).
pub fn judge_copy(known: Option<&StoredView>, claim: &SyncClaim) -> Verdict {
    if let Some(k) = known
        && k.me != claim.target
    {
        return Verdict::Refuse {
            newest: k.view.clone(),
            reason: format!(
                "the claim is for target {}, but this replica is {} in the record",
                claim.target, k.me
            ),
        };
    }
    let (newest, learn) = match known {
        Some(k) if k.view.stamp() >= claim.view.stamp() => (&k.view, None),
        _ => (
            &claim.view,
            Some(StoredView {
                me: claim.target.clone(),
                peer: claim.source.clone(),
                view: claim.view.clone(),
            }),
        ),
    };
    let reason = if !newest.lists(&claim.source) {
        format!(
            "the record (version {}, as of {}) lists the source {} out of sync",
            newest.arbiter_version,
            newest.stamp(),
            claim.source
        )
    } else if newest.lists(&claim.target) {
        format!(
            "the record (version {}, as of {}) lists this replica {} in sync: it needs no copy",
            newest.arbiter_version,
            newest.stamp(),
            claim.target
        )
    } else {
        return Verdict::Accept { learn };
    };
    Verdict::Refuse {
        newest: newest.clone(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::{ArbiterVersion, Epoch};

    fn id(s: &str) -> ReplicaId {
        ReplicaId::new(s).expect("valid")
    }

    fn view(epoch: u64, seq: u64, in_sync: &[&str]) -> SyncView {
        SyncView {
            epoch: Epoch(epoch),
            seq,
            arbiter_version: ArbiterVersion::new(format!("{epoch}.{seq}")).expect("valid"),
            in_sync: in_sync.iter().map(|s| id(s)).collect(),
        }
    }

    fn stored(me: &str, v: SyncView) -> StoredView {
        let peer = if me == "a" { "b" } else { "a" };
        StoredView {
            me: id(me),
            peer: id(peer),
            view: v,
        }
    }

    fn claim(source: &str, v: SyncView) -> SyncClaim {
        let target = if source == "a" { "b" } else { "a" };
        SyncClaim {
            source: id(source),
            target: id(target),
            view: v,
        }
    }

    #[test]
    fn only_a_replica_listed_in_sync_with_its_peer_out_copies() {
        assert!(may_copy(None, &id("a")).is_err());
        let b = |v| stored("b", v);
        assert!(may_copy(Some(&b(view(1, 2, &["b"]))), &id("a")).is_ok());
        assert!(may_copy(Some(&b(view(1, 3, &["a", "b"]))), &id("a")).is_err());
        let out = may_copy(Some(&b(view(1, 4, &["a"]))), &id("a")).expect_err("out");
        assert!(out.contains("lists this replica, b, out of sync"), "{out}");
        assert!(may_copy(Some(&b(view(1, 2, &["b"]))), &id("c")).is_err());
    }

    #[test]
    fn a_target_that_knows_a_newer_record_refuses_a_stale_source() {
        // b tracked a at 1.2; a rejoined (1.3) and b was dropped (1.4): b's
        // claim is the old 1.2, a knows 1.4.
        let a = stored("a", view(1, 4, &["a"]));
        match judge_copy(Some(&a), &claim("b", view(1, 2, &["b"]))) {
            Verdict::Refuse { newest, reason } => {
                assert_eq!(newest, view(1, 4, &["a"]));
                assert!(
                    reason.contains("lists the source b out of sync"),
                    "{reason}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Both in sync at 1.3: nothing to copy onto a.
        let a = stored("a", view(1, 3, &["a", "b"]));
        assert!(matches!(
            judge_copy(Some(&a), &claim("b", view(1, 2, &["b"]))),
            Verdict::Refuse { .. }
        ));
    }

    #[test]
    fn a_target_that_knows_an_older_record_learns_the_claim() {
        let a = stored("a", view(1, 1, &["a", "b"]));
        let c = claim("b", view(1, 2, &["b"]));
        assert_eq!(
            judge_copy(Some(&a), &c),
            Verdict::Accept {
                learn: Some(stored("a", view(1, 2, &["b"])))
            }
        );
        // The same record: accepted, nothing to learn.
        let a = stored("a", view(1, 2, &["b"]));
        assert_eq!(judge_copy(Some(&a), &c), Verdict::Accept { learn: None });
        // A newer epoch wins over any sequence number of an older one.
        let a = stored("a", view(1, 9, &["b"]));
        let c = claim("b", view(2, 1, &["a"]));
        assert!(matches!(judge_copy(Some(&a), &c), Verdict::Refuse { .. }));
    }

    #[test]
    fn a_claim_for_another_target_is_refused() {
        let a = stored("a", view(1, 2, &["b"]));
        let mut c = claim("b", view(1, 2, &["b"]));
        c.target = id("c");
        assert!(matches!(judge_copy(Some(&a), &c), Verdict::Refuse { .. }));
    }

    fn any_view() -> impl Strategy<Value = SyncView> {
        (
            0u64..4,
            0u64..4,
            prop_oneof![Just(vec!["a"]), Just(vec!["b"]), Just(vec!["a", "b"])],
        )
            .prop_map(|(e, s, set)| view(e, s, &set))
    }

    proptest! {
        /// Whatever the two replicas know, a copy lands only if the newer
        /// of the two views lists the source in sync and the target out;
        /// and two sources can never both be accepted by each other under
        /// one pair of views.
        #[test]
        fn copies_follow_the_newest_view(ka in any_view(), kb in any_view()) {
            let a = stored("a", ka.clone());
            let b = stored("b", kb.clone());
            let newest = if ka.stamp() >= kb.stamp() { &ka } else { &kb };
            let accepted = |target: &StoredView, source_view: &SyncView, source: &str| {
                may_copy(Some(&stored(source, source_view.clone())), &target.me).is_ok()
                    && matches!(
                        judge_copy(Some(target), &claim(source, source_view.clone())),
                        Verdict::Accept { .. }
                    )
            };
            let b_to_a = accepted(&a, &kb, "b");
            let a_to_b = accepted(&b, &ka, "a");
            if b_to_a {
                prop_assert!(newest.lists(&id("b")) && !newest.lists(&id("a")));
            }
            if a_to_b {
                prop_assert!(newest.lists(&id("a")) && !newest.lists(&id("b")));
            }
            prop_assert!(!(a_to_b && b_to_a));
        }
    }
}
