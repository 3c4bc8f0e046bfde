//! The `MirroredVolume` resource: one volume kept as two identical replicas,
//! one on each of two Sites.
//!
//! The spec is what a user (or CSI CreateVolume) asks for; the API server
//! checks it with the CEL rules below, each of whose messages names the field
//! it is about, so a `kubectl apply` of a bad object says what to fix. The
//! status is written by the operator and the frontends; its
//! `resourceVersion`-guarded updates are the compare-and-swap that makes the
//! API server the arbiter of the in-sync set (design invariant 2).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, MicroTime};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{ByteCount, Epoch, NodeName, RateLimit, SiteName, VolumeSize};

/// Desired state of a mirrored volume.
// Each `printcolumn(...)` repeats `type_`/`json_path`; clippy reads the
// derive's helper attribute as one attribute with duplicated keys.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "twinvol.io",
    version = "v1alpha1",
    kind = "MirroredVolume",
    plural = "mirroredvolumes",
    shortname = "mv",
    shortname = "mvol",
    category = "twinvol",
    status = "MirroredVolumeStatus",
    derive = "PartialEq",
    doc = "A volume kept as two synchronously mirrored replicas, one per Site.",
    printcolumn(
        name = "Size",
        type_ = "string",
        json_path = ".spec.size",
        description = "Requested size"
    ),
    printcolumn(
        name = "Sites",
        type_ = "string",
        json_path = ".spec.sites",
        description = "The two Sites holding a replica"
    ),
    printcolumn(
        name = "In-Sync",
        type_ = "string",
        json_path = ".status.inSync",
        description = "Sites whose replica is in the in-sync set"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".status.epoch",
        description = "Current volume epoch"
    ),
    printcolumn(
        name = "Frontend",
        type_ = "string",
        json_path = ".status.frontend.node",
        description = "Node serving the volume"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Synced",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Synced\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!has(self.preferredSite) || self.preferredSite in self.sites")
        .message("spec.preferredSite must be one of spec.sites")
        .field_path(".preferredSite")
)]
pub struct MirroredVolumeSpec {
    /// Size of the volume, a Kubernetes quantity of bytes (for example `10Gi`).
    /// May grow, never shrink.
    #[x_kube(
        validation = Rule::new("isQuantity(self)")
            .message("spec.size must be a quantity of bytes such as 10Gi"),
        validation = Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))")
            .message("spec.size must be greater than zero"),
        validation = Rule::new("!isQuantity(self) || quantity(self).isInteger()")
            .message("spec.size must be a whole number of bytes"),
        validation = Rule::new("!isQuantity(self) || !isQuantity(oldSelf) || !quantity(self).isLessThan(quantity(oldSelf))")
            .message("spec.size may grow but never shrink")
    )]
    pub size: VolumeSize,

    /// The two Sites that each hold one replica. Fixed at creation.
    #[schemars(length(max = 2))]
    #[x_kube(
        validation = Rule::new("size(self) == 2")
            .message("spec.sites must name exactly two Sites, one per failure domain"),
        validation = Rule::new("size(self) != 2 || self[0] != self[1]")
            .message("spec.sites must name two different Sites"),
        validation = Rule::new("self == oldSelf")
            .message("spec.sites is immutable: a volume's Sites are fixed at creation")
    )]
    pub sites: Vec<SiteName>,

    /// Whether the volume's frontend moves back to `preferredSite` by itself
    /// once that site is back and in sync.
    #[serde(default)]
    pub failback: Failback,

    /// Bandwidth limit of a resync, a quantity of bytes per second (for
    /// example `200Mi`). Unlimited when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(
        validation = Rule::new("isQuantity(self)")
            .message("spec.resyncRateLimit must be a quantity of bytes per second such as 200Mi"),
        validation = Rule::new("!isQuantity(self) || quantity(self).isGreaterThan(quantity('0'))")
            .message("spec.resyncRateLimit must be greater than zero")
    )]
    pub resync_rate_limit: Option<RateLimit>,

    /// The Site where the frontend should run when both are healthy; one of
    /// `sites`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preferred_site: Option<SiteName>,
}

/// Fail-back policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum Failback {
    /// Move the frontend home at a quiet moment once the preferred site is in
    /// sync again.
    #[default]
    Automatic,
    /// Stay where the fail-over put it until a user moves it.
    Manual,
}

