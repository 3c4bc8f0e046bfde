//! `twinvol-engine`: runs a replica server or a mirroring frontend without
//! Kubernetes, and creates volumes. Parses flags, sets up logging, calls the
//! library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use twinvol_engine::arbiter::{FileArbiter, FrontendId};
use twinvol_engine::clock::WallClock;
use twinvol_engine::frontend::lease::{LeaseConfig, now_ms};
use twinvol_engine::frontend::service::{
    self as frontend_service, ArbiterOptions, FrontendProcess,
};
use twinvol_engine::frontend::{MirrorConfig, ReplicaSpec};
use twinvol_engine::process::shutdown_signal;
use twinvol_engine::protocol::{
    Epoch, PROTOCOL_VERSION, ProtocolVersion, ReplicaId, Secret, VolumeId,
};
use twinvol_engine::replica::service::{self as replica_service, ReplicaProcess};
use twinvol_engine::replica::{Pool, ReplicaConfig};

/// Synchronously mirrored block volumes: replica server, frontend, volume tools.
#[derive(Parser, Debug)]
#[command(name = "twinvol-engine", version, about, long_about = None)]
struct Cli {
    /// Log one JSON object per line instead of text.
    #[arg(long, global = true, env = "TWINVOL_LOG_JSON")]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve the volumes of a pool directory to frontends.
    Replica(ReplicaArgs),
    /// Manage volumes in a pool directory.
    Volume {
        #[command(subcommand)]
        command: VolumeCommand,
    },
    /// Mirror a volume on two replicas and export it (NBD, FUSE file).
    Frontend(Box<FrontendArgs>),
    /// Grow a running frontend's volume online, through its control socket
    /// (every in-sync replica grows durably before it answers; shrinking
    /// is refused).
    Resize {
        /// The frontend's `--control-socket`.
        #[arg(long)]
        control: PathBuf,
        /// The new size (K/M/G/T suffixes, powers of 1024); at least the
        /// current size, a multiple of 4096.
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Manage a volume's file-backed arbiter record.
    Arbiter {
        #[command(subcommand)]
        command: ArbiterCommand,
    },
}

#[derive(Subcommand, Debug)]
enum ArbiterCommand {
    /// Create the record of a new volume: both replicas in sync, epoch 0.
    Create {
        /// The record file (refused if it exists).
        #[arg(long)]
        path: PathBuf,
        /// A replica of the volume; give exactly two.
        #[arg(long = "replica", required = true)]
        replicas: Vec<ReplicaId>,
    },
    /// Print the record: epoch, in-sync set, lease holder and expiry.
    Show {
        #[arg(long)]
        path: PathBuf,
    },
}

#[derive(Args, Debug)]
struct ReplicaArgs {
    /// Pool directory holding one subdirectory per volume.
    #[arg(long, env = "TWINVOL_POOL")]
    pool: PathBuf,
    /// Address to listen on for frontends (port 0: any free port).
    #[arg(long, env = "TWINVOL_LISTEN")]
    listen: SocketAddr,
    /// File holding the shared secret (at least 16 bytes).
    #[arg(long, env = "TWINVOL_SECRET_FILE")]
    secret_file: PathBuf,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, env = "TWINVOL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Write `key=value` lines (listen, metrics) here once serving.
    #[arg(long, env = "TWINVOL_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Speak another protocol version (tests of version refusal only).
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
    // --- resync (engine/src/resync.rs) ---
    /// A peer replica as NAME=HOST:PORT: where to resync it to when this
    /// replica's dirty bitmap tracks it.
    #[arg(long = "peer", value_parser = parse_replica)]
    peers: Vec<ReplicaSpec>,
    /// Resync rate limit per volume, bytes per second (K/M/G suffixes).
    #[arg(long, env = "TWINVOL_RESYNC_RATE", value_parser = parse_size)]
    resync_rate: Option<u64>,
    /// Resyncs copying at once on this server.
    #[arg(long, env = "TWINVOL_RESYNC_MAX", default_value_t = twinvol_engine::resync::DEFAULT_MAX_CONCURRENT)]
    resync_max: usize,
    /// Storage fault injection (test builds only; docs/engine.md): e.g.
    /// `volatile` (writes held in this process until synced, so kill -9 is
    /// a power cut) or `data::sync=fail@3x1`.
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "TWINVOL_STORAGE_FAULTS")]
    storage_faults: Option<String>,
}

