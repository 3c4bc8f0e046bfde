//! Wiring: the HTTP endpoints, leader election through a
//! `coordination.k8s.io` Lease, the watch caches and the two controllers.
//!
//! Only the leader reconciles. Losing the lease ends [`run`] with
//! [`RunError::LostLeadership`] (the process exits and is restarted): the
//! next leader starts from what the API server holds, which is all the
//! state there is — every decision is level-triggered and every step that
//! must not happen twice (an epoch bump) is a compare-and-swap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{StreamExt, future};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::runtime::controller::{Action, Config as ControllerConfig, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use twinvol_crds::{MirroredVolume, Site};

use crate::context::{Config, Context, FIELD_MANAGER, Stores};
use crate::error::Error;
use crate::gather;
use crate::http::{self, Health};
use crate::metrics::Metrics;
use crate::standby::Observations;
use crate::{site_controller, volume_controller};

/// How the process runs.
#[derive(Clone, Debug)]
pub struct Options {
    pub config: Config,
    pub metrics_address: SocketAddr,
    /// The leader Lease's duration and how long before its end the leader
    /// renews it (whole seconds).
    pub leader_lease: Duration,
    pub leader_grace: Duration,
}

/// The leader Lease's name (in the operator's namespace).
pub const LEADER_LEASE: &str = "twinvol-operator";

/// Why the operator stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("serving the HTTP endpoints on {address}")]
    Http {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("leader election through Lease {namespace}/{LEADER_LEASE}")]
    Leader {
        namespace: String,
        #[source]
        source: kube_lease_manager::LeaseManagerError,
    },
    #[error(
        "lost the leader Lease {namespace}/{LEADER_LEASE}: stopping so that the new leader alone reconciles"
    )]
    LostLeadership { namespace: String },
}

/// How often a standby observes: as often as heartbeats change, at least
/// every second, so that its view is as fresh as the leader's.
fn standby_period(config: &Config) -> Duration {
    config
        .timings
        .heartbeat_period
        .min(Duration::from_secs(1))
        .max(Duration::from_millis(200))
}

fn watch_config() -> watcher::Config {
    watcher::Config::default()
}

/// Runs the operator until leadership is lost (or forever).
pub async fn run(client: Client, options: Options) -> Result<(), RunError> {
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health {
        metrics: metrics.clone(),
        ready: Default::default(),
    });
    let (listener, address) = http::bind(options.metrics_address)
        .await
        .map_err(|source| RunError::Http {
            address: options.metrics_address,
            source,
        })?;
    tracing::info!(%address, "serving /metrics, /healthz and /readyz");
    let http_task = tokio::spawn(http::serve(listener, health.clone()));

    let namespace = options.config.namespace.clone();
    let leader_error = |source| RunError::Leader {
        namespace: namespace.clone(),
        source,
    };
    let manager = LeaseManagerBuilder::new(client.clone(), LEADER_LEASE)
        .with_namespace(&namespace)
        .with_identity(&options.config.identity)
        .with_duration(options.leader_lease.as_secs().max(1))
        .with_grace(options.leader_grace.as_secs().max(1))
        .with_field_manager(FIELD_MANAGER)
        .build()
        .await
        .map_err(leader_error)?;
    let (mut leading, _lease_task) = manager.watch().await;
    health.ready.store(true, Ordering::Relaxed);
    // Observed while standing by, handed to the controllers when leading.
    let observations = Observations::new(options.config.timings.staleness);
    let standby = tokio::spawn(observations.clone().watch(
        client.clone(),
        namespace.clone(),
        standby_period(&options.config),
    ));
    tracing::info!(identity = %options.config.identity, "waiting to lead (observing heartbeats and frontends meanwhile)");
    while !*leading.borrow_and_update() {
        if leading.changed().await.is_err() {
            standby.abort();
            return Err(RunError::LostLeadership { namespace });
        }
    }
    standby.abort();
    tracing::info!(identity = %options.config.identity, "leading: starting the controllers");
    metrics.leader.set(1);

    let controllers = controllers(
        client,
        options.config.clone(),
        metrics.clone(),
        observations,
    );
    let lost = async {
        loop {
            if leading.changed().await.is_err() || !*leading.borrow_and_update() {
                return;
            }
        }
    };
    tokio::select! {
        () = controllers => {}
        () = lost => {}
    }
    metrics.leader.set(0);
    http_task.abort();
    Err(RunError::LostLeadership { namespace })
}

