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

use std::io;
use std::time::Duration;

use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::{Client, Error as KubeError};
use twinvol_crds::{MirroredVolume, NodeName};
use twinvol_engine::arbiter::{Arbiter, ArbiterError, Change, Version, VolumeRecord};

use super::mapping::{self, MappingError};

/// The arbiter record of one MirroredVolume, in its status.
#[derive(Clone)]
pub struct KubeArbiter {
    api: Api<DynamicObject>,
    volume: String,
    node: NodeName,
    timeout: Duration,
}

impl std::fmt::Debug for KubeArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeArbiter")
            .field("volume", &self.volume)
            .field("node", &self.node)
            .field("timeout", &self.timeout)
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
            api: Api::all_with(client, &resource),
            volume: volume.into(),
            node,
            timeout: Self::DEFAULT_TIMEOUT,
        }
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
}
