//! What a frontend reports about its volume, for whoever shows or acts on
//! it: `twinvol-engine frontend --status-file` (a JSON file rewritten
//! atomically on every change), and, in process, the CSI node plugin that
//! will copy it into the MirroredVolume status (replica states, resync
//! progress, conditions).
//!
//! [`Reporter::watch`] gives a `watch` receiver of [`FrontendReport`]s:
//! built from the mirror's membership, each replica connection's state, the
//! catch-up progress the fail-over task publishes, and the lease. A report
//! is published when one of them changes (lease expiry is polled twice a
//! second).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::connection::ReplicaState;
use super::lease::{LeaseGuard, LeaseState};
use super::mirror::Mirror;

/// One replica as the frontend sees it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaReport {
    pub id: String,
    /// `in_sync`, `catching_up`, `out_of_sync`, `connecting`,
    /// `disconnected` or `fenced`.
    pub state: String,
    /// While catching up: bytes its source still has to copy to it.
    pub catch_up_remaining_bytes: Option<u64>,
}

/// The frontend's view of its volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FrontendReport {
    pub volume: String,
    pub epoch: u64,
    /// `none` (no arbiter), `held`, `expired` or `fenced`.
    pub lease: String,
    /// Replicas, the local one first.
    pub replicas: Vec<ReplicaReport>,
    /// Why this frontend acknowledges nothing any more, if it is fenced.
    pub fenced: Option<String>,
}

/// Builds and publishes [`FrontendReport`]s for one mirror.
pub struct Reporter {
    tx: watch::Sender<FrontendReport>,
}

impl Reporter {
    /// Starts publishing; the task ends when every receiver is gone and the
    /// mirror is dropped.
    pub fn start(mirror: Arc<Mirror>, lease: Option<Arc<LeaseGuard>>) -> Self {
        let (tx, _) = watch::channel(build(&mirror, lease.as_deref()));
        let publisher = tx.clone();
        tokio::spawn(async move {
            let mut membership = mirror.membership();
            let mut progress = mirror.catch_up_progress();
            let [mut conn_a, mut conn_b] = mirror.watch_replica_connections();
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                    r = membership.changed() => if r.is_err() { return },
                    r = progress.changed() => if r.is_err() { return },
                    r = conn_a.changed() => if r.is_err() { return },
                    r = conn_b.changed() => if r.is_err() { return },
                    _ = tick.tick() => {}
                }
                // Mark every change seen (the report reads current values).
                membership.borrow_and_update();
                progress.borrow_and_update();
                conn_a.borrow_and_update();
                conn_b.borrow_and_update();
                let report = build(&mirror, lease.as_deref());
                publisher.send_if_modified(|r| {
                    let changed = *r != report;
                    *r = report;
                    changed
                });
            }
        });
        Self { tx }
    }

    pub fn watch(&self) -> watch::Receiver<FrontendReport> {
        self.tx.subscribe()
    }

    /// Rewrites `path` (atomically: write, rename) with each new report.
    pub fn write_to(&self, path: PathBuf) {
        let mut rx = self.watch();
        tokio::spawn(async move {
            loop {
                let report = rx.borrow_and_update().clone();
                if let Err(e) = write_atomically(&path, &report).await {
                    tracing::warn!(path = %path.display(), error = %e, "cannot write the status file");
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}

async fn write_atomically(path: &std::path::Path, report: &FrontendReport) -> std::io::Result<()> {
    let json = serde_json::to_vec_pretty(report).map_err(std::io::Error::other)?;
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || crate::process::write_atomic(&path, &json))
        .await
        .map_err(std::io::Error::other)?
}

fn build(mirror: &Mirror, lease: Option<&LeaseGuard>) -> FrontendReport {
    let membership = mirror.membership().borrow().clone();
    let progress = *mirror.catch_up_progress().borrow();
    let replicas = mirror
        .replica_states_indexed()
        .into_iter()
        .map(|(i, id, state)| ReplicaReport {
            id: id.to_string(),
            state: state.name().to_owned(),
            catch_up_remaining_bytes: (state == ReplicaState::CatchingUp)
                .then_some(progress[i])
                .flatten(),
        })
        .collect();
    FrontendReport {
        volume: mirror.volume().to_string(),
        epoch: mirror.epoch().0,
        lease: match lease.map(LeaseGuard::state) {
            None => "none",
            Some(LeaseState::Held) => "held",
            Some(LeaseState::Expired) => "expired",
            Some(LeaseState::Fenced) => "fenced",
        }
        .to_owned(),
        replicas,
        fenced: membership.fenced,
    }
}
