//! The production arbiter (design invariant 2): a volume's in-sync set,
//! epoch and frontend lease live in its MirroredVolume's status, and every
//! change is a compare-and-swap on `metadata.resourceVersion`.
//!
//! [`KubeArbiter`] implements the engine's
//! [`Arbiter`](twinvol_engine::arbiter::Arbiter) for one MirroredVolume, with
//! the engine's rules ([`VolumeRecord::apply`]); this module only moves the
//! record in and out of the object.
//!
//! # The mapping
//!
//! | engine `VolumeRecord`   | MirroredVolume                                        |
//! |-------------------------|-------------------------------------------------------|
//! | `version`               | `metadata.resourceVersion`                            |
//! | `replicas`              | `spec.sites` (a replica is named after its Site)      |
//! | `epoch`                 | `status.epoch`                                        |
//! | `in_sync`               | `status.inSync` (written in `spec.sites` order)       |
//! | `lease.holder`          | `status.frontend.leaseHolder`                         |
//! | `lease.epoch`           | `status.frontend.epoch` (the acquisition's epoch)     |
//! | `lease.renewed_at_ms`   | `status.frontend.renewTime` (MicroTime)               |
//! | `lease.duration`        | `status.frontend.leaseDurationSeconds`                |
//! | `lease == None`         | no `status.frontend` (or one without `leaseHolder`)   |
//!
//! - **No status yet** (every new object: the API server drops a status sent
//!   on create), or a status with an empty `inSync`, epoch 0 and no
//!   `frontend` (the operator wrote only its own fields; the CRD defaults
//!   `inSync` to `[]` and `epoch` to 0): epoch 0, both sites in sync, no
//!   lease — the same record as a freshly created file arbiter. The first
//!   swap writes all three. An empty `inSync` once a frontend has held the
//!   volume (epoch > 0 or a `frontend`) is corrupt: the rules never empty
//!   it, and reading it as "both in sync" could serve stale data.
//! - **Lease identity**: a lease is one acquisition, holder *and* epoch;
//!   `status.frontend.epoch` is written at the acquisition and kept by
//!   renewals, so a frontend restarted under the same name cannot renew
//!   its predecessor's lease (the engine's rules, `LeaseId`).
//! - **Times**: nobody decides anything by comparing `renewTime` with a
//!   clock (the engine's lease code times how long the record went
//!   unchanged, on the observer's own monotonic clock); every renewal
//!   writes a later `renewTime` than the last, so that it shows as a
//!   change. `renewTime` is written as exactly `renewed_at_ms` (a
//!   MicroTime holds microseconds, so whole milliseconds are exact) and read
//!   back rounded *up* to the millisecond (exact for what this arbiter
//!   wrote; never makes a finer-grained renewal look older).
//! - **Durations**: `leaseDurationSeconds` is whole seconds, so a duration
//!   is written rounded *up* (1.5 s → 2 s) and reads back as that: the
//!   record, the next frontend's wait included, never sees a lease shorter
//!   than the one its holder self-fences on. The record returned by an
//!   update is the one read back from the API server's answer, so it equals
//!   what a later read returns.
//! - **Acquisition** (the epoch changed) writes a new `status.frontend`:
//!   `node` = the node given to [`KubeArbiter::new`] (the engine's change
//!   carries no node), `epoch` = the new epoch, the lease fields, and no
//!   `leaseName`. A **renewal** changes only `renewTime` and
//!   `leaseDurationSeconds` of the existing entry. A **release** removes
//!   `status.frontend`.
//! - **Liveness** ([`KubeArbiter::with_heartbeat`], what the node plugin's
//!   frontends use): holders do not renew in steady state; their node's
//!   heartbeat Lease proves them alive (`crate::heartbeat`). A renewal is
//!   written only when a holder comes back after its lease ran out (see
//!   the engine's `frontend::lease`), so `status.frontend` changes at
//!   acquisition, release and such a return, never periodically.
//! - Everything else in the status (`replicas`, `conditions`,
//!   `observedGeneration`, fields of a newer schema) is written back as it
//!   was read, under the same resourceVersion precondition.
//! - A status the mapping cannot read (an empty `inSync` as above, a site
//!   in it that is not in `spec.sites`, a lease holder without `renewTime`,
//!   ...) is
//!   [`ArbiterError::Corrupt`](twinvol_engine::arbiter::ArbiterError::Corrupt),
//!   as is a deleted MirroredVolume.
//!
//! # Errors and time-outs
//!
//! HTTP 409 on the status write is a lost swap: the object is read again and
//! returned in `Conflict`. No connection, 5xx, 401/403/429 and a call
//! exceeding its deadline are `Unreachable`. Unlike the file arbiter's, an
//! `Unreachable` *update* does not prove that nothing changed: a write that
//! timed out may still have landed. That stays safe for the callers (they
//! acknowledge nothing on an error, and their next swap on the old version
//! gets a `Conflict` showing what happened), but it is not "nothing
//! changed".
//!
//! [`VolumeRecord::apply`]: twinvol_engine::arbiter::VolumeRecord::apply

mod kube_arbiter;
pub mod mapping;

pub use kube_arbiter::KubeArbiter;
pub use mapping::MappingError;