#[derive(Subcommand, Debug)]
enum VolumeCommand {
    /// Create a volume: a preallocated data file and its metadata.
    Create {
        /// Pool directory (must exist and be writable).
        #[arg(long, env = "TWINVOL_POOL")]
        pool: PathBuf,
        /// Volume id: lowercase letters, digits, '-', '_', '.'.
        #[arg(long)]
        volume: VolumeId,
        /// Size in bytes, or with a K/M/G/T suffix (powers of 1024).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Print a volume's resync status as its replica server last published
    /// it (state, peer, progress with ETA, why a full copy).
    Status {
        #[arg(long, env = "TWINVOL_POOL")]
        pool: PathBuf,
        #[arg(long)]
        volume: VolumeId,
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args, Debug)]
struct FrontendArgs {
    /// The volume to mirror (its id on both replicas).
    #[arg(long, env = "TWINVOL_VOLUME")]
    volume: VolumeId,
    /// A replica as NAME=HOST:PORT; give exactly two.
    #[arg(long = "replica", value_parser = parse_replica, required = true)]
    replicas: Vec<ReplicaSpec>,
    /// Name of the replica on this site (reads go there).
    #[arg(long, env = "TWINVOL_LOCAL")]
    local: ReplicaId,
    /// File holding the shared secret (the same as the replicas').
    #[arg(long, env = "TWINVOL_SECRET_FILE")]
    secret_file: PathBuf,
    /// The volume epoch of this frontend; replicas refuse older ones
    /// (without an arbiter; with one, the lease gives the epoch).
    #[arg(
        long,
        env = "TWINVOL_EPOCH",
        required_unless_present = "arbiter",
        conflicts_with = "arbiter"
    )]
    epoch: Option<u64>,
    /// The file-backed arbiter record of the volume (see `arbiter create`):
    /// lease, epoch and in-sync set come from it, and a lost replica is
    /// dropped from the in-sync set through it.
    #[arg(long, env = "TWINVOL_ARBITER", requires = "frontend_id")]
    arbiter: Option<PathBuf>,
    /// This frontend's name as the lease holder (node and instance).
    #[arg(long, env = "TWINVOL_FRONTEND_ID")]
    frontend_id: Option<String>,
    /// How long a lease lasts without renewal (renewed every third).
    #[arg(long, env = "TWINVOL_LEASE_DURATION", default_value = "10s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// Wait this much beyond another holder's expiry before taking over.
    #[arg(long, env = "TWINVOL_LEASE_MARGIN", default_value = "2s", value_parser = parse_duration)]
    lease_margin: Duration,
    /// A replica silent this long while a request waits — no answer to
    /// anything, probes included — is dropped from the in-sync set (with
    /// an arbiter). One that answers but is slow is waited for up to 30 s.
    #[arg(long, env = "TWINVOL_REPLICA_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    replica_timeout: Duration,
    /// Export over NBD on this unix socket.
    #[arg(long)]
    nbd_unix: Option<PathBuf>,
    /// Export over NBD on this TCP address.
    #[arg(long)]
    nbd_tcp: Option<SocketAddr>,
    /// Export as a FUSE file in this directory (for `losetup --direct-io=on`).
    #[arg(long)]
    fuse_dir: Option<PathBuf>,
    /// Name of the file in the FUSE directory (default: the volume id).
    #[arg(long)]
    fuse_file_name: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics.
    #[arg(long, env = "TWINVOL_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Write `key=value` lines (exports, metrics, size) here once serving.
    #[arg(long, env = "TWINVOL_READY_FILE")]
    ready_file: Option<PathBuf>,
    /// Rewrite this file (JSON: epoch, lease, each replica's state and
    /// catch-up progress) whenever the frontend's view changes.
    #[arg(long, env = "TWINVOL_STATUS_FILE")]
    status_file: Option<PathBuf>,
    /// Serve the control socket here (`twinvol-engine resize`).
    #[arg(long, env = "TWINVOL_CONTROL_SOCKET")]
    control_socket: Option<PathBuf>,
    /// The size the volume should have (a resize asked for it): replicas
    /// smaller than this at startup are grown to it first.
    #[arg(long, value_parser = parse_size)]
    grow_to: Option<u64>,
    /// Speak another protocol version (tests of version refusal only).
    #[arg(long, hide = true)]
    protocol_version: Option<u32>,
    /// Offset this frontend's wall clock (`60s`, `-1500ms`): tests of a
    /// machine whose clock is wrong.
    #[arg(long, hide = true, env = "TWINVOL_WALL_CLOCK_OFFSET", value_parser = parse_offset_ms, allow_hyphen_values = true)]
    wall_clock_offset: Option<i64>,
    /// Stall the file arbiter after chosen commits (test builds only;
    /// docs/engine.md): e.g. `return-to-in-sync#1=8s`.
    #[cfg(feature = "failpoints")]
    #[arg(long, env = "TWINVOL_ARBITER_STALL")]
    arbiter_stall: Option<String>,
}

