//! twinvol's CRDs against a real kube-apiserver, driven with kubectl as a user
//! would: the chart's manifests install and become Established; valid Sites
//! and MirroredVolumes are accepted; every invalid one is refused with a
//! message naming the field; status written through the status subresource
//! shows in `kubectl get`; and a status write carrying a stale
//! resourceVersion is refused with a Conflict — the compare-and-swap the
//! arbiter relies on.

use std::{collections::BTreeMap, time::Duration};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, MicroTime, Time},
    jiff::Timestamp,
};
use kube::{Api, api::PostParams};
use serde_json::{Value, json};
use twinvol_crds::{
    ConditionStatus, Epoch, FrontendStatus, MirroredVolume, MirroredVolumeStatus, NodeName,
    ReplicaState, ReplicaStatus, Site, SiteConditionType, SiteName, SiteStatus,
    VolumeConditionType,
};
use twinvol_e2e::{ControlPlane, ControlPlaneOptions};

const TIMEOUT: Duration = Duration::from_secs(120);

async fn plane_with_crds() -> ControlPlane {
    let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
        .await
        .expect("control plane starts (binaries from e2e/tools/build-upstream.sh)");
    plane
        .install_twinvol_crds(TIMEOUT)
        .await
        .expect("the chart's CRDs apply and become Established");
    plane
}

fn site(name: &str) -> Value {
    json!({
        "apiVersion": "twinvol.io/v1alpha1",
        "kind": "Site",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"topology.kubernetes.io/zone": name}},
            "pool": "/var/lib/twinvol/pool",
        },
    })
}

fn volume(name: &str) -> Value {
    json!({
        "apiVersion": "twinvol.io/v1alpha1",
        "kind": "MirroredVolume",
        "metadata": {"name": name},
        "spec": {
            "size": "10Gi",
            "sites": ["room-a", "room-b"],
            "failback": "Automatic",
            "resyncRateLimit": "200Mi",
            "preferredSite": "room-a",
        },
    })
}

fn create(plane: &ControlPlane, object: &Value) -> Result<String, String> {
    plane
        .kubectl_ok_with_stdin(&["create", "-f", "-"], &object.to_string())
        .map_err(|e| e.to_string())
}

fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    *object
        .pointer_mut(pointer)
        .expect("pointer into the object") = value;
    object
}

fn without(mut object: Value, field: &str) -> Value {
    if let Some(spec) = object["spec"].as_object_mut() {
        spec.remove(field);
    }
    object
}

