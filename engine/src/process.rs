//! What every engine process needs around its real work: a ready file that
//! tells scripts and tests where it listens, and the shutdown signal.
//!
//! The ready file is written once the process serves (atomically: write a
//! temporary file, then rename), as `key=value` lines, so that a caller that
//! asked for port 0 learns the port without parsing logs.

use std::path::{Path, PathBuf};

/// Why the ready file could not be written.
#[derive(Debug, thiserror::Error)]
#[error("cannot write the ready file {path}")]
pub struct ReadyFileError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// The temporary file an atomic write of `path` goes through: named after
/// the whole file name and this process, so that two files of one
/// directory (`replica.ready`, written by a child, and `replica.pid`, by
/// its parent) never share one — `with_extension("tmp")` gave both
/// `replica.tmp`, and one rename then failed with ENOENT.
fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` through a temporary file ([`temp_path`]) and a
/// rename: a reader sees the old content or the new, never a part.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path))
}

/// Writes `entries` as `key=value` lines to `path`, atomically.
pub fn write_ready_file(path: &Path, entries: &[(&str, String)]) -> Result<(), ReadyFileError> {
    let mut text = String::new();
    for (k, v) in entries {
        text.push_str(k);
        text.push('=');
        text.push_str(v);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes()).map_err(|source| ReadyFileError {
        path: path.to_owned(),
        source,
    })
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = async {
        match signal(SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}

#[cfg(test)]
mod temp_path_tests {
    use super::*;

    #[test]
    fn two_files_of_one_directory_never_share_a_temporary_file() {
        let a = temp_path(Path::new("/x/replica.pid"));
        let b = temp_path(Path::new("/x/replica.ready"));
        assert_ne!(a, b);
        assert_eq!(a.parent(), Some(Path::new("/x")));
        assert!(a.to_string_lossy().ends_with(".tmp"));
    }
}
