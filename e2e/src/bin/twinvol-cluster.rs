//! `twinvol-cluster`: a two-site test cluster for people (see
//! `e2e/cluster.sh` and docs/cluster.md). Parses the command line and calls
//! `twinvol_e2e::cluster::cli`.

use clap::{Parser, Subcommand};
use twinvol_e2e::cluster::cli::{self, Fault};

#[derive(Parser)]
#[command(
    name = "twinvol-cluster",
    about = "A stretched Kubernetes cluster on this machine: two sites of real kubelets, \
             the control plane as a third location, and the faults of a site"
)]
struct Args {
    #[command(subcommand)]
    command: Verb,
}

#[derive(Subcommand)]
enum Verb {
    /// Start the cluster (a supervisor keeps it running) and wait until every node is Ready.
    Up {
        /// Nodes in each site (1 to 8).
        #[arg(long, default_value_t = 1)]
        nodes_per_site: u8,
    },
    /// Tear the cluster down, and remove every leftover of a crashed run.
    Down,
    /// Nodes, links and what kubectl sees.
    Status,
    /// Print the admin kubeconfig's path (`export KUBECONFIG=$(… kubeconfig)`).
    Kubeconfig,
    /// Inject a fault or repair one.
    #[command(
        after_help = "faults: kill-node NODE, start-node NODE, power-off SITE, \
        power-on SITE, cut-intersite, restore-intersite, partition SITE, heal SITE, \
        cut-node-link NODE, restore-node-link NODE (NODE: a1, b2, ...; SITE: a or b)"
    )]
    Fault {
        /// The fault, e.g. power-off.
        verb: String,
        /// Its node or site, e.g. a or a1.
        target: Option<String>,
    },
    /// Run the cluster in the foreground (what `up` starts).
    #[command(hide = true)]
    Serve {
        #[arg(long, default_value_t = 1)]
        nodes_per_site: u8,
    },
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let out = match args.command {
        Verb::Up { nodes_per_site } => cli::up(nodes_per_site)?,
        Verb::Down => cli::down()?,
        Verb::Status => cli::status()?,
        Verb::Kubeconfig => cli::kubeconfig()?,
        Verb::Fault { verb, target } => {
            let fault = Fault::parse(&verb, target.as_deref()).map_err(anyhow::Error::msg)?;
            cli::fault(&fault)?
        }
        Verb::Serve { nodes_per_site } => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            runtime.block_on(cli::serve(nodes_per_site))?;
            "cluster torn down".to_owned()
        }
    };
    println!("{out}");
    Ok(())
}
