//! The heartbeat writer (see the parent module).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;
use twinvol_crds::NodeName;
use twinvol_csi_driver::arbiter::KubeArbiter;
use twinvol_engine::arbiter::FrontendId;
use twinvol_engine::clock::WallClock;
use twinvol_engine::frontend::lease::{self, LeaseConfig, LeaseState};

use crate::annotations;

/// What to keep alive.
#[derive(Clone, Debug)]
pub struct Options {
    /// The driver's namespace (heartbeat Leases).
    pub namespace: String,
    pub nodes: Vec<String>,
    pub period: Duration,
    /// `leaseDurationSeconds` of the heartbeat Leases (the staleness
    /// threshold, per the contract).
    pub duration_seconds: i32,
    /// Also renew each node's `kube-node-lease` Lease, as a kubelet does.
    pub kubelet_leases: bool,
    /// Pool capacity to announce, bytes.
    pub pool_capacity: Option<u64>,
    /// `(volume, node)`: hold the volume's frontend lease as from that node.
    pub frontends: Vec<(String, String)>,
    pub lease_duration: Duration,
    pub lease_margin: Duration,
}

async fn upsert(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    duration_seconds: i32,
    labels: BTreeMap<String, String>,
    annotations_: BTreeMap<String, String>,
) -> Result<(), kube::Error> {
    let now = MicroTime(Timestamp::now());
    let patch = json!({"spec": {"renewTime": now, "holderIdentity": holder}});
    match api
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    labels: Some(labels),
                    annotations: Some(annotations_),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.to_owned()),
                    lease_duration_seconds: Some(duration_seconds),
                    renew_time: Some(now.clone()),
                    acquire_time: Some(now),
                    ..LeaseSpec::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(()),
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

async fn beat_forever(client: Client, opts: Options) {
    let ours: Api<Lease> = Api::namespaced(client.clone(), &opts.namespace);
    let kubelet: Api<Lease> = Api::namespaced(client, "kube-node-lease");
    let mut tick = tokio::time::interval(opts.period);
    loop {
        tick.tick().await;
        for node in &opts.nodes {
            let labels = BTreeMap::from([
                (
                    annotations::HEARTBEAT_LABEL.0.to_owned(),
                    annotations::HEARTBEAT_LABEL.1.to_owned(),
                ),
                (annotations::HEARTBEAT_NODE_LABEL.to_owned(), node.clone()),
            ]);
            let notes: BTreeMap<String, String> = opts
                .pool_capacity
                .map(|c| (annotations::POOL_CAPACITY.to_owned(), c.to_string()))
                .into_iter()
                .collect();
            let name = annotations::heartbeat_lease_name(node);
            if let Err(e) = upsert(&ours, &name, node, opts.duration_seconds, labels, notes).await {
                eprintln!("heartbeat {name}: {e}");
            }
            if opts.kubelet_leases
                && let Err(e) =
                    upsert(&kubelet, node, node, 40, BTreeMap::new(), BTreeMap::new()).await
            {
                eprintln!("node lease {node}: {e}");
            }
        }
    }
}

async fn hold_frontend(client: Client, opts: Options, volume: String, node: String) {
    let Ok(node_name) = NodeName::new(node.clone()) else {
        eprintln!("frontend {volume}: bad node name {node}");
        return;
    };
    let arbiter = Arc::new(KubeArbiter::new(client, volume.clone(), node_name));
    let config = LeaseConfig {
        holder: FrontendId(format!("{node}/test-frontend-{}", std::process::id())),
        duration: opts.lease_duration,
        margin: opts.lease_margin,
        wall_clock: WallClock::system(),
        reclaim_own: false,
    };
    match lease::acquire(arbiter.as_ref(), &config, Duration::from_secs(300)).await {
        Ok((record, guard)) => {
            println!(
                "frontend {volume} acquired epoch {} on {node}",
                record.epoch.get()
            );
            let watch = guard.clone();
            let renewing = tokio::spawn(lease::renew(arbiter, config, guard));
            let _ = renewing.await;
            if watch.state() == LeaseState::Fenced {
                println!("frontend {volume} fenced");
            }
        }
        Err(e) => eprintln!("frontend {volume}: {e}"),
    }
}

/// Runs every heartbeat and frontend until the process is killed.
pub async fn run(client: Client, opts: Options) {
    let mut tasks = Vec::new();
    for (volume, node) in opts.frontends.clone() {
        tasks.push(tokio::spawn(hold_frontend(
            client.clone(),
            opts.clone(),
            volume,
            node,
        )));
    }
    beat_forever(client, opts).await;
}