/// `kubectl get KIND NAME` as a map from column header to cell.
fn columns(plane: &ControlPlane, args: &[&str]) -> BTreeMap<String, String> {
    let table = plane.kubectl_ok(args).expect("kubectl get");
    let mut lines = table.lines();
    let header: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    let row: Vec<&str> = lines.next().unwrap_or("").split_whitespace().collect();
    assert_eq!(header.len(), row.len(), "unexpected table:\n{table}");
    header
        .into_iter()
        .zip(row)
        .map(|(h, c)| (h.to_owned(), c.to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_objects_are_rejected_with_a_message_naming_the_field() {
    let plane = plane_with_crds().await;

    for name in ["room-a", "room-b"] {
        create(&plane, &site(name)).expect("a valid Site is accepted");
    }
    create(&plane, &volume("vol-1")).expect("a valid MirroredVolume is accepted");
    let minimal = json!({
        "apiVersion": "twinvol.io/v1alpha1",
        "kind": "MirroredVolume",
        "metadata": {"name": "vol-minimal"},
        "spec": {"size": "1Gi", "sites": ["room-b", "room-a"]},
    });
    create(&plane, &minimal).expect("a MirroredVolume without policy fields is accepted");
    let failback = plane
        .kubectl_ok(&[
            "get",
            "mv",
            "vol-minimal",
            "-o",
            "jsonpath={.spec.failback}",
        ])
        .expect("kubectl get");
    assert_eq!(failback, "Automatic", "failback defaults to Automatic");

    // `preferredSite:` left empty in YAML is a null: it means "no
    // preference", not a Site named null.
    let nulls = with(
        with(volume("vol-nulls"), "/spec/preferredSite", Value::Null),
        "/spec/resyncRateLimit",
        Value::Null,
    );
    create(&plane, &nulls).expect("null optional fields are accepted as absent");
    let volumes: Api<MirroredVolume> = Api::all(plane.client());
    let stored = volumes.get("vol-nulls").await.expect("get vol-nulls");
    assert_eq!(stored.spec.preferred_site, None);
    assert_eq!(stored.spec.resync_rate_limit, None);

    // The field docs reach `kubectl explain`.
    let explained = plane
        .kubectl_ok(&["explain", "mirroredvolume.spec.size"])
        .expect("kubectl explain");
    assert!(explained.contains("May grow, never shrink"), "{explained}");

    let site_a = site("room-x");
    let vol = volume("vol-bad");
    let creations: Vec<(&str, Value, &[&str])> = vec![
        (
            "Site without nodeSelector",
            without(site_a.clone(), "nodeSelector"),
            &["spec.nodeSelector", "Required value"],
        ),
        (
            "Site without pool",
            without(site_a.clone(), "pool"),
            &["spec.pool", "Required value"],
        ),
        (
            "Site with an empty nodeSelector",
            with(site_a.clone(), "/spec/nodeSelector", json!({})),
            &["spec.nodeSelector must select the Site's nodes"],
        ),
        (
            "Site with a relative pool",
            with(site_a.clone(), "/spec/pool", json!("pool")),
            &["spec.pool must be an absolute path"],
        ),
        (
            "the two sites equal",
            with(vol.clone(), "/spec/sites", json!(["room-a", "room-a"])),
            &["spec.sites must name two different Sites"],
        ),
        (
            "one site",
            with(vol.clone(), "/spec/sites", json!(["room-a"])),
            &["spec.sites must name exactly two Sites"],
        ),
        (
            "three sites",
            with(
                vol.clone(),
                "/spec/sites",
                json!(["room-a", "room-b", "room-c"]),
            ),
            &["spec.sites", "at most 2 items"],
        ),
        (
            "a site that is not a Site name",
            with(vol.clone(), "/spec/sites", json!(["Room_A", "room-b"])),
            &["spec.sites[0]", "should match"],
        ),
        (
            "no sites",
            without(vol.clone(), "sites"),
            &["spec.sites", "Required value"],
        ),
        (
            "size zero",
            with(vol.clone(), "/spec/size", json!("0")),
            &["spec.size must be greater than zero"],
        ),
        (
            "size zero with a suffix",
            with(vol.clone(), "/spec/size", json!("0Gi")),
            &["spec.size must be greater than zero"],
        ),
        (
            "size not a quantity",
            with(vol.clone(), "/spec/size", json!("ten gigs")),
            &["spec.size must be a quantity of bytes"],
        ),
        (
            "size not whole bytes",
            with(vol.clone(), "/spec/size", json!("0.5")),
            &["spec.size must be a whole number of bytes"],
        ),
        (
            "failback neither Automatic nor Manual",
            with(vol.clone(), "/spec/failback", json!("Sometimes")),
            &["spec.failback", "Unsupported value", "Automatic", "Manual"],
        ),
        (
            "preferredSite not one of the two",
            with(vol.clone(), "/spec/preferredSite", json!("room-c")),
            &["spec.preferredSite must be one of spec.sites"],
        ),
        (
            "resyncRateLimit not a quantity",
            with(vol.clone(), "/spec/resyncRateLimit", json!("fast")),
            &["spec.resyncRateLimit must be a quantity"],
        ),
        (
            "resyncRateLimit zero",
            with(vol.clone(), "/spec/resyncRateLimit", json!("0")),
            &["spec.resyncRateLimit must be greater than zero"],
        ),
    ];

    let mut failures = Vec::new();
    for (case, object, wanted) in &creations {
        match create(&plane, object) {
            Ok(out) => failures.push(format!("{case}: accepted ({})", out.trim())),
            Err(message) => {
                for fragment in *wanted {
                    if !message.contains(fragment) {
                        failures.push(format!("{case}: {fragment:?} not in: {message}"));
                    }
                }
            }
        }
    }

    // Transition rules, as a user editing the object would hit them.
    let patch = |body: Value| {
        plane
            .kubectl_ok(&[
                "patch",
                "mv",
                "vol-1",
                "--type=merge",
                "-p",
                &body.to_string(),
            ])
            .map_err(|e| e.to_string())
    };
    let updates: [(&str, Value, &str); 2] = [
        (
            "shrinking size",
            json!({"spec": {"size": "5Gi"}}),
            "spec.size may grow but never shrink",
        ),
        (
            "changing sites",
            json!({"spec": {"sites": ["room-a", "room-c"], "preferredSite": "room-a"}}),
            "spec.sites is immutable",
        ),
    ];
    for (case, body, wanted) in updates {
        match patch(body) {
            Ok(out) => failures.push(format!("{case}: accepted ({})", out.trim())),
            Err(message) if !message.contains(wanted) => {
                failures.push(format!("{case}: {wanted:?} not in: {message}"))
            }
            Err(_) => {}
        }
    }
    if let Err(message) = patch(json!({"spec": {"size": "20Gi", "failback": "Manual"}})) {
        failures.push(format!(
            "growing size and changing failback refused: {message}"
        ));
    }
    let size = plane
        .kubectl_ok(&["get", "mv", "vol-1", "-o", "jsonpath={.spec.size}"])
        .expect("kubectl get");
    assert_eq!(size, "20Gi");

    let listed = plane
        .kubectl_ok(&["get", "mirroredvolumes", "-o", "name"])
        .expect("kubectl get");
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        [
            "mirroredvolume.twinvol.io/vol-1",
            "mirroredvolume.twinvol.io/vol-minimal",
            "mirroredvolume.twinvol.io/vol-nulls",
        ],
        "no invalid object may have been stored"
    );
    assert!(
        failures.is_empty(),
        "{} validation case(s) wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn at(seconds: i64) -> Timestamp {
    Timestamp::from_second(seconds).expect("valid timestamp")
}

fn condition(kind: VolumeConditionType, status: ConditionStatus, reason: &str) -> Condition {
    Condition {
        type_: kind.as_str().to_owned(),
        status: status.as_str().to_owned(),
        reason: reason.to_owned(),
        message: format!("{} is {status}", kind.as_str()),
        observed_generation: Some(1),
        last_transition_time: Time(at(1_790_000_000)),
    }
}

fn name<T: TryFrom<String>>(value: &str) -> T
where
    T::Error: std::fmt::Debug,
{
    T::try_from(value.to_owned()).expect("valid name")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_in_kubectl_get_and_stale_status_writes_conflict() {
    let plane = plane_with_crds().await;
    for site_name in ["room-a", "room-b"] {
        create(&plane, &site(site_name)).expect("a valid Site is accepted");
    }
    create(&plane, &volume("vol-1")).expect("a valid MirroredVolume is accepted");

    // Status through the status subresource, serialized from the Rust types:
    // reading it back unchanged proves the schema prunes none of it.
    let status = MirroredVolumeStatus {
        observed_generation: Some(1),
        epoch: Epoch::new(3),
        replicas: vec![
            ReplicaStatus {
                site: name("room-a"),
                node: Some(name::<NodeName>("node-a1")),
                state: ReplicaState::InSync,
                address: Some("10.0.0.1:7400".into()),
                epoch: Some(Epoch::new(3)),
                resync_bytes_done: None,
                resync_bytes_remaining: None,
            },
            ReplicaStatus {
                site: name("room-b"),
                node: Some(name::<NodeName>("node-b1")),
                state: ReplicaState::InSync,
                address: Some("10.0.0.1:7400".into()),
                epoch: Some(Epoch::new(3)),
                resync_bytes_done: None,
                resync_bytes_remaining: None,
            },
        ],
        in_sync: vec![name("room-a"), name("room-b")],
        frontend: Some(FrontendStatus {
            node: name("node-a1"),
            epoch: Epoch::new(3),
            lease_name: Some("twinvol-frontend-vol-1".into()),
            lease_holder: Some("node-a1".into()),
            renew_time: Some(MicroTime(at(1_790_000_010))),
            lease_duration_seconds: Some(10),
        }),
        conditions: vec![
            condition(VolumeConditionType::Ready, ConditionStatus::True, "Serving"),
            condition(
                VolumeConditionType::Synced,
                ConditionStatus::True,
                "BothInSync",
            ),
            condition(
                VolumeConditionType::Degraded,
                ConditionStatus::False,
                "BothInSync",
            ),
        ],
    };
    let body = json!({ "status": status }).to_string();
    plane
        .kubectl_ok(&[
            "patch",
            "mirroredvolume",
            "vol-1",
            "--subresource=status",
            "--type=merge",
            "-p",
            &body,
        ])
        .expect("status patch through the status subresource");

    let volumes: Api<MirroredVolume> = Api::all(plane.client());
    let stored = volumes.get("vol-1").await.expect("get vol-1");
    assert_eq!(
        stored.status.as_ref(),
        Some(&status),
        "status read back differs"
    );

    let row = columns(&plane, &["get", "mv", "vol-1"]);
    assert_eq!(row["NAME"], "vol-1");
    assert_eq!(row["SIZE"], "10Gi");
    assert_eq!(row["SITES"], r#"["room-a","room-b"]"#);
    assert_eq!(row["IN-SYNC"], r#"["room-a","room-b"]"#);
    assert_eq!(row["EPOCH"], "3");
    assert_eq!(row["FRONTEND"], "node-a1");
    assert_eq!(row["READY"], "True");
    assert_eq!(row["SYNCED"], "True");
    assert!(row.contains_key("AGE"), "{row:?}");
    let by_short_name = columns(&plane, &["get", "mvol", "vol-1"]);
    assert_eq!(by_short_name["EPOCH"], "3");
    let category = plane
        .kubectl_ok(&["get", "twinvol", "-o", "name"])
        .expect("kubectl get twinvol");
    let mut category: Vec<&str> = category.lines().collect();
    category.sort_unstable();
    assert_eq!(
        category,
        [
            "mirroredvolume.twinvol.io/vol-1",
            "site.twinvol.io/room-a",
            "site.twinvol.io/room-b"
        ],
        "the twinvol category lists both kinds"
    );

    let site_status = json!({"status": SiteStatus {
        observed_generation: Some(1),
        nodes_ready: 2,
        plugins_heartbeating: 1,
        fenced: false,
        last_transition_time: Some(Time(at(1_790_000_000))),
        conditions: vec![Condition {
            type_: SiteConditionType::Healthy.as_str().to_owned(),
            status: ConditionStatus::True.as_str().to_owned(),
            reason: "Heartbeating".to_owned(),
            message: "1 of 2 node plugins heartbeat".to_owned(),
            observed_generation: Some(1),
            last_transition_time: Time(at(1_790_000_000)),
        }],
    }})
    .to_string();
    plane
        .kubectl_ok(&[
            "patch",
            "site",
            "room-a",
            "--subresource=status",
            "--type=merge",
            "-p",
            &site_status,
        ])
        .expect("site status patch");
    let row = columns(&plane, &["get", "site", "room-a", "-o", "wide"]);
    assert_eq!(row["NODES-READY"], "2");
    assert_eq!(row["PLUGINS"], "1");
    assert_eq!(row["HEALTHY"], "True");
    assert_eq!(row["FENCED"], "false");
    assert_eq!(row["POOL"], "/var/lib/twinvol/pool");
    let sites: Api<Site> = Api::all(plane.client());
    let room_a = sites.get("room-a").await.expect("get room-a");
    assert_eq!(room_a.status.map(|s| s.plugins_heartbeating), Some(1));

    // The arbiter's compare-and-swap: a writer that read the object before
    // someone else changed its status must be refused, not win.
    let stale = volumes.get("vol-1").await.expect("get vol-1");
    let mut fresh = stale.clone();
    if let Some(s) = fresh.status.as_mut() {
        s.in_sync = vec![name::<SiteName>("room-a")];
        s.epoch = Epoch::new(4);
    }
    let after_swap = volumes
        .replace_status("vol-1", &PostParams::default(), &fresh)
        .await
        .expect("a status write with the current resourceVersion succeeds");
    assert_ne!(
        after_swap.metadata.resource_version,
        stale.metadata.resource_version
    );

    let mut loser = stale.clone();
    if let Some(s) = loser.status.as_mut() {
        s.in_sync = vec![name::<SiteName>("room-b")];
    }
    match volumes
        .replace_status("vol-1", &PostParams::default(), &loser)
        .await
    {
        Err(kube::Error::Api(status)) => {
            assert_eq!(status.code, 409, "{status:?}");
            assert!(status.is_conflict(), "{status:?}");
        }
        Ok(_) => panic!("a status write with a stale resourceVersion was accepted"),
        Err(other) => panic!("expected a Conflict, got {other}"),
    }
    let now = volumes.get("vol-1").await.expect("get vol-1");
    let in_sync: Vec<String> = now
        .status
        .iter()
        .flat_map(|s| s.in_sync.iter().map(|n| n.to_string()))
        .collect();
    assert_eq!(in_sync, ["room-a"], "the stale write must not have landed");

    // The same refusal as a kubectl user sees it.
    let stale_json = serde_json::to_string(&loser).expect("serializes");
    let refused = plane
        .kubectl_with_stdin(&["replace", "--subresource=status", "-f", "-"], &stale_json)
        .expect("kubectl runs");
    assert!(
        !refused.status.success(),
        "kubectl replace with a stale resourceVersion succeeded"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("the object has been modified"), "{stderr}");
    let row = columns(&plane, &["get", "mv", "vol-1"]);
    assert_eq!(row["IN-SYNC"], r#"["room-a"]"#);
    assert_eq!(row["EPOCH"], "4");
}