/// A signed duration in milliseconds: `60s`, `-1500ms`.
fn parse_offset_ms(s: &str) -> Result<i64, String> {
    let (sign, rest) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = parse_duration(rest)?;
    i64::try_from(d.as_millis())
        .map(|ms| sign * ms)
        .map_err(|_| format!("{s:?} is too large an offset"))
}

/// Refuses a fault-injection variable that this build would ignore: a test
/// asking for a power cut must not silently get none.
#[cfg(not(feature = "failpoints"))]
fn refuse_fault_env() -> anyhow::Result<()> {
    for var in ["TWINVOL_STORAGE_FAULTS", "TWINVOL_ARBITER_STALL"] {
        anyhow::ensure!(
            std::env::var_os(var).is_none(),
            "{var} is set, but this build has no fault injection (build with --features failpoints, as `cargo test` does)"
        );
    }
    Ok(())
}

/// `1500ms`, `10s`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    twinvol_engine::units::parse_duration(s)
}

fn parse_size(s: &str) -> Result<u64, String> {
    twinvol_engine::units::parse_size(s).map_err(|e| e.to_string())
}

fn parse_replica(s: &str) -> Result<ReplicaSpec, String> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not NAME=HOST:PORT"))?;
    Ok(ReplicaSpec {
        id: name
            .parse()
            .map_err(|e: twinvol_engine::protocol::IdError| e.to_string())?,
        addr: addr.to_owned(),
    })
}

fn version(v: Option<u32>) -> ProtocolVersion {
    v.map_or(PROTOCOL_VERSION, ProtocolVersion)
}

