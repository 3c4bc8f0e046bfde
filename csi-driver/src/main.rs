//! `twinvol-csi`: the CSI driver's one binary. `--mode controller` and
//! `--mode node` are the two plugins; `--mode frontend|replica --spec FILE`
//! are the data-plane processes the node plugin starts. Parses flags (with
//! environment fallbacks), sets up logging, calls the library.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgAction, Parser, ValueEnum};
use twinvol_csi_driver::dataplane::Launch;
use twinvol_csi_driver::node::NodeConfig;
use twinvol_csi_driver::plugin::{self, ControllerOptions, NodeOptions};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// The Identity and Controller services (beside the CSI sidecars).
    Controller,
    /// The Identity and Node services, kubelet registration, the heartbeat
    /// and the replicas placed on the node (one per node, privileged).
    Node,
    /// A volume's frontend (started by the node plugin).
    #[value(hide = true)]
    Frontend,
    /// A volume's replica server (started by the node plugin).
    #[value(hide = true)]
    Replica,
    /// The node's heartbeat renewer (started by the node plugin).
    #[value(hide = true)]
    Heartbeat,
}

/// twinvol's CSI driver (csi.twinvol.io).
#[derive(Parser, Debug)]
#[command(name = "twinvol-csi", version, about, long_about = None)]
struct Cli {
    #[arg(long, value_enum, env = "TWINVOL_CSI_MODE")]
    mode: Mode,
    /// Log one JSON object per line.
    #[arg(long, env = "TWINVOL_LOG_JSON")]
    log_json: bool,
    /// The CSI socket (`unix:///path`).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    endpoint: String,
    /// The driver's namespace (node heartbeat Leases).
    #[arg(long, env = "TWINVOL_NAMESPACE", default_value = "twinvol-system")]
    namespace: String,
    /// Kubeconfig file; default: in-cluster configuration.
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Serve `/healthz` here.
    #[arg(long, env = "TWINVOL_HEALTH_LISTEN")]
    health_listen: Option<SocketAddr>,

    // --- node ---
    /// This node's name (the Kubernetes Node).
    #[arg(long, env = "NODE_NAME", required_if_eq("mode", "node"))]
    node_name: Option<String>,
    /// This node's address, where the other nodes reach its replica servers.
    #[arg(long, env = "NODE_IP", required_if_eq("mode", "node"))]
    node_ip: Option<IpAddr>,
    /// kubelet's root directory (its plugins_registry is watched).
    #[arg(long, env = "TWINVOL_KUBELET_DIR", default_value = "/var/lib/kubelet")]
    kubelet_dir: PathBuf,
    /// Register with kubelet through its plugins_registry.
    #[arg(long, env = "TWINVOL_REGISTER", default_value_t = true, action = ArgAction::Set)]
    register: bool,
    /// Where staged volumes' state lives.
    #[arg(
        long,
        env = "TWINVOL_STATE_DIR",
        default_value = "/var/lib/twinvol-csi"
    )]
    state_dir: PathBuf,
    /// Prefix of the Site pool paths on this node.
    #[arg(long, env = "TWINVOL_HOST_ROOT", default_value = "/")]
    host_root: PathBuf,
    /// The replication secret (at least 16 bytes), the same on every node.
    #[arg(
        long,
        env = "TWINVOL_SECRET_FILE",
        default_value = "/etc/twinvol/secret"
    )]
    secret_file: PathBuf,
    /// The node label naming its Site when no Site's selector matches.
    #[arg(
        long,
        env = "TWINVOL_ZONE_LABEL",
        default_value = "topology.kubernetes.io/zone"
    )]
    zone_label: String,
    /// How often the node's heartbeat Lease is renewed (one API write per
    /// node per period: the node's only steady-state write).
    #[arg(long, env = "TWINVOL_HEARTBEAT_PERIOD", default_value = "1500ms", value_parser = parse_duration)]
    heartbeat_period: Duration,
    /// The heartbeat's duration: this node's frontends stop acknowledging
    /// I/O this long after the last successful renewal was sent, and
    /// observers count the node gone after this (plus their margin)
    /// without a change. At least three periods.
    #[arg(long, env = "TWINVOL_HEARTBEAT_STALE_AFTER", default_value = "5s", value_parser = parse_duration)]
    heartbeat_stale_after: Duration,
    /// A frontend's lease: it stops acknowledging I/O once its liveness
    /// (its node's heartbeat) was not confirmed for this long (the shorter
    /// of this and the heartbeat's duration counts).
    #[arg(long, env = "TWINVOL_LEASE_DURATION", default_value = "5s", value_parser = parse_duration)]
    lease_duration: Duration,
    /// A new frontend waits this long beyond another's lease expiry.
    #[arg(long, env = "TWINVOL_LEASE_MARGIN", default_value = "1s", value_parser = parse_duration)]
    lease_margin: Duration,
    /// A replica silent this long while a request waits (no answer to
    /// anything, probes included) leaves the in-sync set; a slow one that
    /// answers is waited for up to 30 s.
    #[arg(long, env = "TWINVOL_REPLICA_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    replica_timeout: Duration,
    /// How long NodeStage waits for the replicas' placement and the frontend.
    #[arg(long, env = "TWINVOL_STAGE_TIMEOUT", default_value = "90s", value_parser = parse_duration)]
    stage_timeout: Duration,
    /// Move data-plane processes into this cgroup (so a container
    /// runtime stopping the plugin's container leaves them running).
    #[arg(long, env = "TWINVOL_DATAPLANE_CGROUP")]
    dataplane_cgroup: Option<String>,
    /// API credentials for the data-plane processes (frontends, the
    /// heartbeat renewer): a directory with `token` and `ca.crt` that stays
    /// valid when this pod is deleted (a service-account-token Secret; the
    /// chart mounts one). Default: the pod's own service account token,
    /// which stops working when the pod goes (a rolling upgrade).
    #[arg(long, env = "TWINVOL_DATAPLANE_CREDENTIALS")]
    dataplane_credentials: Option<PathBuf>,

    // --- data plane ---
    /// The process spec written by the node plugin.
    #[arg(long, required_if_eq_any([("mode", "frontend"), ("mode", "replica"), ("mode", "heartbeat")]))]
    spec: Option<PathBuf>,
}

