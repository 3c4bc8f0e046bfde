//! Where the pinned upstream Kubernetes binaries are: the directory named by
//! `TWINVOL_UPSTREAM_BIN`, by default `/var/cache/twinvol/upstream/bin`, as
//! filled by `e2e/tools/build-upstream.sh`.
//!
//! A missing binary is an error that says how to build it: a test that needs
//! a real API server fails rather than skipping silently.

use std::path::{Path, PathBuf};

use crate::HarnessError;

/// The environment variable naming the binaries' directory.
pub const ENV: &str = "TWINVOL_UPSTREAM_BIN";
/// Where `build-upstream.sh` puts them by default.
pub const DEFAULT_DIR: &str = "/var/cache/twinvol/upstream/bin";

/// The directory holding the upstream binaries.
#[derive(Debug, Clone)]
pub struct UpstreamBinaries {
    dir: PathBuf,
}

impl UpstreamBinaries {
    /// The directory from `TWINVOL_UPSTREAM_BIN`, or the default.
    pub fn from_env() -> Self {
        let dir = std::env::var_os(ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR));
        Self { dir }
    }

    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `name`, which must be an executable file.
    pub fn get(&self, name: &'static str) -> Result<PathBuf, HarnessError> {
        let path = self.dir.join(name);
        if is_executable(&path) {
            Ok(path)
        } else {
            Err(HarnessError::MissingUpstream { name, path })
        }
    }
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binary_error_says_how_to_build_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = UpstreamBinaries::in_dir(dir.path())
            .get("kube-apiserver")
            .expect_err("empty directory");
        let message = err.to_string();
        assert!(message.contains("e2e/tools/build-upstream.sh"), "{message}");
        assert!(message.contains("kube-apiserver"), "{message}");
    }

    #[test]
    fn non_executable_file_is_not_a_binary() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("etcd"), b"not a program").expect("write");
        assert!(UpstreamBinaries::in_dir(dir.path()).get("etcd").is_err());
    }
}
