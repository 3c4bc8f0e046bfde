//! [`KubeArbiter`]: the engine's [`Arbiter`] over one MirroredVolume, through
//! the Kubernetes API (see the parent module for the field mapping).
//!
//! `update` reads the object, checks that its resourceVersion is still the
//! expected one, applies the engine's own rules to the record read
//! ([`VolumeRecord::apply`], never re-implemented here), and replaces the
//! status subresource with `metadata.resourceVersion` set to the expected
//! version: the API server accepts the write only if nobody wrote the object
//! in between (HTTP 409 otherwise), so two frontends that read the same
//! version can never both swap — whatever this process checked before.
//!
//! Every call has one deadline ([`KubeArbiter::with_timeout`], 3 s by
//! default) covering all its requests: a frontend cut off from the API
//! server gets [`ArbiterError::Unreachable`] in time to hold I/O and let its
//! lease run out, instead of hanging in a TCP retransmit.
//!
//! With [`KubeArbiter::with_heartbeat`] the holder's liveness is its node's
//! heartbeat (see the parent module): [`Arbiter::last_heartbeat`] reads the
//! node-local report (a file, no API call), and [`Arbiter::liveness`] reads
//! the holder node's heartbeat Lease for an observer.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease as KubeLease;
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, Error as KubeError};
use twinvol_crds::{MirroredVolume, NodeName};
use twinvol_engine::arbiter::{
    Arbiter, ArbiterError, Change, HeartbeatRenewal, Lease, Liveness, Version, VolumeRecord,
};

use crate::heartbeat::HeartbeatReport;
use crate::names::node_lease_name;

use super::mapping::{self, MappingError};

/// The arbiter record of one MirroredVolume, in its status.
#[derive(Clone)]
pub struct KubeArbiter {
    api: Api<DynamicObject>,
    client: Client,
    volume: String,
    node: NodeName,
    timeout: Duration,
    heartbeat: Option<NodeHeartbeat>,
}

/// Where the node heartbeat is found: this node's report, every node's
/// Lease.
#[derive(Clone)]
struct NodeHeartbeat {
    report: PathBuf,
    leases: Api<KubeLease>,
}

impl std::fmt::Debug for KubeArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeArbiter")
            .field("volume", &self.volume)
            .field("node", &self.node)
            .field("timeout", &self.timeout)
            .field(
                "heartbeat_report",
                &self
                    .heartbeat
                    .as_ref()
                    .map(|h| h.report.display().to_string()),
            )
            .finish_non_exhaustive()
    }
}

impl KubeArbiter {
    /// The deadline of one arbiter call unless [`Self::with_timeout`] says
    /// otherwise: well below a lease's duration (10 s by default), so that a
    /// renewal that gets no answer leaves time for the next attempt.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(3);

    /// The arbiter of the MirroredVolume named `volume` (cluster-scoped),
    /// used by the frontend on `node`: a lease acquired through this handle
    /// records `node` as `status.frontend.node`.
    pub fn new(client: Client, volume: impl Into<String>, node: NodeName) -> Self {
        let resource = ApiResource::erase::<MirroredVolume>(&());
        Self {
            api: Api::all_with(client.clone(), &resource),
            client,
            volume: volume.into(),
            node,
            timeout: Self::DEFAULT_TIMEOUT,
            heartbeat: None,
        }
    }

    /// Holders prove liveness by their node's heartbeat: this node's
    /// renewals are read from `report` (written by the node's heartbeat
    /// process), other nodes' heartbeat Leases from `namespace`. Lease
    /// holders are named after their node (as the node plugin's frontends
    /// are).
    pub fn with_heartbeat(mut self, report: PathBuf, namespace: &str) -> Self {
        self.heartbeat = Some(NodeHeartbeat {
            report,
            leases: Api::namespaced(self.client.clone(), namespace),
        });
        self
    }

