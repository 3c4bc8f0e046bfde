//! The `Site` resource: one failure domain (a server room, a zone) — which
//! nodes belong to it and where replicas keep their data on those nodes — and,
//! in status, its observed health as the operator sees it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::PoolPath;

/// Desired state of a Site.
// Each `printcolumn(...)` repeats `type_`/`json_path`; clippy reads the
// derive's helper attribute as one attribute with duplicated keys.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "twinvol.io",
    version = "v1alpha1",
    kind = "Site",
    plural = "sites",
    shortname = "tvsite",
    category = "twinvol",
    status = "SiteStatus",
    derive = "PartialEq",
    doc = "A failure domain: the nodes of one server room or zone and the storage pool replicas use on them.",
    printcolumn(
        name = "Nodes-Ready",
        type_ = "integer",
        json_path = ".status.nodesReady",
        description = "Ready nodes matching the selector"
    ),
    printcolumn(
        name = "Plugins",
        type_ = "integer",
        json_path = ".status.pluginsHeartbeating",
        description = "Node plugins with a fresh heartbeat"
    ),
    printcolumn(
        name = "Healthy",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Healthy\")].status",
        description = "Whether the site's node plugins heartbeat"
    ),
    printcolumn(
        name = "Fenced",
        type_ = "boolean",
        json_path = ".status.fenced",
        description = "Whether the operator fenced the site"
    ),
    printcolumn(
        name = "Pool",
        type_ = "string",
        json_path = ".spec.pool",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SiteSpec {
    /// Selects the nodes of this Site, typically
    /// `matchLabels: {topology.kubernetes.io/zone: room-a}`.
    #[x_kube(
        validation = Rule::new("(has(self.matchLabels) && size(self.matchLabels) > 0) || (has(self.matchExpressions) && size(self.matchExpressions) > 0)")
            .message("spec.nodeSelector must select the Site's nodes with matchLabels or matchExpressions; an empty selector would select every node")
    )]
    pub node_selector: LabelSelector,

    /// Where replicas keep their data on the Site's nodes: a directory (one
    /// preallocated file per replica) or a block device.
    #[x_kube(
        validation = Rule::new("self.startsWith('/')")
            .message("spec.pool must be an absolute path: a directory or a block device such as /dev/sdb")
    )]
    pub pool: PoolPath,

    /// When the operator fences this site (it was lost), also put the
    /// `node.kubernetes.io/out-of-service` taint on its nodes, so that
    /// Kubernetes itself evicts and detaches everything there at once. Only
    /// for a site declared dead: the taint is meant for nodes that are
    /// really off. The operator removes the taint it set when it unfences.
    #[serde(default)]
    pub out_of_service_taint: bool,
}

/// Observed health of a Site.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SiteStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Nodes matching the selector whose Ready condition is True.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub nodes_ready: i32,
    /// Node plugins on those nodes whose heartbeat Lease is fresh.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub plugins_heartbeating: i32,
    /// The operator fenced the site: its replicas left every in-sync set.
    #[serde(default)]
    pub fenced: bool,
    /// When health or fencing last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// Healthy, Fenced.
    #[serde(default)]
    #[schemars(length(max = 8))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use kube::CustomResourceExt;
    use serde_json::json;

    use super::*;

    #[test]
    fn site_round_trips() {
        let site = Site::new(
            "room-a",
            SiteSpec {
                node_selector: LabelSelector {
                    match_labels: Some(BTreeMap::from([(
                        "topology.kubernetes.io/zone".to_owned(),
                        "room-a".to_owned(),
                    )])),
                    match_expressions: None,
                },
                pool: PoolPath::new("/var/lib/twinvol/pool").expect("absolute"),
                out_of_service_taint: false,
            },
        );
        let json = serde_json::to_value(&site).expect("serializes");
        assert_eq!(json["spec"]["pool"], "/var/lib/twinvol/pool");
        assert_eq!(
            json["spec"]["nodeSelector"]["matchLabels"]["topology.kubernetes.io/zone"],
            "room-a"
        );
        let back: Site = serde_json::from_value(json).expect("parses");
        assert_eq!(back.spec, site.spec);
    }

    #[test]
    fn relative_pool_does_not_deserialize() {
        let err = serde_json::from_value::<SiteSpec>(
            json!({"nodeSelector": {"matchLabels": {"a": "b"}}, "pool": "pool"}),
        )
        .expect_err("relative");
        assert!(err.to_string().contains("absolute"), "{err}");
    }

    #[test]
    fn schema_requires_selector_and_pool_and_names_them_in_rules() {
        let crd = serde_json::to_value(Site::crd()).expect("crd serializes");
        assert_eq!(crd["spec"]["scope"], "Cluster");
        let version = &crd["spec"]["versions"][0];
        let spec = &version["schema"]["openAPIV3Schema"]["properties"]["spec"];
        assert_eq!(spec["required"], json!(["nodeSelector", "pool"]));
        for field in ["nodeSelector", "pool"] {
            let message = &spec["properties"][field]["x-kubernetes-validations"][0]["message"];
            let message = message.as_str().unwrap_or_default();
            assert!(message.contains(&format!("spec.{field}")), "{message}");
        }
        let columns: Vec<&str> = version["additionalPrinterColumns"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            columns,
            ["Nodes-Ready", "Plugins", "Healthy", "Fenced", "Pool", "Age"]
        );
        assert!(version["subresources"]["status"].is_object());
    }
}
