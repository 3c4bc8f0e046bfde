//! A standby's observations: what a replica that does not lead watches, so
//! that it can act at once when it takes over.
//!
//! Liveness is judged by how long the operator has *seen* no change (design
//! invariant 4, [`crate::observe`]): a value seen for the first time proves
//! nothing and counts as just changed. A standby that started watching only
//! when it won the leader Lease would therefore wait a whole staleness
//! threshold (and a frontend lease) after taking over before it could call
//! anything dead — and the leader is lost together with a site half of the
//! time, which is exactly when a fail-over is due. So a standby observes
//! what the leader observes, the same way (quorum lists of the heartbeat
//! Leases and of the MirroredVolumes, one per `period`), on the clock and
//! into the [`Tracker`] the controllers get when it leads.
//!
//! Nothing here writes: a standby's observations only shorten what its
//! own future decisions wait for; every write stays the leader's, behind
//! the compare-and-swaps of [`crate::ops`] (which re-read what they act on).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};
use twinvol_crds::MirroredVolume;

use crate::annotations;
use crate::decide::Mono;
use crate::gather;
use crate::observe::{self, Tracker};

/// The observations a standby hands to the controllers when it leads: its
/// monotonic clock's origin and its tracker.
#[derive(Clone, Debug)]
pub struct Observations {
    pub clock: Instant,
    pub tracker: Arc<Mutex<Tracker>>,
}

impl Observations {
    pub fn new(staleness: Duration) -> Self {
        Self {
            clock: Instant::now(),
            tracker: Arc::new(Mutex::new(Tracker::new(staleness))),
        }
    }

    fn now(&self) -> Mono {
        Mono::from_duration(self.clock.elapsed())
    }

    /// One round: every heartbeat Lease (`hb/<node>`, by resourceVersion)
    /// and every volume's frontend (`fe/<volume>`, by its fingerprint),
    /// keyed as the controllers key them. Returns how many of each.
    pub async fn observe_once(
        &self,
        client: &Client,
        namespace: &str,
    ) -> Result<(usize, usize), kube::Error> {
        let (k, v) = annotations::HEARTBEAT_LABEL;
        let leases = Api::<Lease>::namespaced(client.clone(), namespace)
            .list(&ListParams::default().labels(&format!("{k}={v}")))
            .await?;
        let volumes = Api::<MirroredVolume>::all(client.clone())
            .list(&ListParams::default())
            .await?;
        let now = self.now();
        let mut tracker = self.tracker.lock().unwrap_or_else(|e| e.into_inner());
        let mut beats = 0;
        for lease in &leases.items {
            let Some(node) = lease.labels().get(annotations::HEARTBEAT_NODE_LABEL) else {
                continue;
            };
            if lease.name_any() != annotations::heartbeat_lease_name(node) {
                continue;
            }
            let rv = lease.metadata.resource_version.clone().unwrap_or_default();
            tracker.observe(&observe::heartbeat_key(node), &rv, now);
            beats += 1;
        }
        let mut frontends = 0;
        for mv in &volumes.items {
            if let Some(fp) = gather::frontend_fingerprint(&gather::status(mv)) {
                tracker.observe(&observe::frontend_key(&mv.name_any()), &fp, now);
                frontends += 1;
            }
        }
        Ok((beats, frontends))
    }

    /// Observes every `period` until dropped (abort the task when leading).
    pub async fn watch(self, client: Client, namespace: String, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tick.tick().await;
            match self.observe_once(&client, &namespace).await {
                Ok((beats, frontends)) => {
                    if failing {
                        tracing::info!(beats, frontends, "standby observing again");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        tracing::warn!(error = %crate::error::chain(&e), "standby: listing heartbeats and volumes failed; retrying");
                    }
                    failing = true;
                }
            }
        }
    }
}