fn init_tracing(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        builder.json().flatten_event(true).init();
    } else {
        builder.init();
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    if matches!(cli.command, Command::Frontend(_)) {
        limit_malloc_arenas();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(run(cli.command))
}

/// glibc gives each thread that allocates its own arena (up to 8 per core);
/// the FUSE workers and the runtime's threads then keep tens of MiB of
/// freed buffers each. Two arenas halve the frontend's resident memory under
/// load (docs/benchmarks.md: 89.6 → 51 MiB at QD128 through FUSE) for no
/// measurable cost, since the hot buffers are `Bytes` shared across threads
/// anyway. Must run before the threads start.
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc tunable; called before any other
    // thread exists.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    if ok != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX) not applied");
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    #[cfg(not(feature = "failpoints"))]
    refuse_fault_env()?;
    match command {
        Command::Arbiter {
            command: ArbiterCommand::Create { path, replicas },
        } => {
            anyhow::ensure!(replicas.len() == 2, "give exactly two --replica");
            let a = FileArbiter::create(&path, replicas.into_iter().collect())?;
            println!("{}", a.read_blocking()?.summary(now_ms()));
            Ok(())
        }
        Command::Arbiter {
            command: ArbiterCommand::Show { path },
        } => {
            let a = FileArbiter::open(&path)?;
            println!("{}", a.read_blocking()?.summary(now_ms()));
            Ok(())
        }
        Command::Volume {
            command: VolumeCommand::Create { pool, volume, size },
        } => {
            let p = Pool::open(&pool)?;
            p.create_volume(&volume, size)?;
            println!(
                "created volume {volume} ({size} bytes) in {}",
                pool.display()
            );
            Ok(())
        }
        Command::Volume {
            command: VolumeCommand::Status { pool, volume, json },
        } => {
            anyhow::ensure!(
                pool.join(volume.as_str()).join("data").exists(),
                "no volume {volume} in pool {}",
                pool.display()
            );
            match twinvol_engine::resync::ResyncStatus::load(&pool, volume.as_str())? {
                Some(s) if json => println!("{}", serde_json::to_string_pretty(&s)?),
                Some(s) => print!("{}", s.summary()),
                None => println!(
                    "volume: {volume}\nresync: unknown (no replica server has published a status for it yet)"
                ),
            }
            Ok(())
        }
        Command::Resize { control, size } => {
            let now = twinvol_engine::frontend::control::request_resize(&control, size).await?;
            println!("volume size: {now} bytes");
            Ok(())
        }
        Command::Replica(a) => {
            #[cfg(feature = "failpoints")]
            if let Some(spec) = &a.storage_faults {
                let faults = twinvol_engine::storage::StorageFaults::parse(spec)?;
                twinvol_engine::storage::install_process_faults(faults);
            }
            let secret = Secret::from_file(&a.secret_file)?;
            let opts = ReplicaProcess {
                server: ReplicaConfig {
                    pool: a.pool,
                    listen: a.listen,
                    secret,
                    protocol_version: version(a.protocol_version),
                },
                metrics_listen: a.metrics_listen,
                ready_file: a.ready_file,
                resync: twinvol_engine::resync::ResyncConfig {
                    peers: a.peers,
                    rate_limit: a.resync_rate,
                    max_concurrent: a.resync_max,
                    ..Default::default()
                },
            };
            Ok(replica_service::run(opts, shutdown_signal()).await?)
        }
        Command::Frontend(a) => {
            let a = *a;
            #[cfg(feature = "failpoints")]
            if let Some(spec) = &a.arbiter_stall {
                let stall = twinvol_engine::arbiter::stall::CommitStall::parse(spec)?;
                twinvol_engine::arbiter::stall::install_commit_stall(stall);
            }
            let secret = Secret::from_file(&a.secret_file)?;
            let fuse_file_name = a.fuse_file_name.unwrap_or_else(|| a.volume.to_string());
            let opts = FrontendProcess {
                mirror: MirrorConfig {
                    volume: a.volume,
                    replicas: a.replicas,
                    local: a.local,
                    epoch: Epoch(a.epoch.unwrap_or(0)),
                    secret,
                    protocol_version: version(a.protocol_version),
                },
                nbd_unix: a.nbd_unix,
                nbd_tcp: a.nbd_tcp,
                fuse_dir: a.fuse_dir,
                fuse_file_name,
                metrics_listen: a.metrics_listen,
                ready_file: a.ready_file,
                status_file: a.status_file,
                control_socket: a.control_socket,
                grow_to: a.grow_to,
                arbiter: a.arbiter.map(|path| ArbiterOptions {
                    path,
                    lease: LeaseConfig {
                        holder: FrontendId(a.frontend_id.unwrap_or_default()),
                        duration: a.lease_duration,
                        margin: a.lease_margin,
                        wall_clock: WallClock::offset(a.wall_clock_offset.unwrap_or(0)),
                        reclaim_own: false,
                    },
                    replica_timeout: a.replica_timeout,
                    acquire_timeout: Duration::from_secs(600),
                }),
            };
            Ok(frontend_service::run(opts, shutdown_signal()).await?)
        }
    }
}