/// Observed state of a mirrored volume.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MirroredVolumeStatus {
    /// The `metadata.generation` this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The current volume epoch; replicas refuse requests of older epochs.
    #[serde(default)]
    pub epoch: Epoch,

    /// One entry per replica, keyed by site.
    #[serde(default)]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["site".into()]))]
    pub replicas: Vec<ReplicaStatus>,

    /// Sites whose replica is in the in-sync set: every write is acknowledged
    /// only once all of them have it. Changed only by a compare-and-swap on
    /// this status (resourceVersion precondition).
    #[serde(default)]
    #[schemars(length(max = 2))]
    #[x_kube(merge_strategy = ListMerge::Set)]
    pub in_sync: Vec<SiteName>,

    /// The frontend currently serving the volume, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frontend: Option<FrontendStatus>,

    /// Ready, Synced, Degraded, Resyncing, Fenced.
    #[serde(default)]
    #[schemars(length(max = 16))]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Where one replica lives and how far it is behind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReplicaStatus {
    /// The Site holding this replica.
    pub site: SiteName,
    /// The node of that Site the replica was placed on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<NodeName>,
    pub state: ReplicaState,
    /// Where the replica server listens for frontends and resyncs
    /// (`HOST:PORT`), reported by the node plugin of `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 262))]
    pub address: Option<String>,
    /// The epoch the replica last persisted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Epoch>,
    /// Bytes copied by the running resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_bytes_done: Option<ByteCount>,
    /// Bytes the running resync still has to copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_bytes_remaining: Option<ByteCount>,
}

/// The state of one replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ReplicaState {
    /// In the in-sync set: has every acknowledged write.
    InSync,
    /// Missed writes; the other replica tracks them in its dirty bitmap.
    OutOfSync,
    /// Catching up from the other replica's dirty regions.
    Resyncing,
    /// Its data can't be used; needs a full copy or a new placement.
    Failed,
}

/// The frontend serving the volume and the lease it holds.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FrontendStatus {
    /// Node the frontend runs on (where the pod using the volume runs).
    pub node: NodeName,
    /// The epoch the frontend was started with.
    pub epoch: Epoch,
    /// Name of the `coordination.k8s.io` Lease the frontend renews.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_name: Option<String>,
    /// Holder identity recorded in that Lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_holder: Option<String>,
    /// Last renewal of the Lease seen by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<MicroTime>,
    /// Lease duration: the frontend stops acknowledging I/O once it could not
    /// renew for this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i32>,
}

#[cfg(test)]
mod tests {
    use kube::{CustomResourceExt, Resource};
    use serde_json::{Value, json};

    use super::*;
    use crate::ConditionStatus;

    fn spec() -> MirroredVolumeSpec {
        MirroredVolumeSpec {
            size: VolumeSize::new("10Gi").expect("valid"),
            sites: vec![
                SiteName::new("room-a").expect("valid"),
                SiteName::new("room-b").expect("valid"),
            ],
            failback: Failback::Manual,
            resync_rate_limit: Some(RateLimit::new("200Mi").expect("valid")),
            preferred_site: Some(SiteName::new("room-a").expect("valid")),
        }
    }

