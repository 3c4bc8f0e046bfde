//! The frontend process of one staged volume (`twinvol-csi --mode frontend
//! --spec FILE`): the engine's frontend ([`run_with`]) with the Kubernetes
//! arbiter, exporting the volume as a FUSE file for the node's loop device,
//! plus the Events a user reads in `kubectl describe mv`.
//!
//! The lease holder is the node's name: the frontend of a volume restaged
//! on the same node (a node back from a power cut) takes its own lease at
//! once, bumping the epoch, which fences anything the previous incarnation
//! still had in flight; a frontend on another node waits for the lease to
//! expire plus the margin (judged by the engine on its own clock).
//!
//! Its liveness is the node's heartbeat ([`crate::heartbeat`]): it reads the
//! node-local report of the last renewal and writes the MirroredVolume
//! status only when something changes (acquisition, release, the in-sync
//! set, coming back after its lease ran out).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::Api;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::watcher;
use kube::{Client, Resource};
use serde::{Deserialize, Serialize};
use twinvol_crds::{MirroredVolume, NodeName};
use twinvol_engine::arbiter::FrontendId;
use twinvol_engine::clock::WallClock;
use twinvol_engine::frontend::lease::LeaseConfig;
use twinvol_engine::frontend::service::{self, ArbiterOptions, FrontendProcess};
use twinvol_engine::frontend::{MirrorConfig, ReplicaSpec};
use twinvol_engine::protocol::{Epoch, PROTOCOL_VERSION, ReplicaId, Secret, VolumeId};

use crate::arbiter::KubeArbiter;

use super::DataPlaneError;

/// A replica as the frontend reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaAddress {
    /// The replica's Site (its replica id).
    pub site: String,
    /// `HOST:PORT` of its replica server.
    pub address: String,
}

/// Everything the frontend process needs, written by the node service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendSpec {
    /// The MirroredVolume (also the engine's volume id).
    pub volume: String,
    pub node: String,
    /// This node's Site: reads go to its replica.
    pub local_site: String,
    pub replicas: Vec<ReplicaAddress>,
    pub secret_file: PathBuf,
    pub lease_duration_ms: u64,
    pub lease_margin_ms: u64,
    pub replica_timeout_ms: u64,
    /// The FUSE mount directory; the file in it is named after the volume.
    pub fuse_dir: PathBuf,
    /// Also export over NBD on this unix socket (the kernel NBD client's
    /// path, and debugging with nbdinfo/qemu-io).
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    pub ready_file: PathBuf,
    pub status_file: PathBuf,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// The node's heartbeat, which proves this frontend alive (no
    /// per-volume renewal). `None` (a spec written by an older node
    /// plugin): the lease is renewed in the MirroredVolume status.
    #[serde(default)]
    pub heartbeat: Option<FrontendHeartbeat>,
}

/// Where a frontend finds its node's heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendHeartbeat {
    /// The node-local report of the heartbeat's last successful renewal.
    pub report: PathBuf,
    /// The namespace of the heartbeat Leases (another node's, watched
    /// before taking its volume over).
    pub namespace: String,
}

impl FrontendSpec {
    /// The volume's file in the FUSE mount.
    pub fn fuse_file(&self) -> PathBuf {
        self.fuse_dir.join(&self.volume)
    }
}

fn id<T: std::str::FromStr<Err = twinvol_engine::protocol::IdError>>(
    value: &str,
) -> Result<T, DataPlaneError> {
    value.parse().map_err(|e| DataPlaneError::Spec {
        detail: format!("{value:?}: {e}"),
    })
}

