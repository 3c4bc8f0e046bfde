//! A Kubernetes client from an explicit kubeconfig file, or else the usual
//! inference (in-cluster service account, `KUBECONFIG`, `~/.kube/config`).

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Why no client could be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("reading the kubeconfig {path}")]
    Read {
        path: String,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("inferring the cluster configuration (in-cluster or KUBECONFIG)")]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("building the client")]
    Build {
        #[source]
        source: kube::Error,
    },
}

/// The client for `kubeconfig`, or the inferred one.
///
/// Without kube's default retry layer: it retries a 429 up to 15 times,
/// honouring Retry-After, so an eviction a PodDisruptionBudget refuses
/// would hang the reconcile for minutes instead of being reported and
/// retried by the controller.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    let mut config = match kubeconfig {
        Some(path) => {
            let read = |source| ClientError::Read {
                path: path.display().to_string(),
                source,
            };
            let parsed = Kubeconfig::read_from(path).map_err(read)?;
            Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
                .await
                .map_err(read)?
        }
        None => Config::infer()
            .await
            .map_err(|source| ClientError::Infer { source })?,
    };
    config.default_retry = false;
    Client::try_from(config).map_err(|source| ClientError::Build { source })
}
