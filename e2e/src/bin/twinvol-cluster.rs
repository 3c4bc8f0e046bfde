//! `twinvol-cluster`: a two-site test cluster for people (see
//! `e2e/cluster.sh` and docs/cluster.md). Parses the command line and calls
//! `twinvol_e2e::cluster::cli`.

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand};
use twinvol_e2e::{
    cluster::{
        Site,
        cli::{self, Fault},
    },
    observe::{FollowOptions, Goal, follow::instant_of},
};

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
    /// Build twinvol's image from our release binaries, and the CSI
    /// sidecars' images, and import them into every node.
    Images {
        /// The directory holding twinvol-csi and twinvol-operator (release builds).
        #[arg(long)]
        bin_dir: PathBuf,
        /// The tag of twinvol.local/twinvol (the chart's image.tag).
        #[arg(long, default_value = "bed")]
        tag: String,
    },
    /// Print the chart's values for this bed (JSON, for `helm install -f`).
    Values {
        /// twinvol's image tag (as given to `images`).
        #[arg(long, default_value = "bed")]
        tag: String,
    },
    /// Print a StatefulSet writing checksummed, fsynced records to a
    /// twinvol volume (its record collector runs in the supervisor), for
    /// `kubectl apply -f -`.
    Workload {
        #[arg(long, default_value = "writer")]
        name: String,
        #[arg(long, default_value = "twinvol")]
        storage_class: String,
        #[arg(long, default_value = "512Mi")]
        size: String,
        /// The site its pod prefers (a or b).
        #[arg(long, default_value = "a")]
        site: Site,
    },
    /// Check that every record the workload acknowledged is in its volume
    /// (exit status 1 if one is missing).
    Records {
        #[arg(long, default_value = "writer")]
        app: String,
        /// The pod whose /data/records to read (default: <app>-0).
        #[arg(long)]
        pod: Option<String>,
        /// First wait until this many records were acknowledged (up to 90 s).
        #[arg(long, default_value_t = 0)]
        at_least: u64,
    },
    /// Print what happens to a workload (pods, Sites, its MirroredVolume,
    /// attachments) as it happens, until every goal holds.
    Follow {
        #[arg(long, default_value = "writer")]
        app: String,
        /// The claim (default: data-<app>-0).
        #[arg(long)]
        pvc: Option<String>,
        /// Stamp lines with the seconds since this moment (seconds since
        /// 1970, as `date +%s.%N` prints; default: now).
        #[arg(long)]
        since: Option<f64>,
        /// ready-on=NODE or in-sync; several must all hold at once.
        #[arg(long = "until", required = true)]
        goals: Vec<Goal>,
        /// Give up after this many seconds (exit status 1).
        #[arg(long, default_value_t = 300)]
        timeout: u64,
        /// Inject this fault (e.g. "power-off a") once the state before it
        /// was sampled; the clock starts with it (--since is then ignored).
        #[arg(long)]
        fault: Option<String>,
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
        Verb::Images { bin_dir, tag } => cli::images(&bin_dir, &tag)?,
        Verb::Values { tag } => cli::values(&tag)?,
        Verb::Workload {
            name,
            storage_class,
            size,
            site,
        } => cli::workload(&name, &storage_class, &size, site)?,
        Verb::Records { app, pod, at_least } => {
            let pod = pod.unwrap_or_else(|| format!("{app}-0"));
            let (summary, complete) = cli::records(&app, &pod, at_least)?;
            println!("{summary}");
            if !complete {
                std::process::exit(1);
            }
            return Ok(());
        }
        Verb::Follow {
            app,
            pvc,
            since,
            goals,
            timeout,
            fault,
        } => {
            let fault = match fault.as_deref().map(str::split_whitespace) {
                Some(mut words) => {
                    let verb = words.next().unwrap_or_default();
                    Some(Fault::parse(verb, words.next()).map_err(anyhow::Error::msg)?)
                }
                None => None,
            };
            let zero = match since {
                Some(s) => instant_of(s)?,
                None => std::time::Instant::now(),
            };
            let opts = FollowOptions {
                pvc: pvc.unwrap_or_else(|| format!("data-{app}-0")),
                app,
                zero,
                goals,
                timeout: Duration::from_secs(timeout),
            };
            runtime()?.block_on(cli::follow(&opts, fault))?
        }
        Verb::Serve { nodes_per_site } => {
            runtime()?.block_on(cli::serve(nodes_per_site))?;
            "cluster torn down".to_owned()
        }
    };
    println!("{out}");
    Ok(())
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
