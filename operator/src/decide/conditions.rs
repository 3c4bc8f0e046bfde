//! A condition as a decision states it: type, status, reason, message. The
//! reconciler turns it into a `metav1.Condition` (adding the transition
//! time and the observed generation) with `twinvol_crds::set_condition`, so
//! the transition time only moves when the status flips.

use twinvol_crds::ConditionStatus;

/// One condition the decision wants published.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CondPlan {
    pub type_: &'static str,
    pub status: ConditionStatus,
    /// CamelCase, as Kubernetes wants it.
    pub reason: &'static str,
    pub message: String,
}

impl CondPlan {
    pub fn new(
        type_: &'static str,
        status: impl Into<ConditionStatus>,
        reason: &'static str,
        message: impl Into<String>,
    ) -> Self {
        Self {
            type_,
            status: status.into(),
            reason,
            message: message.into(),
        }
    }

    pub fn is_true(&self) -> bool {
        self.status == ConditionStatus::True
    }
}
