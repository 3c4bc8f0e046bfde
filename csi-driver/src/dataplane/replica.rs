//! The replica server process of one volume placed on this node
//! (`twinvol-csi --mode replica --spec FILE`): the engine's replica server
//! over a pool directory of its own holding that one volume.
//!
//! One process per volume (not one per node) so that deleting a volume is
//! stopping its process and removing its directory — the engine's server
//! keeps every volume it opened — and so that its resync peer, which
//! differs per volume (the other site's replica may be on any node there),
//! is that volume's own: the node plugin writes it to the peers file, which
//! the server re-reads at every resync attempt.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use twinvol_engine::protocol::{PROTOCOL_VERSION, Secret};
use twinvol_engine::replica::ReplicaConfig;
use twinvol_engine::replica::service::{self, ReplicaProcess};
use twinvol_engine::resync::ResyncConfig;

use super::DataPlaneError;

/// Everything the replica process needs, written by the node plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaServerSpec {
    pub volume: String,
    pub site: String,
    /// The pool directory of this volume alone.
    pub pool_dir: PathBuf,
    pub listen: SocketAddr,
    pub secret_file: PathBuf,
    /// `SITE=HOST:PORT` of the peer replica, kept current by the node plugin.
    pub peers_file: PathBuf,
    pub ready_file: PathBuf,
    /// Resync bandwidth limit (bytes per second).
    #[serde(default)]
    pub resync_rate_limit: Option<u64>,
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
}

/// Serves the volume until SIGTERM.
pub async fn run(spec: ReplicaServerSpec) -> Result<(), DataPlaneError> {
    let secret = Secret::from_file(&spec.secret_file).map_err(|e| DataPlaneError::Spec {
        detail: format!("secret file {}: {e}", spec.secret_file.display()),
    })?;
    let opts = ReplicaProcess {
        server: ReplicaConfig {
            pool: spec.pool_dir.clone(),
            listen: spec.listen,
            secret,
            protocol_version: PROTOCOL_VERSION,
        },
        metrics_listen: spec.metrics_listen,
        ready_file: Some(spec.ready_file.clone()),
        resync: ResyncConfig {
            peers_file: Some(spec.peers_file.clone()),
            rate_limit: spec.resync_rate_limit,
            ..ResyncConfig::default()
        },
    };
    service::run(opts, twinvol_engine::process::shutdown_signal())
        .await
        .map_err(|e| DataPlaneError::Replica(Box::new(e)))
}
