//! Which Site this node belongs to: the Site whose node selector matches
//! the node's labels (typically `topology.kubernetes.io/zone=room-a`), and
//! where that Site keeps replica data on it.
//!
//! Exactly one Site must select the node. When none does, a Site named
//! after the node's zone label is taken (the usual convention), so a plain
//! zone-labelled cluster works before anyone tuned the selectors.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, ListParams};
use kube::{Client, ResourceExt};
use twinvol_crds::Site;

use crate::error::{CsiError, CsiResult};

/// Whether `selector` selects an object with `labels` (Kubernetes rules:
/// every matchLabels pair and every expression must hold; an empty
/// selector selects nothing here, as the Site's CEL rule demands).
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector.match_labels.as_ref();
    let exprs = selector.match_expressions.as_ref();
    if pairs.is_none_or(BTreeMap::is_empty) && exprs.is_none_or(Vec::is_empty) {
        return false;
    }
    let pairs_ok = pairs
        .into_iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let exprs_ok = exprs.into_iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    pairs_ok && exprs_ok
}

/// The Site of `node`, and the node's labels.
pub async fn find(client: &Client, node: &str, zone_label: &str) -> CsiResult<Site> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node_obj = nodes
        .get_opt(node)
        .await
        .map_err(|e| CsiError::kube(format!("reading Node {node}"), e))?
        .ok_or_else(|| CsiError::NodeNotFound { node: node.into() })?;
    let labels = node_obj.labels().clone();
    let sites: Api<Site> = Api::all(client.clone());
    let all = sites
        .list(&ListParams::default())
        .await
        .map_err(|e| CsiError::kube("listing Sites", e))?
        .items;
    let selecting: Vec<&Site> = all
        .iter()
        .filter(|s| matches(&s.spec.node_selector, &labels))
        .collect();
    match selecting.as_slice() {
        [one] => Ok((*one).clone()),
        [] => {
            let zone = labels.get(zone_label);
            zone.and_then(|z| all.iter().find(|s| s.name_any() == *z))
                .cloned()
                .ok_or_else(|| CsiError::Precondition {
                    volume: String::new(),
                    detail: format!(
                        "no Site selects node {node} (its {zone_label} label is {}); create a Site whose nodeSelector matches the node's labels",
                        zone.map_or("not set".to_owned(), |z| format!("{z:?}"))
                    ),
                })
        }
        many => Err(CsiError::Precondition {
            volume: String::new(),
            detail: format!(
                "node {node} is selected by several Sites ({}); a node belongs to one Site",
                many.iter()
                    .map(|s| s.name_any())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn match_labels_and_expressions_follow_kubernetes() {
        let zone_a = LabelSelector {
            match_labels: Some(labels(&[("topology.kubernetes.io/zone", "room-a")])),
            match_expressions: None,
        };
        let node = labels(&[("topology.kubernetes.io/zone", "room-a"), ("disk", "ssd")]);
        assert!(matches(&zone_a, &node));
        assert!(!matches(
            &zone_a,
            &labels(&[("topology.kubernetes.io/zone", "room-b")])
        ));
        let expr = |op: &str, values: &[&str]| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "disk".into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| (*v).to_owned()).collect()),
            }]),
        };
        assert!(matches(&expr("In", &["ssd", "nvme"]), &node));
        assert!(!matches(&expr("NotIn", &["ssd"]), &node));
        assert!(matches(&expr("Exists", &[]), &node));
        assert!(!matches(&expr("DoesNotExist", &[]), &node));
        assert!(
            !matches(&LabelSelector::default(), &node),
            "empty selects nothing"
        );
    }
}