/// Runs the frontend until SIGTERM (then: unexport, flush, release the
/// lease) or a fatal error.
pub async fn run(spec: FrontendSpec, client: Client) -> Result<(), DataPlaneError> {
    let node = NodeName::new(spec.node.clone()).map_err(|e| DataPlaneError::Spec {
        detail: e.to_string(),
    })?;
    let secret = Secret::from_file(&spec.secret_file).map_err(|e| DataPlaneError::Spec {
        detail: format!("secret file {}: {e}", spec.secret_file.display()),
    })?;
    let replicas = spec
        .replicas
        .iter()
        .map(|r| {
            Ok(ReplicaSpec {
                id: id::<ReplicaId>(&r.site)?,
                addr: r.address.clone(),
            })
        })
        .collect::<Result<Vec<_>, DataPlaneError>>()?;
    let opts = FrontendProcess {
        mirror: MirrorConfig {
            volume: id::<VolumeId>(&spec.volume)?,
            replicas,
            local: id::<ReplicaId>(&spec.local_site)?,
            epoch: Epoch(0),
            secret,
            protocol_version: PROTOCOL_VERSION,
        },
        nbd_unix: spec.nbd_socket.clone(),
        nbd_tcp: None,
        fuse_dir: Some(spec.fuse_dir.clone()),
        fuse_file_name: spec.volume.clone(),
        metrics_listen: spec.metrics_listen,
        ready_file: Some(spec.ready_file.clone()),
        status_file: Some(spec.status_file.clone()),
        arbiter: Some(ArbiterOptions {
            path: PathBuf::new(),
            lease: LeaseConfig {
                holder: FrontendId(spec.node.clone()),
                duration: Duration::from_millis(spec.lease_duration_ms),
                margin: Duration::from_millis(spec.lease_margin_ms),
                wall_clock: WallClock::system(),
                // `run_frontend` holds the volume's instance lock on this
                // node: a lease under this node's name is a dead
                // predecessor's (a node back from a power cut).
                reclaim_own: spec.heartbeat.is_some(),
            },
            replica_timeout: Duration::from_millis(spec.replica_timeout_ms),
            acquire_timeout: Duration::from_secs(600),
        }),
    };
    let mut arbiter = KubeArbiter::new(client.clone(), spec.volume.clone(), node);
    if let Some(hb) = &spec.heartbeat {
        arbiter = arbiter.with_heartbeat(hb.report.clone(), &hb.namespace);
    }
    let arbiter = Arc::new(arbiter);
    let events = tokio::spawn(report_events(
        client,
        spec.volume.clone(),
        spec.node.clone(),
    ));
    let result = service::run_with(
        opts,
        Some(arbiter),
        twinvol_engine::process::shutdown_signal(),
    )
    .await
    .map_err(|e| DataPlaneError::Frontend(Box::new(e)));
    events.abort();
    result
}

/// What the frontend last saw of its volume, to tell changes apart.
#[derive(Debug, Default, Clone, PartialEq)]
struct Seen {
    in_sync: Vec<String>,
    epoch: u64,
    frontend_node: Option<String>,
}

fn seen(mv: &MirroredVolume) -> Option<Seen> {
    let status = mv.status.as_ref()?;
    // An empty set before any frontend held the volume means both sites
    // (see the arbiter's mapping), not none.
    let in_sync = if status.in_sync.is_empty() && status.epoch.get() == 0 {
        &mv.spec.sites
    } else {
        &status.in_sync
    };
    Some(Seen {
        in_sync: in_sync.iter().map(ToString::to_string).collect(),
        epoch: status.epoch.get(),
        frontend_node: status.frontend.as_ref().map(|f| f.node.to_string()),
    })
}

