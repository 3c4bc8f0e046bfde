//! The `twinvol-engine frontend` process: the mirror, the exports asked for
//! (NBD on a unix socket and/or TCP, a FUSE file), the metrics endpoint and
//! the ready file, until a shutdown signal or an export fails.
//!
//! On shutdown the exports stop first (the FUSE file is unmounted, the NBD
//! socket removed); the writes they had handed to the mirror run on (see
//! `frontend::mirror`) and are waited for
//! ([`DRAIN_TIMEOUT`]), with the lease still renewed and the fail-over
//! still working, so that none is left on one replica only. Then the mirror
//! is flushed so that nothing written through it is left only in the
//! replicas' page caches, the activity logs are cleared — only if every
//! write ended and the flush succeeded: otherwise they stay, and the next
//! frontend reconciles them — and the lease (if any) is released so that
//! the next frontend need not wait for it.
//!
//! With an arbiter, the frontend first acquires the lease (which bumps the
//! epoch it then opens the replicas with), renews it in the background and
//! turns on degraded operation in the mirror. [`run`] uses the file-backed
//! arbiter named in the options; [`run_with`] takes any [`Arbiter`] (the
//! CSI node plugin passes the Kubernetes one).

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::arbiter::{Arbiter, ArbiterError, FileArbiter};
use crate::metrics::{self, Metrics};
use crate::process::{ReadyFileError, write_ready_file};

use super::backend::BlockBackend;
use super::fuse::{self, FuseError, FuseExport};
use super::lease::{self, LeaseConfig, LeaseError};
use super::mirror::{Mirror, MirrorConfig, MirrorError};
use super::nbd::{self, NbdError};
use super::status::Reporter;

