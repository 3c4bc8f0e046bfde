//! `twinvol-operator`: parses flags, sets up logging, runs the operator
//! (`twinvol_operator::run`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, ValueEnum};
use twinvol_operator::context::Config;
use twinvol_operator::decide::Timings;
use twinvol_operator::run::{self, Options};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Reconciles twinvol's Sites and MirroredVolumes: placement, fail-over of
/// a lost site, fail-back, planned maintenance.
///
/// The timings together give the fail-over time: a lost site's volumes
/// have their epochs bumped (and their pods removed) at most
/// max(staleness-threshold, lease-duration + margin) + heartbeat-period/2
/// after the blackout — 6.75 s with the defaults (a frontend's liveness is
/// its node's heartbeat, so the lease duration is the heartbeat's).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Namespace of the node plugins' heartbeat Leases and of the leader
    /// Lease.
    #[arg(long, env = "TWINVOL_NAMESPACE", default_value = "twinvol-system")]
    namespace: String,
    /// This replica's identity (leader Lease, Events); the pod name in a
    /// Deployment.
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// How often the node plugins renew their heartbeat (their setting);
    /// the operator looks twice per period.
    #[arg(long, env = "TWINVOL_HEARTBEAT_PERIOD", default_value = "1500ms", value_parser = humantime::parse_duration)]
    heartbeat_period: Duration,
    /// A heartbeat not seen changing for longer is stale; a site whose
    /// heartbeats are all stale is lost. The node plugins' heartbeat
    /// duration (`--heartbeat-stale-after`, three periods and more: a
    /// loaded node missing a renewal or two is no site loss).
    #[arg(long, env = "TWINVOL_STALENESS_THRESHOLD", default_value = "5s", value_parser = humantime::parse_duration)]
    staleness_threshold: Duration,
    /// A frontend's lease duration when neither its record nor its node's
    /// heartbeat Lease says (the frontends' own setting, 5 s by default).
    #[arg(long, env = "TWINVOL_LEASE_DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// Extra wait after a frontend lease expired before its epoch is bumped.
    #[arg(long, env = "TWINVOL_LEASE_MARGIN", default_value = "1s", value_parser = humantime::parse_duration)]
    margin: Duration,
    /// How long a returning site's heartbeats must be seen before it is
    /// unfenced, and before a volume moves to it.
    #[arg(long, env = "TWINVOL_RECOVERY", default_value = "10s", value_parser = humantime::parse_duration)]
    recovery: Duration,
    /// At most one automatic move home per volume within this time.
    #[arg(long, env = "TWINVOL_MOVE_HOME_COOLDOWN", default_value = "5m", value_parser = humantime::parse_duration)]
    move_home_cooldown: Duration,
    /// Duration of the leader Lease (whole seconds).
    #[arg(long, env = "TWINVOL_LEADER_LEASE", default_value = "8s", value_parser = humantime::parse_duration)]
    leader_lease_duration: Duration,
    /// The leader renews this long before its Lease ends (whole seconds).
    #[arg(long, env = "TWINVOL_LEADER_GRACE", default_value = "4s", value_parser = humantime::parse_duration)]
    leader_lease_grace: Duration,
    /// Where /metrics, /healthz and /readyz are served.
    #[arg(long, env = "TWINVOL_METRICS_ADDRESS", default_value = "0.0.0.0:8080")]
    metrics_address: SocketAddr,
    #[arg(long, env = "TWINVOL_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// The kubeconfig to use (default: in-cluster, then KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "operator".into());
        format!("{host}-{}", std::process::id())
    });
    let client = twinvol_operator::client::client(args.kubeconfig.as_deref())
        .await
        .context("connecting to the Kubernetes API (in-cluster or KUBECONFIG)")?;
    let options = Options {
        config: Config {
            namespace: args.namespace,
            identity,
            timings: Timings {
                heartbeat_period: args.heartbeat_period,
                staleness: args.staleness_threshold,
                lease_duration: args.lease_duration,
                margin: args.margin,
                recovery: args.recovery,
                move_home_cooldown: args.move_home_cooldown,
            },
        },
        metrics_address: args.metrics_address,
        leader_lease: args.leader_lease_duration,
        leader_grace: args.leader_lease_grace,
    };
    tracing::info!(?options, "starting twinvol-operator");
    run::run(client, options).await?;
    Ok(())
}