    fn spec_schema() -> Value {
        let crd = serde_json::to_value(MirroredVolume::crd()).expect("crd serializes");
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    fn rules(schema: &Value) -> Vec<(String, String)> {
        schema["x-kubernetes-validations"]
            .as_array()
            .map(|rules| {
                rules
                    .iter()
                    .map(|r| {
                        (
                            r["rule"].as_str().unwrap_or_default().to_owned(),
                            r["message"].as_str().unwrap_or_default().to_owned(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn spec_round_trips_with_camel_case_fields() {
        let mv = MirroredVolume::new("pvc-1", spec());
        let json = serde_json::to_value(&mv).expect("serializes");
        assert_eq!(json["apiVersion"], "twinvol.io/v1alpha1");
        assert_eq!(json["kind"], "MirroredVolume");
        assert_eq!(json["spec"]["resyncRateLimit"], "200Mi");
        assert_eq!(json["spec"]["preferredSite"], "room-a");
        assert_eq!(json["spec"]["failback"], "Manual");
        let back: MirroredVolume = serde_json::from_value(json).expect("parses");
        assert_eq!(back.spec, mv.spec);
    }

    #[test]
    fn optional_policy_fields_default() {
        let spec: MirroredVolumeSpec =
            serde_json::from_value(json!({"size": "1Gi", "sites": ["a", "b"]})).expect("parses");
        assert_eq!(spec.failback, Failback::Automatic);
        assert_eq!(spec.preferred_site, None);
        let out = serde_json::to_value(&spec).expect("serializes");
        assert!(out.get("preferredSite").is_none());
    }

    #[test]
    fn status_round_trips() {
        let status = MirroredVolumeStatus {
            observed_generation: Some(3),
            epoch: Epoch::new(7),
            replicas: vec![ReplicaStatus {
                site: SiteName::new("room-b").expect("valid"),
                node: Some(NodeName::new("node-b1").expect("valid")),
                state: ReplicaState::Resyncing,
                address: Some("10.0.0.2:7400".into()),
                epoch: Some(Epoch::new(6)),
                resync_bytes_done: Some(ByteCount::new(4096)),
                resync_bytes_remaining: Some(ByteCount::new(8192)),
            }],
            in_sync: vec![SiteName::new("room-a").expect("valid")],
            frontend: Some(FrontendStatus {
                node: NodeName::new("node-a1").expect("valid"),
                epoch: Epoch::new(7),
                lease_name: Some("twinvol-pvc-1".into()),
                lease_holder: Some("node-a1".into()),
                renew_time: None,
                lease_duration_seconds: Some(10),
            }),
            conditions: vec![],
        };
        let json = serde_json::to_value(&status).expect("serializes");
        assert_eq!(json["replicas"][0]["state"], "Resyncing");
        assert_eq!(json["replicas"][0]["resyncBytesRemaining"], 8192);
        assert_eq!(json["inSync"], json!(["room-a"]));
        assert_eq!(json["frontend"]["leaseDurationSeconds"], 10);
        let back: MirroredVolumeStatus = serde_json::from_value(json).expect("parses");
        assert_eq!(back, status);
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_short_names() {
        let crd = MirroredVolume::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.group, crate::API_GROUP);
        assert_eq!(MirroredVolume::version(&()), crate::API_VERSION);
        let short = crd.spec.names.short_names.clone().unwrap_or_default();
        assert_eq!(short, vec!["mv".to_owned(), "mvol".to_owned()]);
        let version = &crd.spec.versions[0];
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some()
        );
        let columns: Vec<String> = version
            .additional_printer_columns
            .iter()
            .flatten()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(
            columns,
            [
                "Size", "Sites", "In-Sync", "Epoch", "Frontend", "Ready", "Synced", "Age"
            ]
        );
    }

    #[test]
    fn every_spec_rule_message_names_its_field() {
        let spec = spec_schema();
        let mut all = rules(&spec);
        for field in ["size", "sites", "resyncRateLimit"] {
            let field_rules = rules(&spec["properties"][field]);
            assert!(!field_rules.is_empty(), "{field} has no CEL rule");
            for (_, message) in &field_rules {
                assert!(message.contains(&format!("spec.{field}")), "{message}");
            }
            all.extend(field_rules);
        }
        let rule_texts: Vec<&str> = all.iter().map(|(r, _)| r.as_str()).collect();
        assert!(rule_texts.contains(&"self == oldSelf"));
        assert!(
            rule_texts
                .iter()
                .any(|r| r.contains("self.preferredSite in self.sites"))
        );
        assert!(
            rule_texts
                .iter()
                .any(|r| r.contains("isLessThan(quantity(oldSelf))"))
        );
        assert_eq!(spec["properties"]["sites"]["maxItems"], 2);
        assert_eq!(
            spec["properties"]["failback"]["enum"],
            json!(["Automatic", "Manual"])
        );
        assert_eq!(spec["properties"]["failback"]["default"], "Automatic");
        assert_eq!(spec["required"], json!(["sites", "size"]));
    }

    #[test]
    fn status_lists_have_merge_keys_and_bounds() {
        let crd = serde_json::to_value(MirroredVolume::crd()).expect("crd serializes");
        let status =
            &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"];
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-type"],
            "map"
        );
        assert_eq!(
            status["properties"]["conditions"]["x-kubernetes-list-map-keys"],
            json!(["type"])
        );
        assert_eq!(
            status["properties"]["replicas"]["x-kubernetes-list-map-keys"],
            json!(["site"])
        );
        assert_eq!(
            status["properties"]["inSync"]["x-kubernetes-list-type"],
            "set"
        );
        assert_eq!(status["properties"]["epoch"]["format"], "int64");
        let states = &status["properties"]["replicas"]["items"]["properties"]["state"]["enum"];
        assert_eq!(
            *states,
            json!(["InSync", "OutOfSync", "Resyncing", "Failed"])
        );
        assert_eq!(ConditionStatus::True.as_str(), "True");
    }
}
