//! Conditions as the decisions plan them, turned into Kubernetes
//! conditions (`metav1.Condition`), and the transitions worth an Event.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use twinvol_crds::set_condition;

use crate::decide::CondPlan;

/// A condition that changed status or reason: one Event each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transition {
    pub plan: CondPlan,
    pub from: Option<(String, String)>,
}

/// `existing` with `plans` set (the transition time moves only when a
/// status flips); also the transitions.
pub fn merge(
    existing: &[Condition],
    plans: &[CondPlan],
    generation: Option<i64>,
    now: &Time,
) -> (Vec<Condition>, Vec<Transition>) {
    let mut conditions = existing.to_vec();
    let mut transitions = Vec::new();
    for plan in plans {
        let old = existing
            .iter()
            .find(|c| c.type_ == plan.type_)
            .map(|c| (c.status.clone(), c.reason.clone()));
        let changed = old
            .as_ref()
            .is_none_or(|(s, r)| s != plan.status.as_str() || r != plan.reason);
        set_condition(
            &mut conditions,
            Condition {
                type_: plan.type_.to_owned(),
                status: plan.status.as_str().to_owned(),
                reason: plan.reason.to_owned(),
                message: plan.message.clone(),
                observed_generation: generation,
                last_transition_time: now.clone(),
            },
        );
        if changed {
            transitions.push(Transition {
                plan: plan.clone(),
                from: old,
            });
        }
    }
    conditions.sort_by(|a, b| a.type_.cmp(&b.type_));
    (conditions, transitions)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    fn at(s: i64) -> Time {
        Time(Timestamp::from_second(s).expect("valid"))
    }

    #[test]
    fn only_a_status_or_reason_change_is_a_transition() {
        let plan = CondPlan::new("Ready", true, "Serving", "on a1");
        let (first, t) = merge(&[], std::slice::from_ref(&plan), Some(1), &at(10));
        assert_eq!(t.len(), 1);
        let moved = CondPlan::new("Ready", true, "Serving", "on a2");
        let (second, t) = merge(&first, &[moved], Some(1), &at(20));
        assert!(t.is_empty(), "a new message alone is no transition");
        assert_eq!(second[0].message, "on a2");
        assert_eq!(second[0].last_transition_time, at(10));
        let down = CondPlan::new("Ready", false, "SiteLost", "");
        let (third, t) = merge(&second, &[down], Some(1), &at(30));
        assert_eq!(t.len(), 1);
        assert_eq!(t[0].from, Some(("True".into(), "Serving".into())));
        assert_eq!(third[0].last_transition_time, at(30));
    }
}
