//! Status conditions in the Kubernetes shape (`metav1.Condition`: type,
//! status, reason, message, lastTransitionTime, observedGeneration) and the
//! condition types twinvol publishes.
//!
//! The condition type names are enums so that a writer cannot publish a typo
//! that `kubectl wait --for=condition=Ready` would never see; the printer
//! columns of the CRDs select conditions by these same strings.

use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// The value of `Condition.status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

impl ConditionStatus {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::True => "True",
            Self::False => "False",
            Self::Unknown => "Unknown",
        }
    }
}

impl From<bool> for ConditionStatus {
    fn from(value: bool) -> Self {
        if value { Self::True } else { Self::False }
    }
}

impl fmt::Display for ConditionStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Condition types of a MirroredVolume.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VolumeConditionType {
    /// A frontend serves the volume with at least one in-sync replica.
    Ready,
    /// Both replicas are in the in-sync set.
    Synced,
    /// A replica is out of the in-sync set; writes go to one copy only.
    Degraded,
    /// A resync is copying dirty regions to a returning replica.
    Resyncing,
    /// A replica sits on a fenced site.
    Fenced,
    /// Each Site has a node recorded for its replica.
    Placed,
    /// The frontend runs away from the volume's preferred site.
    AwayFromHome,
}

impl VolumeConditionType {
    pub const ALL: [Self; 7] = [
        Self::Ready,
        Self::Synced,
        Self::Degraded,
        Self::Resyncing,
        Self::Fenced,
        Self::Placed,
        Self::AwayFromHome,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "Ready",
            Self::Synced => "Synced",
            Self::Degraded => "Degraded",
            Self::Resyncing => "Resyncing",
            Self::Fenced => "Fenced",
            Self::Placed => "Placed",
            Self::AwayFromHome => "AwayFromHome",
        }
    }
}

/// Condition types of a Site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SiteConditionType {
    /// Its nodes are ready and their node plugins heartbeat.
    Healthy,
    /// The operator fenced the site: its replicas are out of every in-sync
    /// set and its frontends' leases expired.
    Fenced,
    /// Planned maintenance was requested: the site's volumes move away.
    Maintenance,
}

impl SiteConditionType {
    pub const ALL: [Self; 3] = [Self::Healthy, Self::Fenced, Self::Maintenance];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "Healthy",
            Self::Fenced => "Fenced",
            Self::Maintenance => "Maintenance",
        }
    }
}

/// Sets `new` in `conditions`, replacing the condition of the same type.
///
/// `lastTransitionTime` only moves when the status changes: a reconciler that
/// rewrites the same condition every pass must not make it look as if the
/// state had just flipped. Returns whether anything changed, so the caller can
/// skip a status write that would change nothing.
pub fn set_condition(conditions: &mut Vec<Condition>, new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        None => {
            conditions.push(new);
            true
        }
        Some(old) => {
            let mut new = new;
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            if *old == new {
                false
            } else {
                *old = new;
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

    use super::*;

    fn cond(type_: &str, status: ConditionStatus, reason: &str, at_secs: i64) -> Condition {
        Condition {
            type_: type_.to_owned(),
            status: status.as_str().to_owned(),
            reason: reason.to_owned(),
            message: String::new(),
            observed_generation: Some(1),
            last_transition_time: Time(Timestamp::from_second(at_secs).expect("valid")),
        }
    }

    #[test]
    fn same_status_keeps_the_transition_time() {
        let mut conditions = vec![cond("Ready", ConditionStatus::True, "Serving", 100)];
        let changed = set_condition(
            &mut conditions,
            cond("Ready", ConditionStatus::True, "Serving", 200),
        );
        assert!(!changed);
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 100);
    }

    #[test]
    fn status_flip_moves_the_transition_time() {
        let mut conditions = vec![cond("Synced", ConditionStatus::True, "BothInSync", 100)];
        let changed = set_condition(
            &mut conditions,
            cond("Synced", ConditionStatus::False, "ReplicaLost", 200),
        );
        assert!(changed);
        assert_eq!(conditions.len(), 1);
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 200);
        assert_eq!(conditions[0].reason, "ReplicaLost");
    }

    #[test]
    fn reason_change_without_flip_is_a_change() {
        let mut conditions = vec![cond("Ready", ConditionStatus::False, "Placing", 100)];
        assert!(set_condition(
            &mut conditions,
            cond("Ready", ConditionStatus::False, "NoRoom", 300)
        ));
        assert_eq!(conditions[0].last_transition_time.0.as_second(), 100);
    }

    #[test]
    fn new_type_is_appended() {
        let mut conditions = vec![cond("Ready", ConditionStatus::True, "Serving", 1)];
        assert!(set_condition(
            &mut conditions,
            cond(
                VolumeConditionType::Degraded.as_str(),
                ConditionStatus::from(false),
                "BothInSync",
                2
            )
        ));
        assert_eq!(conditions.len(), 2);
    }
}