/// The Events for a change from `before` to `now`, as seen by the frontend
/// on `node`: (type, reason, message).
fn events_for(
    before: Option<&Seen>,
    now: &Seen,
    node: &str,
) -> Vec<(EventType, &'static str, String)> {
    let mut out = vec![];
    let started_here = now.frontend_node.as_deref() == Some(node)
        && before.is_none_or(|b| b.epoch != now.epoch || b.frontend_node != now.frontend_node);
    if started_here {
        let moved = before
            .and_then(|b| b.frontend_node.as_deref())
            .is_some_and(|n| n != node);
        let (reason, verb) = if moved {
            ("FrontendMoved", "moved to")
        } else {
            ("FrontendStarted", "started on")
        };
        out.push((
            EventType::Normal,
            reason,
            format!(
                "the volume's frontend {verb} node {node} at epoch {}; in sync: {}",
                now.epoch,
                now.in_sync.join(", ")
            ),
        ));
    }
    if let Some(before) = before {
        for site in before.in_sync.iter().filter(|s| !now.in_sync.contains(s)) {
            out.push((
                EventType::Warning,
                "ReplicaOutOfSync",
                format!(
                    "the replica on site {site} left the in-sync set (unreachable from the frontend on node {node}); writes are acknowledged by {} alone and the changed regions are tracked for its resync",
                    now.in_sync.join(", ")
                ),
            ));
        }
        for site in now.in_sync.iter().filter(|s| !before.in_sync.contains(s)) {
            out.push((
                EventType::Normal,
                "ReplicaInSync",
                format!("the replica on site {site} caught up and is back in the in-sync set"),
            ));
        }
    }
    out
}

/// Watches the volume and publishes an Event for every change a user
/// cares about. Best effort: a lost Event never touches the data path.
async fn report_events(client: Client, volume: String, node: String) {
    let api: Api<MirroredVolume> = Api::all(client.clone());
    let recorder = Recorder::new(
        client,
        Reporter {
            controller: "twinvol-frontend".into(),
            instance: Some(node.clone()),
        },
    );
    let mut stream = watcher::watch_object(api, &volume).boxed();
    let mut last: Option<Seen> = None;
    while let Some(item) = stream.next().await {
        let mv = match item {
            Ok(Some(mv)) => mv,
            Ok(None) => continue,
            Err(e) => {
                tracing::debug!(volume = %volume, error = %e, "watch of the volume failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(now) = seen(&mv) else { continue };
        for (type_, reason, note) in events_for(last.as_ref(), &now, &node) {
            tracing::info!(volume = %volume, reason, "{note}");
            let event = Event {
                type_,
                reason: reason.into(),
                note: Some(note),
                action: "Serve".into(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &mv.object_ref(&())).await {
                tracing::warn!(volume = %volume, error = %e, "cannot publish an Event");
            }
        }
        last = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(in_sync: &[&str], epoch: u64, node: Option<&str>) -> Seen {
        Seen {
            in_sync: in_sync.iter().map(|x| (*x).to_owned()).collect(),
            epoch,
            frontend_node: node.map(str::to_owned),
        }
    }

    fn reasons(before: Option<&Seen>, now: &Seen) -> Vec<&'static str> {
        events_for(before, now, "node-b1")
            .into_iter()
            .map(|(_, r, _)| r)
            .collect()
    }

    #[test]
    fn a_replica_leaving_and_returning_is_reported() {
        let both = s(&["a", "b"], 3, Some("node-b1"));
        let only_b = s(&["b"], 3, Some("node-b1"));
        assert_eq!(reasons(Some(&both), &only_b), ["ReplicaOutOfSync"]);
        assert_eq!(reasons(Some(&only_b), &both), ["ReplicaInSync"]);
        assert!(
            reasons(Some(&both), &both).is_empty(),
            "no change, no event"
        );
    }

    #[test]
    fn the_frontend_starting_or_moving_here_is_reported() {
        assert_eq!(
            reasons(None, &s(&["a", "b"], 1, Some("node-b1"))),
            ["FrontendStarted"]
        );
        let there = s(&["a", "b"], 1, Some("node-a1"));
        assert_eq!(
            reasons(Some(&there), &s(&["a", "b"], 2, Some("node-b1"))),
            ["FrontendMoved"]
        );
        assert!(
            reasons(None, &there).is_empty(),
            "another node's frontend is not ours to report"
        );
    }
}
