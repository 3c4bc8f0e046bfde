//! Placement: one replica per site, on a node of that site that is Ready,
//! whose node plugin heartbeats, and whose pool has room for the volume.
//!
//! Among the nodes that qualify, the one holding the fewest replicas wins,
//! then the one with the most room left, then the first by name — so the
//! choice depends only on the input, never on its order. A placement is
//! sticky: once recorded in status it is not revisited here. When no node
//! qualifies the answer is a reason and a message for the volume's `Placed`
//! condition, never an error that would make the reconciler retry in a loop.

use twinvol_crds::{NodeName, SiteName};

/// A node of the site, as placement sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub node: NodeName,
    pub ready: bool,
    pub heartbeating: bool,
    /// The pool's usable size as the node plugin reports it; `None`: not
    /// reported (taken as room enough — the node plugin refuses a replica
    /// it cannot create, and says so in the replica's state).
    pub capacity: Option<u64>,
    /// Bytes of the replicas already placed on the node.
    pub used: u64,
    /// Replicas already placed on the node.
    pub replicas: usize,
}

impl Candidate {
    fn free(&self) -> Option<u64> {
        self.capacity.map(|c| c.saturating_sub(self.used))
    }
}

/// Why a replica cannot be placed (for the `Placed` condition).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Impossible {
    pub reason: &'static str,
    pub message: String,
}

/// The node for the replica of `size` bytes on `site`, or why there is none.
/// `site_exists` is false when no Site object of that name exists.
pub fn place(
    site: &SiteName,
    site_exists: bool,
    candidates: &[Candidate],
    size: u64,
) -> Result<NodeName, Impossible> {
    if !site_exists {
        return Err(Impossible {
            reason: "SiteNotFound",
            message: format!("no Site named {site} exists: create it, or fix spec.sites"),
        });
    }
    if candidates.is_empty() {
        return Err(Impossible {
            reason: "NoNodes",
            message: format!("no node matches the nodeSelector of Site {site}"),
        });
    }
    let alive: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.ready && c.heartbeating)
        .collect();
    if alive.is_empty() {
        return Err(Impossible {
            reason: "NoReadyNode",
            message: format!(
                "no node of Site {site} is Ready with a heartbeating node plugin ({} node(s) match its selector)",
                candidates.len()
            ),
        });
    }
    let roomy = alive
        .iter()
        .filter(|c| c.free().is_none_or(|free| free >= size))
        .min_by(|a, b| {
            a.replicas
                .cmp(&b.replicas)
                .then_with(|| {
                    b.free()
                        .unwrap_or(u64::MAX)
                        .cmp(&a.free().unwrap_or(u64::MAX))
                })
                .then_with(|| a.node.cmp(&b.node))
        });
    match roomy {
        Some(c) => Ok(c.node.clone()),
        None => {
            let best = alive
                .iter()
                .filter_map(|c| c.free().map(|f| (f, &c.node)))
                .max_by(|a, b| a.0.cmp(&b.0).then_with(|| b.1.cmp(a.1)));
            Err(Impossible {
                reason: "NoRoom",
                message: match best {
                    Some((free, node)) => format!(
                        "no ready node of Site {site} has {size} bytes free in its pool (the most is {free} bytes on {node})"
                    ),
                    None => {
                        format!("no ready node of Site {site} has {size} bytes free in its pool")
                    }
                },
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::decide::testkit::*;

    fn c(name: &str, ready: bool, capacity: Option<u64>, used: u64, replicas: usize) -> Candidate {
        Candidate {
            node: node_name(name),
            ready,
            heartbeating: ready,
            capacity,
            used,
            replicas,
        }
    }

    #[test]
    fn the_least_loaded_ready_node_with_room_wins() {
        let site = site_name("room-a");
        let nodes = [
            c("a1", true, Some(100), 0, 3),
            c("a2", true, Some(100), 50, 1),
            c("a3", false, Some(1_000), 0, 0),
            c("a4", true, Some(100), 95, 0),
        ];
        assert_eq!(place(&site, true, &nodes, 10), Ok(node_name("a2")));
    }

    #[test]
    fn impossible_placements_say_why() {
        let site = site_name("room-a");
        assert_eq!(
            place(&site, false, &[], 1).unwrap_err().reason,
            "SiteNotFound"
        );
        assert_eq!(place(&site, true, &[], 1).unwrap_err().reason, "NoNodes");
        let down = [c("a1", false, None, 0, 0)];
        assert_eq!(
            place(&site, true, &down, 1).unwrap_err().reason,
            "NoReadyNode"
        );
        let full = [
            c("a1", true, Some(100), 90, 0),
            c("a2", true, Some(100), 80, 0),
        ];
        let err = place(&site, true, &full, 50).unwrap_err();
        assert_eq!(err.reason, "NoRoom");
        assert!(err.message.contains("20 bytes on a2"), "{}", err.message);
    }

    #[test]
    fn an_unreported_capacity_counts_as_room() {
        let site = site_name("room-a");
        assert_eq!(
            place(&site, true, &[c("a1", true, None, 0, 0)], u64::MAX),
            Ok(node_name("a1"))
        );
    }

    proptest! {
        #[test]
        fn placement_ignores_the_order_of_the_nodes_and_picks_a_qualifying_node(
            specs in prop::collection::vec((any::<bool>(), prop::option::of(0u64..200), 0u64..200, 0usize..4), 0..8),
            size in 0u64..150,
            rotate in 0usize..8,
        ) {
            let site = site_name("room-a");
            let nodes: Vec<Candidate> = specs
                .iter()
                .enumerate()
                .map(|(i, (ready, cap, used, n))| c(&format!("n{i}"), *ready, *cap, *used, *n))
                .collect();
            let mut rotated = nodes.clone();
            if !rotated.is_empty() {
                let k = rotate % rotated.len();
                rotated.rotate_left(k);
                rotated.reverse();
            }
            let a = place(&site, true, &nodes, size);
            prop_assert_eq!(&a, &place(&site, true, &rotated, size));
            if let Ok(chosen) = a {
                let node = nodes.iter().find(|n| n.node == chosen).expect("one of the candidates");
                prop_assert!(node.ready && node.heartbeating);
                prop_assert!(node.free().is_none_or(|f| f >= size));
            }
        }
    }
}
