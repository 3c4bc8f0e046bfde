//! The harness's error type: every variant names the component or file that
//! failed, and for a component that never became ready it carries the tail of
//! that component's log, so a failing test shows why without digging.

use std::{io, path::PathBuf, time::Duration};

#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error(
        "upstream binary {name} not found at {path}; build the pinned Kubernetes components with \
         `bash e2e/tools/build-upstream.sh` (or point TWINVOL_UPSTREAM_BIN at their directory)"
    )]
    MissingUpstream { name: &'static str, path: PathBuf },

    #[error("generating the {what} certificate or key")]
    Certificate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },

    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error("finding a free loopback port")]
    NoFreePort(#[source] io::Error),

    #[error("starting {component} ({path})")]
    Spawn {
        component: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    #[error(
        "{component} exited before it was ready ({status}); last lines of its log:\n{log_tail}"
    )]
    ExitedEarly {
        component: String,
        status: String,
        log_tail: String,
    },

    #[error("{what} not ready after {waited:?}; last seen: {last}\n{log_tail}")]
    NotReady {
        what: String,
        waited: Duration,
        last: String,
        log_tail: String,
    },

    #[error("building a Kubernetes client from {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("kubectl {args} failed ({status}): {stderr}")]
    KubectlFailed {
        args: String,
        status: String,
        stderr: String,
    },

    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },

    #[error("cluster slot: {0}")]
    Slot(String),

    #[error("{0}")]
    Cluster(String),

    #[error("invalid {option}: {value:?}")]
    InvalidOption { option: &'static str, value: String },

    #[error("running kubectl {args}")]
    Kubectl {
        args: String,
        #[source]
        source: io::Error,
    },
}