/// The watch caches and both controllers; runs until they end.
async fn controllers(
    client: Client,
    config: Config,
    metrics: Arc<Metrics>,
    observations: Observations,
) {
    let (nodes, nodes_w) = reflector::store::<Node>();
    let (pods, pods_w) = reflector::store::<Pod>();
    let (claims, claims_w) = reflector::store::<PersistentVolumeClaim>();
    let (pvs, pvs_w) = reflector::store::<PersistentVolume>();
    let (attachments, attachments_w) = reflector::store::<VolumeAttachment>();

    let node_stream = watcher(Api::<Node>::all(client.clone()), watch_config())
        .default_backoff()
        .reflect(nodes_w)
        .touched_objects();
    let pod_stream = watcher(Api::<Pod>::all(client.clone()), watch_config())
        .default_backoff()
        .reflect(pods_w)
        .touched_objects();
    let attachment_stream = watcher(Api::<VolumeAttachment>::all(client.clone()), watch_config())
        .default_backoff()
        .reflect(attachments_w)
        .touched_objects();
    let claim_drain = watcher(
        Api::<PersistentVolumeClaim>::all(client.clone()),
        watch_config(),
    )
    .default_backoff()
    .reflect(claims_w)
    .for_each(|_| future::ready(()));
    let pv_drain = watcher(Api::<PersistentVolume>::all(client.clone()), watch_config())
        .default_backoff()
        .reflect(pvs_w)
        .for_each(|_| future::ready(()));

    let site_controller = Controller::new(Api::<Site>::all(client.clone()), watch_config())
        .with_config(ControllerConfig::default().concurrency(4));
    let sites = site_controller.store();
    let volume_controller =
        Controller::new(Api::<MirroredVolume>::all(client.clone()), watch_config())
            .with_config(ControllerConfig::default().concurrency(8));
    let volumes = volume_controller.store();

    let stores = Stores {
        sites: sites.clone(),
        volumes: volumes.clone(),
        nodes: nodes.clone(),
        pods: pods.clone(),
        claims: claims.clone(),
        pvs: pvs.clone(),
        attachments: attachments.clone(),
    };
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "twinvol-operator".into(),
            instance: Some(config.identity.clone()),
        },
    );
    let ctx = Arc::new(Context::with_observations(
        client,
        config,
        recorder,
        metrics,
        stores,
        observations,
    ));

    let sites_for_nodes = sites.clone();
    let site_controller = site_controller.watches_stream(node_stream, move |node: Node| {
        sites_for_nodes
            .state()
            .into_iter()
            .filter(|s| gather::selects(s, node.labels()))
            .map(|s| ObjectRef::from_obj(&*s))
            .collect::<Vec<_>>()
    });

    let volumes_for_sites = volumes.clone();
    let (claims_for_pods, pvs_for_pods) = (claims.clone(), pvs.clone());
    let pvs_for_attachments = pvs.clone();
    let volume_controller = volume_controller
        .watches(
            Api::<Site>::all(ctx.client.clone()),
            watch_config(),
            move |site: Site| {
                let name = site.name_any();
                volumes_for_sites
                    .state()
                    .into_iter()
                    .filter(|v| v.spec.sites.iter().any(|s| s.as_str() == name))
                    .map(|v| ObjectRef::from_obj(&*v))
                    .collect::<Vec<_>>()
            },
        )
        .watches_stream(pod_stream, move |pod: Pod| {
            let claims = gather::claims_index(&claims_for_pods.state());
            let pvs = gather::pv_index(&pvs_for_pods.state());
            gather::volumes_of_pod(&pod, &claims, &pvs)
                .into_iter()
                .map(|v| ObjectRef::new(v.as_str()))
                .collect::<Vec<_>>()
        })
        .watches_stream(attachment_stream, move |va: VolumeAttachment| {
            let pvs = gather::pv_index(&pvs_for_attachments.state());
            gather::volume_of_attachment(&va, &pvs)
                .into_iter()
                .map(|v| ObjectRef::new(v.as_str()))
                .collect::<Vec<_>>()
        });

    let sync_ctx = ctx.clone();
    let sync = async move {
        let ready = futures::join!(
            sites.wait_until_ready(),
            volumes.wait_until_ready(),
            nodes.wait_until_ready(),
            pods.wait_until_ready(),
            claims.wait_until_ready(),
            pvs.wait_until_ready(),
            attachments.wait_until_ready(),
        );
        if ready.0.is_ok() && ready.1.is_ok() {
            tracing::info!("watch caches synced");
            sync_ctx.set_synced();
        }
    };

    let sites_run = site_controller
        .run(site_controller::reconcile, site_error_policy, ctx.clone())
        .for_each(|_| future::ready(()));
    let volumes_run = volume_controller
        .run(
            volume_controller::reconcile,
            volume_error_policy,
            ctx.clone(),
        )
        .for_each(|_| future::ready(()));
    futures::join!(sync, sites_run, volumes_run, claim_drain, pv_drain);
}

fn requeue_for(error: &Error) -> Action {
    match error.class() {
        "conflict" | "lease-alive" => Action::requeue(Duration::from_millis(300)),
        "invalid" | "record" => Action::requeue(Duration::from_secs(60)),
        _ => Action::requeue(Duration::from_secs(2)),
    }
}

fn site_error_policy(site: Arc<Site>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(site_controller::NAME, error.class());
    volume_controller::log_failure(site_controller::NAME, &site.name_any(), error);
    requeue_for(error)
}

fn volume_error_policy(mv: Arc<MirroredVolume>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(volume_controller::NAME, error.class());
    volume_controller::log_failure(volume_controller::NAME, &mv.name_any(), error);
    requeue_for(error)
}