/// `1500ms`, `10s`, `2m`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    twinvol_engine::units::parse_duration(s)
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

fn node_config(cli: &Cli) -> anyhow::Result<NodeConfig> {
    let node = cli.node_name.clone().context("--node-name is required")?;
    let mut env = vec![];
    for key in ["RUST_LOG", "TWINVOL_LOG_JSON"] {
        if let Ok(v) = std::env::var(key) {
            env.push((key.to_owned(), v));
        }
    }
    if let Some(k) = &cli.kubeconfig {
        env.push(("KUBECONFIG".to_owned(), k.display().to_string()));
    }
    if let Some(dir) = &cli.dataplane_credentials {
        env.push((
            plugin::DATAPLANE_CREDENTIALS_ENV.to_owned(),
            dir.display().to_string(),
        ));
    }
    Ok(NodeConfig {
        node: twinvol_crds::NodeName::new(node)?,
        node_ip: cli.node_ip.context("--node-ip is required")?,
        namespace: cli.namespace.clone(),
        state_dir: cli.state_dir.clone(),
        host_root: cli.host_root.clone(),
        secret_file: cli.secret_file.clone(),
        zone_label: cli.zone_label.clone(),
        lease_duration: cli.lease_duration,
        lease_margin: cli.lease_margin,
        replica_timeout: cli.replica_timeout,
        stage_timeout: cli.stage_timeout,
        launch: Launch {
            program: std::env::current_exe().context("cannot find this program's path")?,
            mode: "frontend",
            env,
            cgroup: cli.dataplane_cgroup.clone(),
        },
    })
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_json);
    if cli.mode == Mode::Frontend {
        plugin::limit_malloc_arenas();
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = match cli.mode {
        Mode::Controller => rt.block_on(plugin::run_controller(ControllerOptions {
            endpoint: cli.endpoint.clone(),
            namespace: cli.namespace.clone(),
            kubeconfig: cli.kubeconfig.clone(),
            health_listen: cli.health_listen,
            zone_label: cli.zone_label.clone(),
        })),
        Mode::Node => {
            let node = node_config(&cli)?;
            rt.block_on(plugin::run_node(NodeOptions {
                node,
                endpoint: cli.endpoint.clone(),
                kubeconfig: cli.kubeconfig.clone(),
                kubelet_dir: cli.register.then(|| cli.kubelet_dir.clone()),
                health_listen: cli.health_listen,
                heartbeat_period: cli.heartbeat_period,
                heartbeat_stale_after: cli.heartbeat_stale_after,
            }))
        }
        Mode::Frontend => {
            let spec = cli.spec.context("--spec is required")?;
            rt.block_on(plugin::run_frontend(&spec))
        }
        Mode::Replica => {
            let spec = cli.spec.context("--spec is required")?;
            rt.block_on(plugin::run_replica(&spec))
        }
        Mode::Heartbeat => {
            let spec = cli.spec.context("--spec is required")?;
            rt.block_on(plugin::run_heartbeat(&spec))
        }
    };
    result.map_err(|e| anyhow::anyhow!(twinvol_engine::error_chain(&e)))
}
