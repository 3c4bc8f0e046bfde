//! Compiles the two third-party gRPC APIs the driver serves — the CSI spec's
//! `csi.proto` and kubelet's plugin-registration `api.proto` — from their Go
//! modules at the versions pinned in `e2e/tools/versions.env`. Nothing of
//! them is committed: `go mod download` puts the module in the Go module
//! cache (`$TWINVOL_CACHE/go/mod`, shared with `build-upstream.sh`), where
//! its checksum is verified against the Go checksum database, and protoc
//! (Debian's protobuf-compiler, with libprotobuf-dev for the well-known
//! types) reads the file from there. Provenance and licences: docs/csi.md.

use std::path::{Path, PathBuf};
use std::process::Command;

const CSI_MODULE: &str = "github.com/container-storage-interface/spec";
const KUBELET_MODULE: &str = "k8s.io/kubelet";

type Error = Box<dyn std::error::Error>;

fn main() -> Result<(), Error> {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let versions_file = manifest.join("../e2e/tools/versions.env");
    println!("cargo:rerun-if-changed={}", versions_file.display());
    println!("cargo:rerun-if-changed=build.rs");
    for var in [
        "TWINVOL_CACHE",
        "GOMODCACHE",
        "GO",
        "PROTOC",
        "PROTOC_INCLUDE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let versions = std::fs::read_to_string(&versions_file)
        .map_err(|e| format!("cannot read {}: {e}", versions_file.display()))?;
    let csi_version = pinned(&versions, "CSI_SPEC_VERSION")?;
    let kubelet_version = staging_version(&pinned(&versions, "KUBERNETES_VERSION")?)?;

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let csi_dir = module_dir(CSI_MODULE, &csi_version, &out)?;
    let kubelet_dir = module_dir(KUBELET_MODULE, &kubelet_version, &out)?;
    let csi_proto = csi_dir.join("csi.proto");
    let registration_dir = kubelet_dir.join("pkg/apis/pluginregistration/v1");
    let registration_proto = registration_dir.join("api.proto");
    for file in [&csi_proto, &registration_proto] {
        if !file.is_file() {
            return Err(format!("{} is missing from its module", file.display()).into());
        }
    }
    check_protoc()?;

    let mut includes = vec![csi_dir.clone(), registration_dir.clone()];
    includes.extend(well_known_include());
    // The spec's comments are prose with indented examples that rustdoc
    // would run as doctests; the spec itself is the documentation.
    let mut config = prost_build::Config::new();
    config.disable_comments(["."]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .disable_comments(["."])
        .compile_with_config(config, &[csi_proto, registration_proto], &includes)?;
    std::fs::write(
        out.join("provenance.txt"),
        format!(
            "{CSI_MODULE}@{csi_version} csi.proto\n{KUBELET_MODULE}@{kubelet_version} pkg/apis/pluginregistration/v1/api.proto\n"
        ),
    )?;
    println!("cargo:rustc-env=TWINVOL_CSI_SPEC_VERSION={csi_version}");
    println!("cargo:rustc-env=TWINVOL_KUBELET_API_VERSION={kubelet_version}");
    Ok(())
}

/// The value of `KEY=value` in versions.env (a trailing comment allowed).
fn pinned(text: &str, key: &str) -> Result<String, Error> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.split('#').next().unwrap_or("").trim().to_owned())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| format!("{key} is not set in e2e/tools/versions.env").into())
}

/// `v1.36.3` (a Kubernetes release) → `v0.36.3` (its staging modules).
fn staging_version(release: &str) -> Result<String, Error> {
    release
        .strip_prefix("v1.")
        .map(|rest| format!("v0.{rest}"))
        .ok_or_else(|| format!("KUBERNETES_VERSION {release:?} is not v1.X.Y").into())
}

fn go_mod_cache() -> PathBuf {
    if let Some(dir) = std::env::var_os("GOMODCACHE").filter(|v| !v.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("TWINVOL_CACHE")
        .filter(|v| !v.is_empty())
        .map_or_else(|| PathBuf::from("/var/cache/twinvol"), PathBuf::from);
    cache.join("go/mod")
}

fn go_binary() -> PathBuf {
    if let Some(go) = std::env::var_os("GO").filter(|v| !v.is_empty()) {
        return PathBuf::from(go);
    }
    let fallback = Path::new("/usr/local/go/bin/go");
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("go").is_file()))
        .unwrap_or(false);
    if !on_path && fallback.is_file() {
        fallback.to_owned()
    } else {
        PathBuf::from("go")
    }
}

/// The extracted module directory in the Go module cache, downloading the
/// module when it is not there yet. An already extracted module is used as
/// it is (an offline rebuild works); the cache is read-only, so nothing
/// there changes once verified.
fn module_dir(module: &str, version: &str, work: &Path) -> Result<PathBuf, Error> {
    let cache = go_mod_cache();
    // Module paths in the cache escape capitals as `!x`; ours have none.
    let dir = cache.join(format!("{module}@{version}"));
    if dir.is_dir() {
        return Ok(dir);
    }
    let go = go_binary();
    let output = Command::new(&go)
        .args(["mod", "download", "-json", &format!("{module}@{version}")])
        .current_dir(work)
        .env("GOMODCACHE", &cache)
        .env("GOFLAGS", "-mod=mod -modcacherw")
        .env("GOTOOLCHAIN", "local")
        .env("GOWORK", "off")
        .env("GO111MODULE", "on")
        .output()
        .map_err(|e| {
            format!(
                "cannot run {} to fetch {module}@{version}: {e} (Go is installed by e2e/tools/install-deps.sh's prerequisites; set GO=/path/to/go)",
                go.display()
            )
        })?;
    if !output.status.success() {
        return Err(format!(
            "go mod download {module}@{version} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
        .into());
    }
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    json["Dir"]
        .as_str()
        .map(PathBuf::from)
        .ok_or_else(|| format!("go mod download {module}@{version} gave no Dir: {json}").into())
}

fn check_protoc() -> Result<(), Error> {
    let protoc = std::env::var_os("PROTOC").unwrap_or_else(|| "protoc".into());
    match Command::new(&protoc).arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        _ => Err(format!(
            "protoc ({}) not found: install Debian's protobuf-compiler and libprotobuf-dev (bash e2e/tools/install-deps.sh)",
            Path::new(&protoc).display()
        )
        .into()),
    }
}

/// Where `google/protobuf/*.proto` live: `PROTOC_INCLUDE`, or Debian's
/// libprotobuf-dev location.
fn well_known_include() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("PROTOC_INCLUDE").filter(|v| !v.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let debian = Path::new("/usr/include");
    debian
        .join("google/protobuf/descriptor.proto")
        .is_file()
        .then(|| debian.to_owned())
}
