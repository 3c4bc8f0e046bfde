//! The node plugin's heartbeat: one `coordination.k8s.io/v1` Lease per node,
//! `twinvol-node-<node>` in the driver's namespace, renewed every period —
//! the one steady-state API write of a node, however many volumes it
//! serves (a frontend's liveness is its node's heartbeat).
//!
//! The contract with the operator: holderIdentity `<node>`, labels
//! `app.kubernetes.io/name=twinvol` and `twinvol.io/node=<node>` (and
//! `twinvol.io/site=<site>`), `leaseDurationSeconds` = the staleness
//! threshold. Observers judge staleness by how long they have seen no
//! change of the Lease on their own monotonic clock; `renewTime` is
//! written for humans. Each renewal also carries the node's pool space
//! (annotations `twinvol.io/pool-free-bytes`, `-total-bytes`), from which
//! the controller answers GetCapacity.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};

use crate::error::{CsiError, CsiResult};
use crate::names::{
    ANNOTATION_POOL_CAPACITY, ANNOTATION_POOL_FREE, ANNOTATION_POOL_TOTAL, LABEL_APP, LABEL_NODE,
    LABEL_SITE, node_lease_name,
};

/// How the heartbeat is kept.
#[derive(Debug, Clone)]
pub struct HeartbeatConfig {
    pub node: String,
    pub site: String,
    pub namespace: String,
    pub period: Duration,
    /// Written as `leaseDurationSeconds`: after this long without a
    /// change, observers take the node plugin for dead.
    pub stale_after: Duration,
    /// The pool whose space is reported.
    pub pool: PathBuf,
}

/// When the last renewal succeeded, for `/healthz`.
#[derive(Debug, Clone)]
pub struct HeartbeatHealth {
    base: Instant,
    last_ok_ms: Arc<AtomicU64>,
}

impl Default for HeartbeatHealth {
    fn default() -> Self {
        Self {
            base: Instant::now(),
            last_ok_ms: Arc::new(AtomicU64::new(u64::MAX)),
        }
    }
}

impl HeartbeatHealth {
    fn renewed(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.last_ok_ms.store(ms, Ordering::SeqCst);
    }

    /// How long ago the last renewal succeeded; `None` before the first.
    pub fn since_last(&self) -> Option<Duration> {
        let ms = self.last_ok_ms.load(Ordering::SeqCst);
        (ms != u64::MAX).then(|| {
            self.base
                .elapsed()
                .saturating_sub(Duration::from_millis(ms))
        })
    }
}

/// Free and total bytes of the filesystem holding `path`.
pub fn pool_space(path: &Path) -> CsiResult<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(path)
        .map_err(|e| CsiError::io("statvfs", path, std::io::Error::from_raw_os_error(e as i32)))?;
    let frag = st.fragment_size();
    Ok((st.blocks_available() * frag, st.blocks() * frag))
}

fn lease_object(config: &HeartbeatConfig, existing: Option<&Lease>) -> CsiResult<Lease> {
    let (free, total) = pool_space(&config.pool)?;
    let now = MicroTime(Timestamp::now());
    let mut lease = existing.cloned().unwrap_or_else(|| Lease {
        metadata: ObjectMeta {
            name: Some(node_lease_name(&config.node)),
            namespace: Some(config.namespace.clone()),
            ..Default::default()
        },
        spec: None,
    });
    let labels = lease.metadata.labels.get_or_insert_with(Default::default);
    labels.insert(LABEL_APP.0.into(), LABEL_APP.1.into());
    labels.insert(LABEL_NODE.into(), config.node.clone());
    labels.insert(LABEL_SITE.into(), config.site.clone());
    let annotations = lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default);
    annotations.insert(ANNOTATION_POOL_FREE.into(), free.to_string());
    annotations.insert(ANNOTATION_POOL_TOTAL.into(), total.to_string());
    // The operator's placement reads the usable size of the pool and
    // subtracts the replicas it placed there itself.
    annotations.insert(ANNOTATION_POOL_CAPACITY.into(), total.to_string());
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    if spec.holder_identity.as_deref() != Some(config.node.as_str()) {
        spec.acquire_time = Some(now.clone());
        spec.holder_identity = Some(config.node.clone());
    }
    spec.lease_duration_seconds =
        Some(i32::try_from(config.stale_after.as_secs().max(1)).unwrap_or(i32::MAX));
    spec.renew_time = Some(now);
    Ok(lease)
}

/// Renews once: creates the Lease, or replaces it (resourceVersion
/// precondition: a concurrent writer makes this renewal retry).
pub async fn renew(api: &Api<Lease>, config: &HeartbeatConfig) -> CsiResult<()> {
    let name = node_lease_name(&config.node);
    let existing = api
        .get_opt(&name)
        .await
        .map_err(|e| CsiError::kube(format!("reading Lease {name}"), e))?;
    let lease = lease_object(config, existing.as_ref())?;
    let result = match existing {
        Some(_) => api.replace(&name, &PostParams::default(), &lease).await,
        None => api.create(&PostParams::default(), &lease).await,
    };
    result
        .map(drop)
        .map_err(|e| CsiError::kube(format!("renewing Lease {name}"), e))
}

/// Renews every period until the task is dropped.
pub async fn run(client: Client, config: HeartbeatConfig, health: HeartbeatHealth) {
    let api: Api<Lease> = Api::namespaced(client, &config.namespace);
    let mut tick = tokio::time::interval(config.period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match tokio::time::timeout(config.period, renew(&api, &config)).await {
            Ok(Ok(())) => health.renewed(),
            Ok(Err(e)) => {
                tracing::warn!(error = %twinvol_engine::error_chain(&e), "heartbeat renewal failed")
            }
            Err(_) => tracing::warn!("heartbeat renewal timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_follows_the_contract() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = HeartbeatConfig {
            node: "node-a1".into(),
            site: "room-a".into(),
            namespace: "twinvol-system".into(),
            period: Duration::from_secs(10),
            stale_after: Duration::from_secs(40),
            pool: dir.path().to_owned(),
        };
        let lease = lease_object(&config, None).expect("built");
        assert_eq!(lease.metadata.name.as_deref(), Some("twinvol-node-node-a1"));
        let labels = lease.metadata.labels.clone().expect("labels");
        assert_eq!(labels["app.kubernetes.io/name"], "twinvol");
        assert_eq!(labels["twinvol.io/node"], "node-a1");
        let spec = lease.spec.clone().expect("spec");
        assert_eq!(spec.holder_identity.as_deref(), Some("node-a1"));
        assert_eq!(spec.lease_duration_seconds, Some(40));
        let free: u64 = lease.metadata.annotations.as_ref().expect("annotations")
            [ANNOTATION_POOL_FREE]
            .parse()
            .expect("a number");
        assert!(free > 0);
        let again = lease_object(&config, Some(&lease)).expect("renewed");
        assert_eq!(
            again.spec.as_ref().and_then(|s| s.acquire_time.clone()),
            spec.acquire_time,
            "acquired once"
        );
    }
}