    /// Bounds every call (all of its requests together) by `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn volume(&self) -> &str {
        &self.volume
    }

    pub fn node(&self) -> &NodeName {
        &self.node
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn read_now(&self) -> Result<VolumeRecord, ArbiterError> {
        let object = self.get().await?;
        mapping::record_from(&object).map_err(|e| self.corrupt(&e))
    }

    async fn update_now(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        let mut object = self.get().await?;
        let current = mapping::record_from(&object).map_err(|e| self.corrupt(&e))?;
        if current.version != *expected {
            return Err(ArbiterError::Conflict {
                expected: expected.clone(),
                current: Box::new(current),
            });
        }
        // The API server assigns the next resourceVersion; the record
        // returned is the one read back from its answer, not this one.
        let next = current.apply(change, expected.clone())?;
        let status = mapping::status_after(&object, &current, &next, &self.node)
            .map_err(|e| self.corrupt(&e))?;
        object.data["status"] = status;
        object.metadata.resource_version = Some(expected.0.clone());
        match self
            .api
            .replace_status(&self.volume, &PostParams::default(), &object)
            .await
        {
            Ok(written) => mapping::record_from(&written).map_err(|e| self.corrupt(&e)),
            Err(KubeError::Api(status)) if status.code == 409 => {
                tracing::debug!(volume = %self.volume, expected = %expected, "status write lost the compare-and-swap");
                Err(ArbiterError::Conflict {
                    expected: expected.clone(),
                    current: Box::new(self.read_now().await?),
                })
            }
            Err(e) => Err(self.classify(e)),
        }
    }

    async fn get(&self) -> Result<DynamicObject, ArbiterError> {
        self.api
            .get(&self.volume)
            .await
            .map_err(|e| self.classify(e))
    }

    /// What a failed request means for the caller. Only answers that say
    /// the object itself is wrong are `Corrupt`; everything that may pass
    /// (no connection, 5xx, throttling, an expired credential) is
    /// `Unreachable`, so that the frontend holds I/O and retries.
    fn classify(&self, error: KubeError) -> ArbiterError {
        match &error {
            KubeError::Api(status) if status.code == 404 => ArbiterError::Corrupt {
                location: self.location(),
                reason: "the MirroredVolume does not exist (deleted while in use?)".into(),
            },
            KubeError::Api(status) if matches!(status.code, 400 | 422) => ArbiterError::Corrupt {
                location: self.location(),
                reason: format!("the API server refused the status: {}", status.message),
            },
            KubeError::SerdeError(e) => ArbiterError::Corrupt {
                location: self.location(),
                reason: format!("the API server's answer is not a MirroredVolume: {e}"),
            },
            _ => ArbiterError::Unreachable {
                location: self.location(),
                source: io::Error::other(error),
            },
        }
    }

    fn timed_out(&self) -> ArbiterError {
        ArbiterError::Unreachable {
            location: self.location(),
            source: io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer from the API server within {:?}", self.timeout),
            ),
        }
    }

    fn corrupt(&self, error: &MappingError) -> ArbiterError {
        ArbiterError::Corrupt {
            location: self.location(),
            reason: error.to_string(),
        }
    }

    fn location(&self) -> String {
        format!("MirroredVolume {}", self.volume)
    }
}

impl Arbiter for KubeArbiter {
    async fn read(&self) -> Result<VolumeRecord, ArbiterError> {
        tokio::time::timeout(self.timeout, self.read_now())
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    async fn update(
        &self,
        expected: &Version,
        change: Change,
    ) -> Result<VolumeRecord, ArbiterError> {
        tokio::time::timeout(self.timeout, self.update_now(expected, change))
            .await
            .unwrap_or_else(|_| Err(self.timed_out()))
    }

    fn node_heartbeat(&self) -> bool {
        self.heartbeat.is_some()
    }

    async fn last_heartbeat(&self) -> Result<HeartbeatRenewal, ArbiterError> {
        let Some(hb) = &self.heartbeat else {
            return Err(self.no_heartbeat("no node heartbeat configured".into()));
        };
        let report = HeartbeatReport::read(&hb.report)
            .map_err(|e| self.no_heartbeat(twinvol_engine::error_chain(&e)))?;
        if report.node != self.node.as_str() {
            return Err(self.no_heartbeat(format!(
                "the report {} is node {}'s, not {}'s",
                hb.report.display(),
                report.node,
                self.node
            )));
        }
        Ok(HeartbeatRenewal {
            sent: report.sent(),
            duration: report.duration(),
        })
    }

    async fn liveness(&self, lease: &Lease) -> Result<Liveness, ArbiterError> {
        let Some(hb) = &self.heartbeat else {
            return Ok(Liveness {
                token: String::new(),
                duration: lease.duration,
            });
        };
        let name = node_lease_name(&lease.holder.0);
        let read = tokio::time::timeout(self.timeout, hb.leases.get_opt(&name)).await;
        match read {
            Ok(Ok(Some(l))) => {
                let seconds = l
                    .spec
                    .as_ref()
                    .and_then(|s| s.lease_duration_seconds)
                    .and_then(|s| u64::try_from(s).ok())
                    .unwrap_or(0);
                Ok(Liveness {
                    token: format!(
                        "{}|{}",
                        l.metadata.resource_version.unwrap_or_default(),
                        l.spec.and_then(|s| s.holder_identity).unwrap_or_default()
                    ),
                    duration: lease.duration.max(Duration::from_secs(seconds)),
                })
            }
            // No heartbeat at all (a holder that is not a node, a node
            // whose plugin never ran): nothing shows it alive but the lease.
            Ok(Ok(None)) => Ok(Liveness {
                token: "absent".into(),
                duration: lease.duration,
            }),
            Ok(Err(e)) => Err(ArbiterError::Unreachable {
                location: format!("Lease {name}"),
                source: io::Error::other(e),
            }),
            Err(_) => Err(self.timed_out()),
        }
    }
}

impl KubeArbiter {
    fn no_heartbeat(&self, reason: String) -> ArbiterError {
        ArbiterError::Unreachable {
            location: format!("the heartbeat of node {}", self.node),
            source: io::Error::other(reason),
        }
    }
}