const SOCKET_WAIT: Duration = Duration::from_secs(10);
const FINAL_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stop waits for the writes in flight (a slow link may hold a
/// few MiB of them) before it gives up on clearing the activity logs.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

/// The frontend process's options.
#[derive(Debug, Clone)]
pub struct FrontendProcess {
    pub mirror: MirrorConfig,
    pub nbd_unix: Option<PathBuf>,
    pub nbd_tcp: Option<SocketAddr>,
    /// Mount the FUSE export here (created if missing).
    pub fuse_dir: Option<PathBuf>,
    /// Name of the volume's file in the FUSE mount.
    pub fuse_file_name: String,
    pub metrics_listen: Option<SocketAddr>,
    pub ready_file: Option<PathBuf>,
    /// Rewrite this file with the frontend's report (JSON) on every change.
    pub status_file: Option<PathBuf>,
    /// Lease, epoch and in-sync set from this arbiter; `None`: the
    /// mirror's configured epoch and no degraded operation.
    pub arbiter: Option<ArbiterOptions>,
    /// Serve the control socket (`frontend::control`: resize) here.
    pub control_socket: Option<PathBuf>,
    /// The size the volume was asked to have: replicas smaller than this
    /// at startup (a resize that did not reach them) are grown to it.
    pub grow_to: Option<u64>,
}

/// How the frontend uses its arbiter.
#[derive(Debug, Clone)]
pub struct ArbiterOptions {
    /// The file-backed arbiter's record ([`run`]; ignored by [`run_with`]).
    pub path: PathBuf,
    pub lease: LeaseConfig,
    /// A replica silent this long is dropped from the in-sync set.
    pub replica_timeout: Duration,
    /// Give up acquiring the lease after this long.
    pub acquire_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum FrontendError {
    #[error("no export asked for: give --nbd-unix, --nbd-tcp or --fuse-dir")]
    NoExport,
    #[error(transparent)]
    Mirror(#[from] MirrorError),
    #[error(transparent)]
    Nbd(#[from] NbdError),
    #[error("the NBD socket {path} did not appear within {SOCKET_WAIT:?}")]
    NbdSocket { path: PathBuf },
    #[error(transparent)]
    Fuse(#[from] FuseError),
    #[error("cannot create the FUSE mount directory {path}")]
    FuseDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Ready(#[from] ReadyFileError),
    #[error("an export task failed: {0}")]
    Task(String),
    #[error(transparent)]
    Arbiter(#[from] ArbiterError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Control(#[from] super::control::ControlError),
}

/// Runs a frontend until `shutdown` completes or an export fails, with the
/// file-backed arbiter of `opts.arbiter` if any.
pub async fn run(
    opts: FrontendProcess,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FrontendError> {
    let arbiter = match &opts.arbiter {
        Some(a) => Some(Arc::new(FileArbiter::open(&a.path)?)),
        None => None,
    };
    run_with(opts, arbiter, shutdown).await
}

/// Runs a frontend until `shutdown` completes or an export fails; with
/// `arbiter` (and `opts.arbiter` for the lease settings), lease, epochs and
/// degraded operation go through it.
pub async fn run_with<A: Arbiter>(
    opts: FrontendProcess,
    arbiter: Option<Arc<A>>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), FrontendError> {
    if opts.nbd_unix.is_none() && opts.nbd_tcp.is_none() && opts.fuse_dir.is_none() {
        return Err(FrontendError::NoExport);
    }
    let metrics = Metrics::new("twinvol_frontend");
    let mut ready = vec![];
    let mut tasks: JoinSet<Result<(), FrontendError>> = JoinSet::new();
    if let Some(addr) = opts.metrics_listen {
        let l = metrics::bind(addr)
            .await
            .map_err(|source| FrontendError::Metrics { addr, source })?;
        ready.push(("metrics", l.local_addr().unwrap_or(addr).to_string()));
        let m = metrics.clone();
        tasks.spawn(async move {
            metrics::serve(l, m)
                .await
                .map_err(|source| FrontendError::Metrics { addr, source })
        });
    }

    let mut config = opts.mirror.clone();
    let mut lease = None;
    let mut out_of_sync = Vec::new();
    // Renewal runs outside `tasks`: it must go on while a stop waits for
    // the writes in flight.
    let mut renewing = None;
    if let (Some(a), Some(arbiter)) = (&opts.arbiter, arbiter) {
        let (record, guard) = lease::acquire(arbiter.as_ref(), &a.lease, a.acquire_timeout).await?;
        config.epoch = record.epoch;
        let in_sync: Vec<String> = record.in_sync.iter().map(|r| r.to_string()).collect();
        tracing::info!(epoch = record.epoch.0, in_sync = ?in_sync, "using the arbiter's epoch");
        out_of_sync = config
            .replicas
            .iter()
            .map(|r| r.id.clone())
            .filter(|id| !record.in_sync.contains(id))
            .collect();
        // Fenced for good, it ends; the exports stay up, failing I/O,
        // until the process is stopped.
        renewing = Some(tokio::spawn(lease::renew(
            arbiter.clone(),
            a.lease.clone(),
            guard.clone(),
        )));
        lease = Some((arbiter, guard));
    }
    let mut mirror = Mirror::connect_growing(
        config,
        metrics.clone(),
        lease.is_some(),
        opts.grow_to,
        &out_of_sync,
    )
    .await?;
    if let (Some(a), Some((arbiter, guard))) = (&opts.arbiter, &lease) {
        mirror
            .enable_failover(
                arbiter.clone(),
                a.lease.holder.clone(),
                guard.clone(),
                a.replica_timeout,
                metrics.clone(),
            )
            .await;
        tasks.spawn({
            let (guard, metrics, volume) =
                (guard.clone(), metrics.clone(), mirror.volume().clone());
            async move {
                // The gauge is a view of the guard, refreshed twice a second.
                let mut tick = tokio::time::interval(Duration::from_millis(500));
                while guard.state() != lease::LeaseState::Fenced {
                    tick.tick().await;
                    metrics.set_lease_remaining(volume.as_str(), guard.remaining());
                }
                metrics.set_lease_remaining(volume.as_str(), Duration::ZERO);
                std::future::pending::<()>().await;
                Ok(())
            }
        });
    }
    let mirror = Arc::new(mirror);
    ready.push(("size", mirror.size().to_string()));
    let reporter = Reporter::start(mirror.clone(), lease.as_ref().map(|(_, g)| g.clone()));
    if let Some(path) = opts.status_file.clone() {
        reporter.write_to(path);
    }

    if let Some(path) = opts.nbd_unix.clone() {
        let b = mirror.clone();
        let p = path.clone();
        tasks.spawn(async move { nbd::serve_unix(&p, b).await.map_err(Into::into) });
        wait_for_socket(&path).await?;
        ready.push(("nbd_unix", path.display().to_string()));
    }
    if let Some(addr) = opts.nbd_tcp {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| NbdError::BindTcp { addr, source })?;
        ready.push(("nbd_tcp", l.local_addr().unwrap_or(addr).to_string()));
        let b = mirror.clone();
        tasks.spawn(async move { nbd::serve_tcp_listener(l, b).await.map_err(Into::into) });
    }
    let mut fuse_export = None;
    if let Some(dir) = opts.fuse_dir.clone() {
        let export = mount_fuse(mirror.clone(), dir, opts.fuse_file_name.clone()).await?;
        ready.push(("fuse_file", export.file_path().display().to_string()));
        fuse_export = Some(export);
    }
    if let Some(path) = opts.control_socket.clone() {
        let notifier = fuse_export.as_ref().and_then(FuseExport::size_notifier);
        let m = mirror.clone();
        let p = path.clone();
        tasks.spawn(async move {
            super::control::serve(p, m, notifier)
                .await
                .map_err(Into::into)
        });
        wait_for_socket(&path).await?;
        ready.push(("control", path.display().to_string()));
    }
    if let Some(path) = &opts.ready_file {
        write_ready_file(path, &ready)?;
    }
    tracing::info!(volume = %mirror.volume(), "frontend ready");

    let result = tokio::select! {
        () = shutdown => Ok(()),
        Some(done) = tasks.join_next() => match done {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(FrontendError::Task(e.to_string())),
        },
    };
    // The exports stop taking requests; what they handed to the mirror
    // runs on.
    tasks.shutdown().await;
    if let Some(export) = fuse_export {
        // Unmounting joins the FUSE threads: blocking.
        let _ = tokio::task::spawn_blocking(move || drop(export)).await;
    }
    let in_flight = mirror.writes_in_flight();
    let drained = mirror.drain(DRAIN_TIMEOUT).await;
    if !drained {
        tracing::warn!(
            in_flight = mirror.writes_in_flight(),
            "writes still in flight after {DRAIN_TIMEOUT:?}: the activity logs are kept; the next frontend reconciles them"
        );
    } else if in_flight > 0 {
        tracing::info!(writes = in_flight, "writes in flight at the stop ended");
    }
    match tokio::time::timeout(FINAL_FLUSH_TIMEOUT, mirror.flush()).await {
        Ok(Ok(())) if drained => {
            tracing::info!("final flush done");
            // Both replicas hold the same data now (or the in-sync one
            // records what the other misses): the next frontend need not
            // reconcile their activity logs.
            match tokio::time::timeout(FINAL_FLUSH_TIMEOUT, mirror.forget_activity()).await {
                Ok(Ok(())) => tracing::info!("activity logs cleared"),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot clear the activity logs; the next frontend reconciles them")
                }
                Err(_) => tracing::warn!(
                    "clearing the activity logs timed out; the next frontend reconciles them"
                ),
            }
        }
        Ok(Ok(())) => tracing::info!("final flush done"),
        Ok(Err(e)) => tracing::warn!(error = %e, "final flush failed"),
        Err(_) => tracing::warn!("final flush timed out"),
    }
    if let Some((arbiter, guard)) = &lease {
        match lease::release(arbiter.as_ref(), guard.id()).await {
            Ok(()) => tracing::info!("lease released"),
            Err(e) => {
                tracing::warn!(error = %crate::error_chain(&e), "cannot release the lease; the next frontend waits for it to expire")
            }
        }
    }
    if let Some(r) = renewing {
        r.abort();
    }
    result
}

async fn mount_fuse(
    mirror: Arc<Mirror>,
    dir: PathBuf,
    file_name: String,
) -> Result<FuseExport, FrontendError> {
    std::fs::create_dir_all(&dir).map_err(|source| FrontendError::FuseDir {
        path: dir.clone(),
        source,
    })?;
    let rt = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || fuse::mount(mirror, &dir, &file_name, rt))
        .await
        .map_err(|e| FrontendError::Task(e.to_string()))?
        .map_err(Into::into)
}

/// Waits until the unix socket accepts connections (the export task binds
/// it on its first poll).
async fn wait_for_socket(path: &Path) -> Result<(), FrontendError> {
    let deadline = Instant::now() + SOCKET_WAIT;
    loop {
        if tokio::net::UnixStream::connect(path).await.is_ok() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(FrontendError::NbdSocket {
                path: path.to_owned(),
            });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
