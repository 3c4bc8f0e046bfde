//! Builders shared by the decision tests.

use std::time::Duration;

use twinvol_crds::{NodeName, SiteName};

use super::site::{FrontendAtSite, NodeInput, OurTaints};
use super::{Beat, Mono, Timings, VolumeName};

pub fn timings() -> Timings {
    Timings::default()
}

pub fn site_name(s: &str) -> SiteName {
    SiteName::new(s).expect("a valid site name")
}

pub fn node_name(s: &str) -> NodeName {
    NodeName::new(s).expect("a valid node name")
}

pub fn volume_name(s: &str) -> VolumeName {
    VolumeName::new(s)
}

pub fn beat(last_change_ms: u64, proven_since_ms: Option<u64>) -> Beat {
    Beat {
        last_change: Mono::from_millis(last_change_ms),
        proven_since: proven_since_ms.map(Mono::from_millis),
    }
}

pub fn node(name: &str, heartbeat: Option<Beat>) -> NodeInput {
    NodeInput {
        name: node_name(name),
        ready: true,
        heartbeat,
        taints: OurTaints::default(),
    }
}

pub fn frontend(
    volume: &str,
    node: &str,
    lease_change_ms: u64,
    survivor_in_sync: bool,
) -> FrontendAtSite {
    FrontendAtSite {
        volume: volume_name(volume),
        node: node_name(node),
        lease: beat(lease_change_ms, Some(lease_change_ms)),
        lease_duration: Duration::from_secs(10),
        survivor_in_sync,
    }
}

use std::collections::BTreeSet;

use twinvol_crds::{Failback, ReplicaState};

use super::placement::Candidate;
use super::site::Health;
use super::volume::{
    AttachmentInput, FrontendInput, PodInput, PodRef, ReplicaInput, SiteView, VolumeInput,
};

pub const A: &str = "room-a";
pub const B: &str = "room-b";

pub fn candidate(node: &str) -> Candidate {
    Candidate {
        node: node_name(node),
        ready: true,
        heartbeating: true,
        capacity: None,
        used: 0,
        replicas: 0,
    }
}

pub fn healthy_view(site: &str) -> SiteView {
    SiteView {
        name: site_name(site),
        exists: true,
        fenced: false,
        health: Health::Healthy,
        recovered: true,
        maintenance: false,
        candidates: vec![candidate(&format!("{site}-n1"))],
    }
}

pub fn fenced_view(site: &str) -> SiteView {
    SiteView {
        fenced: true,
        health: Health::Lost,
        recovered: false,
        candidates: vec![Candidate {
            ready: false,
            heartbeating: false,
            ..candidate(&format!("{site}-n1"))
        }],
        ..healthy_view(site)
    }
}

pub fn pod(name: &str, site: &str) -> PodInput {
    PodInput {
        pod: PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        },
        node: Some(node_name(&format!("{site}-n1"))),
        site: Some(site_name(site)),
        terminating: false,
    }
}

pub fn attachment(name: &str, site: &str) -> AttachmentInput {
    AttachmentInput {
        name: name.into(),
        node: node_name(&format!("{site}-n1")),
        site: Some(site_name(site)),
    }
}

pub fn in_sync(sites: &[&str]) -> BTreeSet<SiteName> {
    sites.iter().map(|s| site_name(s)).collect()
}

/// A placed, synced volume served from room-a's node, both sites healthy.
pub fn volume(name: &str) -> VolumeInput {
    VolumeInput {
        name: volume_name(name),
        deleting: false,
        size_bytes: 1 << 30,
        sites: [site_name(A), site_name(B)],
        preferred: Some(site_name(A)),
        failback: Failback::Automatic,
        promote: None,
        move_home: false,
        epoch: 3,
        in_sync: in_sync(&[A, B]),
        frontend: Some(FrontendInput {
            node: node_name("room-a-n1"),
            site: Some(site_name(A)),
            has_lease: true,
        }),
        replicas: [A, B]
            .iter()
            .map(|s| ReplicaInput {
                site: site_name(s),
                node: Some(node_name(&format!("{s}-n1"))),
                state: Some(ReplicaState::InSync),
                resync_remaining: None,
            })
            .collect(),
        site_views: vec![healthy_view(A), healthy_view(B)],
        pods: vec![pod("app-0", A)],
        attachments: vec![attachment("csi-a", A)],
        last_move_home: None,
        eviction_refused: None,
        now: Mono::from_millis(100_000),
    }
}
