//! `twinvol-test-heartbeat`: a real process standing in for a site's node
//! plugins in the operator's integration tests (see
//! `twinvol_operator::testsupport`). Uses the kubeconfig from `KUBECONFIG`.

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use twinvol_operator::testsupport::heartbeat::{self, Options};

#[derive(Parser)]
#[command(
    about = "Renews node plugin heartbeat Leases (and, optionally, kubelet node Leases and frontend leases) until killed"
)]
struct Args {
    #[arg(long, default_value = "twinvol-system")]
    namespace: String,
    /// A node to heartbeat for (repeat).
    #[arg(long = "node")]
    nodes: Vec<String>,
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    period: Duration,
    #[arg(long, default_value_t = 2)]
    duration_seconds: i32,
    /// Also renew the nodes' kube-node-lease Leases.
    #[arg(long)]
    kubelet_leases: bool,
    #[arg(long)]
    pool_capacity: Option<u64>,
    /// `VOLUME=NODE`: hold VOLUME's frontend lease from NODE (repeat).
    #[arg(long = "frontend")]
    frontends: Vec<String>,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    #[arg(long, default_value = "500ms", value_parser = humantime::parse_duration)]
    lease_margin: Duration,
    /// The kubeconfig to use (default: in-cluster, then KUBECONFIG).
    #[arg(long)]
    kubeconfig: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let frontends = args
        .frontends
        .iter()
        .map(|f| {
            f.split_once('=')
                .map(|(v, n)| (v.to_owned(), n.to_owned()))
                .with_context(|| format!("--frontend {f}: expected VOLUME=NODE"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = twinvol_operator::client::client(args.kubeconfig.as_deref())
        .await
        .context("a client from KUBECONFIG")?;
    heartbeat::run(
        client,
        Options {
            namespace: args.namespace,
            nodes: args.nodes,
            period: args.period,
            duration_seconds: args.duration_seconds,
            kubelet_leases: args.kubelet_leases,
            pool_capacity: args.pool_capacity,
            frontends,
            lease_duration: args.lease_duration,
            lease_margin: args.lease_margin,
        },
    )
    .await;
    Ok(())
}
