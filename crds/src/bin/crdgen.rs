//! `crdgen`: writes the CustomResourceDefinitions of twinvol.io into the Helm
//! chart (`charts/twinvol/crds/`), or with `--check` fails when the committed
//! copies are stale. The rendering lives in `twinvol_crds::generate`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Parser;
use twinvol_crds::generate;

/// Generate the twinvol.io CRD manifests.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory to write the manifests into (default: the chart's crds/ in this source tree).
    #[arg(long, env = "TWINVOL_CRD_DIR")]
    out_dir: Option<PathBuf>,
    /// Write nothing; exit non-zero when a manifest is missing or differs.
    #[arg(long)]
    check: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.out_dir.unwrap_or_else(generate::chart_crd_dir);
    if args.check {
        let stale = generate::stale_files(&dir).context("checking the CRD manifests")?;
        if !stale.is_empty() {
            let names: Vec<String> = stale.iter().map(|p| p.display().to_string()).collect();
            bail!(
                "stale CRD manifests: {}; regenerate with `{}`",
                names.join(", "),
                generate::REGENERATE
            );
        }
        println!("CRD manifests in {} are up to date", dir.display());
    } else {
        for path in generate::write_files(&dir).context("writing the CRD manifests")? {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
