//! The operator's Prometheus metrics (prometheus-client), served on
//! `/metrics` by [`crate::http`].
//!
//! - `twinvol_operator_reconcile_runs_total{controller}`
//! - `twinvol_operator_reconcile_failures_total{controller,class}`
//! - `twinvol_operator_volumes{state}`: volumes by state (Synced, Degraded,
//!   Resyncing, FailoverBlocked, Unplaced, Deleting)
//! - `twinvol_operator_failovers_total`: epoch bumps of a lost site's
//!   volumes; `twinvol_operator_promotions_total`: overrides carried out
//! - `twinvol_operator_resync_bytes_remaining{volume,site}`
//! - `twinvol_operator_leader`: 1 while this replica is the leader
//! - `twinvol_operator_sites_fenced`: Sites whose status says fenced

use std::collections::HashMap;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::decide::volume::VolumeState;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControllerLabels {
    pub controller: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: String,
    pub class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub state: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResyncLabels {
    pub volume: String,
    pub site: String,
}

/// The metric families, registered once.
pub struct Metrics {
    registry: Registry,
    runs: Family<ControllerLabels, Counter>,
    failures: Family<FailureLabels, Counter>,
    volumes: Family<StateLabels, Gauge>,
    pub failovers: Counter,
    pub promotions: Counter,
    resync: Family<ResyncLabels, Gauge>,
    pub leader: Gauge,
    pub sites_fenced: Gauge,
    states: Mutex<HashMap<String, VolumeState>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("twinvol_operator");
        let runs = Family::<ControllerLabels, Counter>::default();
        registry.register("reconcile_runs", "Reconcile runs", runs.clone());
        let failures = Family::<FailureLabels, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Failed reconcile runs by error class",
            failures.clone(),
        );
        let volumes = Family::<StateLabels, Gauge>::default();
        registry.register("volumes", "MirroredVolumes by state", volumes.clone());
        let failovers = Counter::default();
        registry.register(
            "failovers",
            "Epoch bumps of volumes whose frontend was on a lost site",
            failovers.clone(),
        );
        let promotions = Counter::default();
        registry.register(
            "promotions",
            "Out-of-sync replicas promoted by the audited override",
            promotions.clone(),
        );
        let resync = Family::<ResyncLabels, Gauge>::default();
        registry.register(
            "resync_bytes_remaining",
            "Bytes a replica's resync still has to copy, as its node plugin reports",
            resync.clone(),
        );
        let leader = Gauge::default();
        registry.register("leader", "1 while this replica leads", leader.clone());
        let sites_fenced = Gauge::default();
        registry.register("sites_fenced", "Sites fenced", sites_fenced.clone());
        for state in VolumeState::ALL {
            volumes
                .get_or_create(&StateLabels {
                    state: state.as_str().into(),
                })
                .set(0);
        }
        Self {
            registry,
            runs,
            failures,
            volumes,
            failovers,
            promotions,
            resync,
            leader,
            sites_fenced,
            states: Mutex::new(HashMap::new()),
        }
    }

    pub fn reconciled(&self, controller: &str) {
        self.runs
            .get_or_create(&ControllerLabels {
                controller: controller.into(),
            })
            .inc();
    }

    pub fn failed(&self, controller: &str, class: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                controller: controller.into(),
                class: class.into(),
            })
            .inc();
    }

    /// Records a volume's state (`None`: the volume is gone).
    pub fn volume_state(&self, volume: &str, state: Option<VolumeState>) {
        let mut states = self.states.lock().unwrap_or_else(|e| e.into_inner());
        match state {
            Some(s) => {
                states.insert(volume.to_owned(), s);
            }
            None => {
                states.remove(volume);
            }
        }
        for s in VolumeState::ALL {
            let n = states.values().filter(|v| **v == s).count();
            self.volumes
                .get_or_create(&StateLabels {
                    state: s.as_str().into(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn resync_remaining(&self, volume: &str, site: &str, bytes: Option<u64>) {
        let labels = ResyncLabels {
            volume: volume.into(),
            site: site.into(),
        };
        match bytes {
            Some(b) => {
                self.resync
                    .get_or_create(&labels)
                    .set(i64::try_from(b).unwrap_or(i64::MAX));
            }
            None => {
                self.resync.remove(&labels);
            }
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_counted_by_state_and_forgotten_when_gone() {
        let m = Metrics::new();
        m.volume_state("a", Some(VolumeState::Synced));
        m.volume_state("b", Some(VolumeState::Degraded));
        m.volume_state("b", Some(VolumeState::Synced));
        let text = m.encode();
        assert!(
            text.contains("twinvol_operator_volumes{state=\"Synced\"} 2"),
            "{text}"
        );
        m.volume_state("a", None);
        assert!(
            m.encode()
                .contains("twinvol_operator_volumes{state=\"Synced\"} 1")
        );
        m.failed("site", "conflict");
        assert!(m.encode().contains(
            "twinvol_operator_reconcile_failures_total{controller=\"site\",class=\"conflict\"} 1"
        ));
    }
}
