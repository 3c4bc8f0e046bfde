//! The `twinvol-engine replica` process: the server, its metrics endpoint
//! and its ready file, until a shutdown signal.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;

use crate::metrics::{self, Metrics};
use crate::process::{ReadyFileError, write_ready_file};

use crate::resync::ResyncConfig;

use super::server::{ReplicaConfig, ReplicaError, ReplicaServer};

/// The replica process's options beyond the server's own.
#[derive(Debug, Clone)]
pub struct ReplicaProcess {
    pub server: ReplicaConfig,
    pub metrics_listen: Option<SocketAddr>,
    pub ready_file: Option<PathBuf>,
    /// Where the peers are and how to resync them.
    pub resync: ResyncConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum ReplicaProcessError {
    #[error(transparent)]
    Server(#[from] ReplicaError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ready(#[from] ReadyFileError),
}

/// Runs a replica until `shutdown` completes or the server fails.
pub async fn run(
    opts: ReplicaProcess,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ReplicaProcessError> {
    let metrics = Metrics::new("twinvol_replica");
    let server = ReplicaServer::bind_with_resync(opts.server, opts.resync, metrics.clone()).await?;
    let addr = server.local_addr();
    let mut ready = vec![("listen", addr.to_string())];
    let metrics_task = match opts.metrics_listen {
        Some(maddr) => {
            let l = metrics::bind(maddr)
                .await
                .map_err(|source| ReplicaProcessError::Metrics {
                    addr: maddr,
                    source,
                })?;
            let bound = l.local_addr().unwrap_or(maddr);
            ready.push(("metrics", bound.to_string()));
            Some(tokio::spawn(metrics::serve(l, metrics.clone())))
        }
        None => None,
    };
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, &ready)?;
    }
    tracing::info!(listen = %addr, "replica ready");
    let r = tokio::select! {
        r = server.run() => r.map_err(Into::into),
        () = shutdown => Ok(()),
    };
    if let Some(t) = metrics_task {
        t.abort();
    }
    r
}
