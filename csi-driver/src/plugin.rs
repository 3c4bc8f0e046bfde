//! The processes of `twinvol-csi`, wired up: [`run_controller`],
//! [`run_node`], and the data-plane processes the node starts,
//! [`run_frontend`] and [`run_replica`]. `main.rs` parses flags into these
//! options and calls one of them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kube::Client;
use kube::config::{KubeConfigOptions, Kubeconfig};
use tonic::transport::Server;

use crate::controller::ControllerService;
use crate::dataplane::process::InstanceLock;
use crate::dataplane::{self, FrontendSpec, ReplicaServerSpec};
use crate::error::{CsiError, CsiResult};
use crate::heartbeat::{self, HeartbeatConfig, HeartbeatHealth};
use crate::identity::{IdentityService, Readiness};
use crate::node::replicas::ReplicaSupervisor;
use crate::node::{NodeConfig, NodeService, site};
use crate::proto::csi::controller_server::ControllerServer;
use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;
use crate::proto::registration::registration_server::RegistrationServer;
use crate::registration::{self, RegistrationService, RegistrationState};
use crate::{authority, health, server};

/// The environment variable naming the data plane's own API credentials
/// (`--dataplane-credentials`): a directory with `token` and `ca.crt`.
pub const DATAPLANE_CREDENTIALS_ENV: &str = "TWINVOL_DATAPLANE_CREDENTIALS";

/// A client from `kubeconfig`, else from the data plane's credentials
/// (`TWINVOL_DATAPLANE_CREDENTIALS`), else the usual places (`KUBECONFIG`,
/// the in-cluster service account).
///
/// Why the data plane has credentials of its own: the in-cluster token is
/// bound to the node plugin's pod and stops authenticating when that pod
/// is deleted — in every rolling upgrade of the DaemonSet — while the
/// frontends and the heartbeat renewer it started run on and must still
/// renew the heartbeat and update their volumes' records. The chart
/// mounts a `kubernetes.io/service-account-token` Secret of the node's
/// ServiceAccount (valid while the Secret exists, bound to no pod) and
/// names it here; every data-plane process reads it from the mount of the
/// container it was started from.
pub async fn kube_client(kubeconfig: Option<&Path>) -> CsiResult<Client> {
    let internal = |detail: String| CsiError::Internal { detail };
    let credentials = std::env::var_os(DATAPLANE_CREDENTIALS_ENV).filter(|d| !d.is_empty());
    let config = match (kubeconfig, credentials) {
        (Some(path), _) => {
            let parsed = Kubeconfig::read_from(path)
                .map_err(|e| internal(format!("kubeconfig {}: {e}", path.display())))?;
            kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
                .await
                .map_err(|e| internal(format!("kubeconfig {}: {e}", path.display())))?
        }
        (None, Some(dir)) => {
            let dir = PathBuf::from(dir);
            let parsed = dataplane_kubeconfig(&dir)?;
            kube::Config::from_custom_kubeconfig(parsed, &KubeConfigOptions::default())
                .await
                .map_err(|e| internal(format!("credentials in {}: {e}", dir.display())))?
        }
        (None, None) => kube::Config::infer()
            .await
            .map_err(|e| internal(format!("no Kubernetes configuration found: {e}")))?,
    };
    Client::try_from(config).map_err(|e| internal(format!("cannot build a Kubernetes client: {e}")))
}

/// A kubeconfig for the API server of the in-cluster environment
/// (`KUBERNETES_SERVICE_HOST`/`_PORT`) with the token and CA of `dir`.
fn dataplane_kubeconfig(dir: &Path) -> CsiResult<Kubeconfig> {
    use kube::config::{AuthInfo, Cluster, Context, NamedAuthInfo, NamedCluster, NamedContext};
    let missing = |what: &str| CsiError::Internal {
        detail: format!("{DATAPLANE_CREDENTIALS_ENV}={}: {what}", dir.display()),
    };
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .map_err(|_| missing("KUBERNETES_SERVICE_HOST is not set (not in a pod?)"))?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    for file in ["token", "ca.crt"] {
        let path = dir.join(file);
        if !std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            return Err(missing(&format!("{} is missing or empty", path.display())));
        }
    }
    let name = "twinvol-dataplane".to_owned();
    Ok(Kubeconfig {
        clusters: vec![NamedCluster {
            name: name.clone(),
            cluster: Some(Cluster {
                server: Some(format!("https://{host}:{port}")),
                certificate_authority: Some(dir.join("ca.crt").display().to_string()),
                ..Cluster::default()
            }),
            ..NamedCluster::default()
        }],
        auth_infos: vec![NamedAuthInfo {
            name: name.clone(),
            auth_info: Some(AuthInfo {
                token_file: Some(dir.join("token").display().to_string()),
                ..AuthInfo::default()
            }),
            ..NamedAuthInfo::default()
        }],
        contexts: vec![NamedContext {
            name: name.clone(),
            context: Some(Context {
                cluster: name.clone(),
                user: Some(name.clone()),
                namespace: std::fs::read_to_string(dir.join("namespace"))
                    .ok()
                    .map(|n| n.trim().to_owned())
                    .filter(|n| !n.is_empty()),
                ..Context::default()
            }),
            ..NamedContext::default()
        }],
        current_context: Some(name),
        ..Kubeconfig::default()
    })
}

