//! The chart on the cluster bed: what the chart's end-to-end tests and the
//! demo share — the images (our release binaries, the Go-built CSI
//! sidecars) built and imported into every node, and the chart's values
//! for the bed (its zones, a pool in each site's node, the per-node kubelet
//! roots, the node plugins' state under the cluster's directory).

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::{
    Cluster, HarnessError, UpstreamBinaries,
    cluster::{NodeId, Site, images, layout},
};

/// The namespace the chart is installed in.
pub const NAMESPACE: &str = "twinvol-system";
/// The Helm release's name.
pub const RELEASE: &str = "twinvol";
/// The external-attacher's leader Lease (its name for the driver
/// `csi.twinvol.io`), in [`NAMESPACE`].
pub const ATTACHER_LEASE: &str = "external-attacher-leader-csi-twinvol-io";
/// The sidecars' versions: the chart's defaults, as in e2e/tools/versions.env.
pub const SIDECARS: [(&str, &str); 3] = [
    ("csi-provisioner", "v6.4.0"),
    ("csi-attacher", "v4.13.0"),
    ("csi-resizer", "v2.3.0"),
];
/// Our binaries in twinvol's image.
pub const BINARIES: [&str; 2] = ["twinvol-csi", "twinvol-operator"];

/// The first node of `site`.
pub fn node(site: Site) -> NodeId {
    NodeId::new(site, 1).expect("index 1 exists")
}

/// Merges `extra` into `base`: objects key by key, anything else replaced.
pub fn merge(base: &mut Value, extra: &Value) {
    match (base, extra) {
        (Value::Object(b), Value::Object(e)) => {
            for (k, v) in e {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, e) => *b = e.clone(),
    }
}

/// Our release binaries in `bin_dir` (`target/release`), each checked to
/// be there.
pub fn release_binaries(bin_dir: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    BINARIES
        .iter()
        .map(|b| {
            let path = bin_dir.join(b);
            if path.is_file() {
                Ok(path)
            } else {
                Err(HarnessError::Cluster(format!(
                    "{} is missing: build it with `cargo build --release --bin {b}` \
                     (or point at the directory holding it)",
                    path.display()
                )))
            }
        })
        .collect()
}

/// Builds (cached by content) twinvol's image `twinvol.local/twinvol:<tag>`
/// from the binaries in `bin_dir` and the sidecars' images from the
/// upstream builds, and imports them into every node of `cluster` (and into
/// every node booted later).
pub fn add_images(cluster: &mut Cluster, bin_dir: &Path, tag: &str) -> Result<(), HarnessError> {
    let bins = release_binaries(bin_dir)?;
    let refs: Vec<&Path> = bins.iter().map(PathBuf::as_path).collect();
    let cache = images::cache_dir();
    cluster.add_image(images::twinvol(&cache, tag, &refs)?)?;
    let upstream = UpstreamBinaries::from_env();
    for (binary, version) in SIDECARS {
        cluster.add_image(images::sidecar(&cache, &upstream, binary, version)?)?;
    }
    Ok(())
}

/// Values for the bed: twinvol's image `tag` (imported, never pulled), its
/// zones, a pool in each site's node's shared directory, the per-node
/// kubelet roots.
pub fn values(cluster: &Cluster, tag: &str) -> Result<Value, HarnessError> {
    let a = node(Site::A);
    let per_node = cluster
        .kubelet_dir(a)?
        .display()
        .to_string()
        .replace(&a.node_name(), "$(NODE_NAME)");
    let mut sites = Vec::new();
    for site in Site::ALL {
        let pool = cluster.shared_dir(node(site))?.join("pool");
        sites.push(json!({
            "name": site.zone(),
            "nodeSelector": {layout::ZONE_LABEL: site.zone()},
            "pool": pool.display().to_string(),
        }));
    }
    Ok(json!({
        "image": {"tag": tag, "pullPolicy": "Never"},
        "sites": sites,
        "kubeletDir": per_node,
        // The node plugins' state (<stateDir>/<node name> on the host) in
        // the cluster's directory: beds running at once have the same node
        // names, and the sweep removes it with the rest.
        "node": {"stateDir": cluster.root().join("csi-state").display().to_string()},
        "operator": {"logFormat": "text"},
        "sidecars": {"pullPolicy": "Never"},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merge_replaces_leaves_and_keeps_other_keys() {
        let mut base = json!({"a": {"b": 1, "c": 2}, "d": [1]});
        merge(&mut base, &json!({"a": {"b": 3}, "d": [2, 3], "e": true}));
        assert_eq!(base, json!({"a": {"b": 3, "c": 2}, "d": [2, 3], "e": true}));
    }

    #[test]
    fn a_missing_binary_says_how_to_build_it() {
        let empty = tempfile::tempdir().expect("temp dir");
        let err = release_binaries(empty.path()).expect_err("nothing there");
        assert!(
            err.to_string()
                .contains("cargo build --release --bin twinvol-csi")
        );
    }
}
