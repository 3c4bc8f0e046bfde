//! What every reconcile shares: the client, the Event recorder, the
//! metrics, the operator's monotonic clock and its observations, the
//! watch caches, and a little memory that is fine to lose on a restart
//! (when a volume was last moved home, the last eviction refusal).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Client;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::Store;
use twinvol_crds::{MirroredVolume, Site};

use crate::decide::{Mono, Timings};
use crate::metrics::Metrics;
use crate::observe::Tracker;
use crate::standby::Observations;

/// The operator's settings (flags).
#[derive(Clone, Debug)]
pub struct Config {
    /// Where the node plugins' heartbeat Leases and the leader Lease live.
    pub namespace: String,
    /// This replica's identity in the leader Lease and in Events.
    pub identity: String,
    pub timings: Timings,
}

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "twinvol-operator";

/// The watch caches.
#[derive(Clone)]
pub struct Stores {
    pub sites: Store<Site>,
    pub volumes: Store<MirroredVolume>,
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub claims: Store<PersistentVolumeClaim>,
    pub pvs: Store<PersistentVolume>,
    pub attachments: Store<VolumeAttachment>,
}

/// What the operator remembers between reconciles and may forget.
#[derive(Default, Debug)]
pub struct Memory {
    /// Pool capacity per node, from the heartbeat Leases' annotation.
    pub capacity: HashMap<String, u64>,
    /// The heartbeat's duration per node (`leaseDurationSeconds` of its
    /// heartbeat Lease): how long the node's frontends may acknowledge
    /// after its last renewal.
    pub heartbeat_duration: HashMap<String, std::time::Duration>,
    /// When each volume's pods were last evicted to move home.
    pub last_move_home: HashMap<String, Mono>,
    /// The last eviction refusal per volume.
    pub eviction_refused: HashMap<String, String>,
}

/// Shared by every reconcile.
pub struct Context {
    pub client: Client,
    pub config: Config,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub stores: Stores,
    clock: Instant,
    tracker: Arc<Mutex<Tracker>>,
    memory: Mutex<Memory>,
    synced: AtomicBool,
}

impl Context {
    pub fn new(
        client: Client,
        config: Config,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        stores: Stores,
    ) -> Self {
        let observations = Observations::new(config.timings.staleness);
        Self::with_observations(client, config, recorder, metrics, stores, observations)
    }

    /// Like [`Context::new`], on the clock and with the observations a
    /// standby made before it led ([`crate::standby`]).
    pub fn with_observations(
        client: Client,
        config: Config,
        recorder: Recorder,
        metrics: Arc<Metrics>,
        stores: Stores,
        observations: Observations,
    ) -> Self {
        Self {
            client,
            config,
            recorder,
            metrics,
            stores,
            clock: observations.clock,
            tracker: observations.tracker,
            memory: Mutex::new(Memory::default()),
            synced: AtomicBool::new(false),
        }
    }

    /// Now on the operator's monotonic clock.
    pub fn now(&self) -> Mono {
        Mono::from_duration(self.clock.elapsed())
    }

    /// Wall-clock milliseconds since the Unix epoch, for the record rules
    /// (which compare with the renewal times frontends write).
    pub fn wall_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }

    /// Every watch cache has been filled once: decisions may use them.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    pub fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn memory(&self) -> MutexGuard<'_, Memory> {
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }
}