/// Options of `--mode controller`.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    pub endpoint: String,
    pub namespace: String,
    pub kubeconfig: Option<PathBuf>,
    pub health_listen: Option<SocketAddr>,
    /// The node label naming its Site when no Site's selector matches.
    pub zone_label: String,
}

/// Serves the Identity and Controller services (and NodeGetCapabilities,
/// for external-resizer) until SIGTERM.
pub async fn run_controller(opts: ControllerOptions) -> CsiResult<()> {
    let client = kube_client(opts.kubeconfig.as_deref()).await?;
    let ready = Readiness::new();
    let socket = server::socket_path(&opts.endpoint)?;
    let listener = server::bind(&socket)?;
    let router = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(ready.clone())))
        .add_service(ControllerServer::new(ControllerService::new(
            client.clone(),
            &opts.namespace,
            &opts.zone_label,
        )))
        // external-resizer asks this socket for the node's capabilities.
        .add_service(NodeServer::new(crate::node::CapabilitiesOnly));
    let serving = tokio::spawn(server::serve(
        router,
        listener,
        twinvol_engine::process::shutdown_signal(),
    ));
    if let Some(addr) = opts.health_listen {
        let r = ready.clone();
        let check: health::Check = Arc::new(move || {
            if r.get() {
                Ok(())
            } else {
                Err("starting".into())
            }
        });
        let (bound, _task) = health::serve(addr, check).await?;
        tracing::info!(%bound, "serving /healthz");
    }
    // Ready once the API server answers.
    let mut delay = Duration::from_millis(200);
    loop {
        match client.apiserver_version().await {
            Ok(_) => break,
            Err(e) => {
                tracing::warn!(error = %e, "the API server does not answer yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
    ready.set(true);
    tracing::info!(socket = %socket.display(), "controller ready");
    serving.await.map_err(|e| CsiError::Internal {
        detail: e.to_string(),
    })?
}

/// Options of `--mode node`.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    pub node: NodeConfig,
    pub endpoint: String,
    pub kubeconfig: Option<PathBuf>,
    /// kubelet's `--root-dir`; `None`: do not register with kubelet.
    pub kubelet_dir: Option<PathBuf>,
    pub health_listen: Option<SocketAddr>,
    pub heartbeat_period: Duration,
    pub heartbeat_stale_after: Duration,
}

/// Serves the Identity and Node services, the registration socket and
/// `/healthz`, keeps the node's heartbeat process running and runs the
/// replicas placed here, until SIGTERM. Data-plane processes (the
/// heartbeat's included) keep running after it exits.
pub async fn run_node(opts: NodeOptions) -> CsiResult<()> {
    let client = kube_client(opts.kubeconfig.as_deref()).await?;
    let config = opts.node.clone();
    let ready = Readiness::new();
    let registration_state = RegistrationState::default();
    let heartbeat_health = HeartbeatHealth::new(heartbeat::report_path(&config.state_dir));
    if let Some(addr) = opts.health_listen {
        let (r, reg, hb, stale) = (
            ready.clone(),
            registration_state.clone(),
            heartbeat_health.clone(),
            opts.heartbeat_stale_after,
        );
        let check: health::Check = Arc::new(move || {
            if !r.get() {
                return Err("starting: looking for the node's Site".into());
            }
            if let Some(Err(e)) = reg.get() {
                return Err(format!("kubelet refused the registration: {e}"));
            }
            match hb.since_last() {
                Some(age) if age <= stale => Ok(()),
                Some(age) => Err(format!("the heartbeat was last renewed {age:?} ago")),
                None => Err("the heartbeat was never renewed".into()),
            }
        });
        let (bound, _task) = health::serve(addr, check).await?;
        tracing::info!(%bound, "serving /healthz");
    }

    let found = loop {
        match site::find(&client, config.node.as_str(), &config.zone_label).await {
            Ok(site) => break site,
            Err(e) => {
                tracing::warn!(error = %twinvol_engine::error_chain(&e), "cannot tell this node's Site yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    };
    let site_name =
        twinvol_crds::SiteName::new(kube::ResourceExt::name_any(&found)).map_err(|e| {
            CsiError::Internal {
                detail: e.to_string(),
            }
        })?;
    tracing::info!(site = %site_name, pool = %found.spec.pool, "this node's Site");
    let supervisor = ReplicaSupervisor::new(
        client.clone(),
        config.clone(),
        site_name.clone(),
        found.spec.pool.as_str(),
    );
    let pool_root = supervisor.pool_root().to_owned();
    std::fs::create_dir_all(&pool_root)
        .map_err(|e| CsiError::io("creating directory", &pool_root, e))?;
    tokio::spawn(supervisor.run());
    let heartbeat = HeartbeatConfig {
        node: config.node.to_string(),
        site: site_name.to_string(),
        namespace: config.namespace.clone(),
        period: opts.heartbeat_period,
        stale_after: opts.heartbeat_stale_after,
        pool: pool_root,
        report: heartbeat::report_path(&config.state_dir),
        wall_clock_offset_ms: 0,
    };
    let heartbeat_files = heartbeat::process_files(&config.state_dir);
    heartbeat::record_service(&config.state_dir)?;
    heartbeat::ensure(&config.launch, &heartbeat_files, &heartbeat).await?;
    tokio::spawn(heartbeat::supervise(
        config.launch.clone(),
        heartbeat_files,
        heartbeat,
    ));

    let socket = server::socket_path(&opts.endpoint)?;
    let listener = server::bind(&socket)?;
    let node = NodeService::new(config.clone(), client.clone(), site_name);
    let router = Server::builder()
        .add_service(IdentityServer::new(IdentityService::new(ready.clone())))
        .add_service(NodeServer::new(node));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(server::serve(
        router,
        listener,
        twinvol_engine::process::shutdown_signal(),
    ));
    if let Some(kubelet_dir) = &opts.kubelet_dir {
        let reg_socket = registration::socket_path(kubelet_dir);
        let reg_listener = server::bind(&reg_socket)?;
        let reg = Server::builder().add_service(RegistrationServer::new(RegistrationService::new(
            socket.clone(),
            registration_state,
        )));
        tracing::info!(socket = %reg_socket.display(), "serving kubelet plugin registration");
        tasks.spawn(authority::serve(
            reg,
            reg_listener,
            twinvol_engine::process::shutdown_signal(),
        ));
    }
    ready.set(true);
    tracing::info!(socket = %socket.display(), "node plugin ready");
    // The first server to stop (SIGTERM reaches both) ends the plugin.
    match tasks.join_next().await {
        Some(Ok(result)) => result,
        Some(Err(e)) => Err(CsiError::Internal {
            detail: e.to_string(),
        }),
        None => Ok(()),
    }
}

/// `--mode frontend --spec FILE`.
pub async fn run_frontend(spec: &Path) -> CsiResult<()> {
    let _single = InstanceLock::take(spec)?;
    let spec: FrontendSpec = read_spec(spec)?;
    let client = kube_client(None).await?;
    dataplane::frontend::run(spec, client)
        .await
        .map_err(|e| CsiError::Internal {
            detail: twinvol_engine::error_chain(&e),
        })
}

/// `--mode heartbeat --spec FILE`: renews the node's heartbeat Lease and
/// reports each renewal on the node, until SIGTERM or killed.
pub async fn run_heartbeat(spec: &Path) -> CsiResult<()> {
    let _single = InstanceLock::take(spec)?;
    let config: HeartbeatConfig = read_spec(spec)?;
    let client = kube_client(None).await?;
    tracing::info!(node = %config.node, period = ?config.period, duration = ?config.stale_after, "renewing the node heartbeat");
    let orphan = heartbeat::Orphan::for_spec(spec);
    tokio::select! {
        () = heartbeat::run(client, config, orphan) => Ok(()),
        () = twinvol_engine::process::shutdown_signal() => Ok(()),
    }
}

/// `--mode replica --spec FILE`.
pub async fn run_replica(spec: &Path) -> CsiResult<()> {
    let _single = InstanceLock::take(spec)?;
    let spec: ReplicaServerSpec = read_spec(spec)?;
    dataplane::replica::run(spec)
        .await
        .map_err(|e| CsiError::Internal {
            detail: twinvol_engine::error_chain(&e),
        })
}

fn read_spec<T: serde::de::DeserializeOwned>(path: &Path) -> CsiResult<T> {
    let text = std::fs::read(path).map_err(|e| CsiError::io("reading", path, e))?;
    serde_json::from_slice(&text).map_err(|e| CsiError::Internal {
        detail: format!("{} is unreadable: {e}", path.display()),
    })
}

/// glibc gives each allocating thread its own arena; the FUSE workers and
/// the runtime's threads then keep tens of MiB of freed buffers each (see
/// the engine's frontend). Two arenas halve a frontend's resident memory.
/// Must run before any thread starts.
pub fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets a malloc tunable; called before any other
    // thread exists.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
    if ok != 1 {
        tracing::debug!("mallopt(M_ARENA_MAX) not applied");
    }
}
