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

/// Writes `entries` as `key=value` lines to `path`, atomically.
pub fn write_ready_file(path: &Path, entries: &[(&str, String)]) -> Result<(), ReadyFileError> {
    let mut text = String::new();
    for (k, v) in entries {
        text.push_str(k);
        text.push('=');
        text.push_str(v);
        text.push('\n');
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|source| ReadyFileError {
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
