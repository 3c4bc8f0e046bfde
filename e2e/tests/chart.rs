//! The Helm chart (charts/twinvol) checked with the real tools: `helm lint`
//! (also `--strict`) is clean; `helm template` renders every component with
//! the defaults and with a two-site values file (e2e/tests/chart/two-sites.yaml)
//! and refuses bad values naming them; the rendered objects pass server-side
//! validation (`kubectl apply --dry-run=server`) on a real kube-apiserver with
//! the CRDs installed; `helm install`, `upgrade` and `uninstall` against that
//! API server keep the replication Secret across the upgrade and leave the
//! CRDs, the Sites and the Secret behind; the PrometheusRule's rules pass
//! `promtool check rules`, and `promtool test rules` shows each alert firing
//! and not firing (e2e/tests/chart/alerts-test.yaml).
//!
//! helm comes from TWINVOL_UPSTREAM_BIN (e2e/tools/build-upstream.sh),
//! promtool from Debian's prometheus package (e2e/tools/install-deps.sh).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::{Value, json};
use twinvol_e2e::{ControlPlane, ControlPlaneOptions, UpstreamBinaries};

const TIMEOUT: Duration = Duration::from_secs(120);
const NAMESPACE: &str = "twinvol-system";
const MONITORING: [&str; 2] = [
    "--api-versions=monitoring.coreos.com/v1/ServiceMonitor",
    "--api-versions=monitoring.coreos.com/v1/PrometheusRule",
];

fn repo() -> PathBuf {
    twinvol_e2e::source_root()
}

fn chart() -> String {
    repo().join("charts/twinvol").display().to_string()
}

fn fixture(name: &str) -> String {
    repo()
        .join("e2e/tests/chart")
        .join(name)
        .display()
        .to_string()
}

/// helm with its caches and config in `home` (nothing of the user's).
fn helm(home: &Path, args: &[&str]) -> Output {
    let bin = UpstreamBinaries::from_env()
        .get("helm")
        .expect("helm (e2e/tools/build-upstream.sh)");
    Command::new(bin)
        .args(args)
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .output()
        .expect("helm runs")
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn helm_ok(home: &Path, args: &[&str]) -> String {
    let output = helm(home, args);
    assert!(
        output.status.success(),
        "helm {args:?} failed:\n{}",
        text(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `helm template` of the chart with `extra` arguments.
fn render(home: &Path, extra: &[&str]) -> String {
    let chart = chart();
    let mut args = vec!["template", "twinvol", &chart, "--namespace", NAMESPACE];
    args.extend_from_slice(extra);
    helm_ok(home, &args)
}

fn objects(yaml: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).expect("the render is YAML");
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name_part: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| {
            o["kind"] == kind
                && o["metadata"]["name"]
                    .as_str()
                    .is_some_and(|n| n.contains(name_part))
        })
        .unwrap_or_else(|| panic!("no {kind} named *{name_part}* in the render"))
}

/// The entry of the list `list` (volumes, mounts) whose name is `name`.
fn named<'a>(list: &'a Value, name: &str) -> Option<&'a Value> {
    list.as_array()?.iter().find(|v| v["name"] == name)
}

fn count(objects: &[Value], kind: &str) -> usize {
    objects.iter().filter(|o| o["kind"] == kind).count()
}

fn home() -> tempfile::TempDir {
    tempfile::tempdir().expect("temporary helm home")
}

#[test]
fn lint_is_clean_with_defaults_and_two_sites() {
    let home = home();
    let chart = chart();
    let two = fixture("two-sites.yaml");
    for extra in [vec![], vec!["--strict"], vec!["--strict", "-f", &two]] {
        let mut args = vec!["lint", &chart];
        args.extend_from_slice(&extra);
        let out = helm_ok(home.path(), &args);
        assert!(
            out.contains("0 chart(s) failed"),
            "helm lint {extra:?}: {out}"
        );
        for level in ["[WARNING]", "[ERROR]"] {
            assert!(
                !out.contains(level),
                "helm lint {extra:?} says {level}: {out}"
            );
        }
    }
}

#[test]
fn template_renders_every_component() {
    let home = home();
    let defaults = objects(&render(home.path(), &[]));
    let two = fixture("two-sites.yaml");
    let mut args = vec!["-f", two.as_str()];
    args.extend_from_slice(&MONITORING);
    let sites = objects(&render(home.path(), &args));

    for (what, objs) in [("defaults", &defaults), ("two sites", &sites)] {
        assert_eq!(
            count(objs, "ServiceAccount"),
            3,
            "{what}: one per component"
        );
        assert_eq!(
            count(objs, "Deployment"),
            2,
            "{what}: operator and controller"
        );
        assert_eq!(count(objs, "DaemonSet"), 1, "{what}");
        assert_eq!(count(objs, "CSIDriver"), 1, "{what}");
        assert_eq!(count(objs, "StorageClass"), 1, "{what}");
        assert_eq!(
            count(objs, "Secret"),
            2,
            "{what}: replication, the data plane's token"
        );
    }
    // Monitoring objects only where the API serves them.
    assert_eq!(count(&defaults, "ServiceMonitor"), 0);
    assert_eq!(count(&defaults, "PrometheusRule"), 0);
    assert_eq!(count(&sites, "ServiceMonitor"), 1);
    assert_eq!(count(&sites, "PrometheusRule"), 1);
    assert_eq!(count(&defaults, "Site"), 0);
    assert_eq!(count(&sites, "Site"), 2);

    // Each component runs as its own ServiceAccount.
    let sas: Vec<&str> = ["operator", "controller"]
        .iter()
        .map(|c| {
            find(&sites, "Deployment", c)["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or_default()
        })
        .chain(std::iter::once(
            find(&sites, "DaemonSet", "node")["spec"]["template"]["spec"]["serviceAccountName"]
                .as_str()
                .unwrap_or_default(),
        ))
        .collect();
    assert_eq!(
        sas,
        ["twinvol-operator", "twinvol-controller", "twinvol-node"]
    );

    let controller = &find(&sites, "Deployment", "controller")["spec"]["template"]["spec"];
    let names: Vec<&str> = controller["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "csi-plugin",
            "csi-provisioner",
            "csi-attacher",
            "csi-resizer"
        ]
    );

    let node = &find(&sites, "DaemonSet", "node")["spec"]["template"]["spec"];
    let plugin = &node["containers"][0];
    assert_eq!(plugin["securityContext"]["privileged"], true);
    assert_eq!(plugin["livenessProbe"]["httpGet"]["path"], "/healthz");
    let kubelet_mount = named(&plugin["volumeMounts"], "kubelet-dir").expect("kubelet dir mounted");
    assert_eq!(kubelet_mount["mountPropagation"], "Bidirectional");
    // The data plane outlives the plugin's container: host PID namespace,
    // a cgroup of its own, API credentials bound to no pod.
    assert_eq!(node["hostPID"], true);
    let args = plugin["args"].to_string();
    assert!(
        args.contains("--dataplane-cgroup=twinvol-dataplane")
            && args.contains("--dataplane-credentials=/var/run/twinvol/dataplane"),
        "{args}"
    );
    let token = find(&sites, "Secret", "node-dataplane");
    assert_eq!(token["type"], "kubernetes.io/service-account-token");
    assert_eq!(
        token["metadata"]["annotations"]["kubernetes.io/service-account.name"],
        "twinvol-node"
    );
    let credentials = named(&node["volumes"], "dataplane-credentials").expect("credentials volume");
    assert_eq!(
        credentials["secret"]["secretName"],
        "twinvol-node-dataplane"
    );
    // Both Sites' nodes, and both pools mounted.
    let terms = &node["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        ["nodeSelectorTerms"];
    assert_eq!(terms.as_array().map(Vec::len), Some(2), "{terms}");
    let host_paths: Vec<&str> = node["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .filter_map(|v| v["hostPath"]["path"].as_str())
        .collect();
    for path in [
        "/var/lib/twinvol/pool",
        "/srv/twinvol/pool-b",
        "/var/lib/kubelet",
    ] {
        assert!(host_paths.contains(&path), "{path} not in {host_paths:?}");
    }

    let class = find(&sites, "StorageClass", "twinvol");
    assert_eq!(class["volumeBindingMode"], "WaitForFirstConsumer");
    assert_eq!(class["allowVolumeExpansion"], true);
    assert_eq!(class["provisioner"], "csi.twinvol.io");
    assert_eq!(
        class["parameters"],
        json!({"failback": "Manual", "fsType": "ext4", "resyncRateLimit": "200Mi"})
    );

    // kubeletDir moves every kubelet path: the hostPath, the mount, the
    // socket the plugin registers.
    let moved = objects(&render(
        home.path(),
        &["--set", "kubeletDir=/var/lib/k0s/kubelet"],
    ));
    let node = &find(&moved, "DaemonSet", "node")["spec"]["template"]["spec"];
    let rendered = node.to_string();
    assert!(
        rendered.contains("unix:///var/lib/k0s/kubelet/plugins/csi.twinvol.io/csi.sock")
            && rendered.contains("--kubelet-dir=/var/lib/k0s/kubelet")
            && !rendered.contains("/var/lib/kubelet"),
        "{rendered}"
    );

    // A per-node kubeletDir (the cluster bed's): the directory above the
    // node's name is mounted, the arguments carry $(NODE_NAME) for
    // Kubernetes to expand.
    let per_node = "/var/lib/twinvol-cluster/tsc0/nodes/$(NODE_NAME)/kubelet";
    let set = format!("kubeletDir={per_node}");
    let objs = objects(&render(home.path(), &["--set", &set]));
    let node = &find(&objs, "DaemonSet", "node")["spec"]["template"]["spec"];
    let volume = named(&node["volumes"], "kubelet-dir").expect("kubelet-dir volume");
    assert_eq!(
        volume["hostPath"]["path"],
        "/var/lib/twinvol-cluster/tsc0/nodes"
    );
    let args = node["containers"][0]["args"].to_string();
    assert!(
        args.contains(&format!("--kubelet-dir={per_node}")),
        "{args}"
    );
}

#[test]
fn bad_values_are_refused_naming_them() {
    let home = home();
    let chart = chart();
    let cases: [(&[&str], &str); 6] = [
        (
            &[
                "--set",
                "sites[0].name=a,sites[0].pool=/p,sites[0].nodeSelector.z=a",
            ],
            "exactly two Sites",
        ),
        (
            &[
                "--set",
                "sites[0].name=a,sites[0].pool=/p,sites[0].nodeSelector.z=a,sites[1].name=b,sites[1].pool=relative,sites[1].nodeSelector.z=b",
            ],
            "needs pool",
        ),
        (
            &[
                "--set",
                "sites[0].name=a,sites[0].pool=/p,sites[0].nodeSelector.z=a,sites[1].name=a,sites[1].pool=/p,sites[1].nodeSelector.z=b",
            ],
            "named twice",
        ),
        (&["--set", "storageClass.failback=Sometimes"], "failback"),
        (&["--set", "kubeletDir=var/lib/kubelet"], "kubeletDir"),
        (
            &["--set", "kubeletDir=/nodes/x-$(NODE_NAME)/kubelet"],
            "whole path component",
        ),
    ];
    for (extra, message) in cases {
        let mut args = vec!["template", "twinvol", chart.as_str()];
        args.extend_from_slice(extra);
        let output = helm(home.path(), &args);
        assert!(!output.status.success(), "{extra:?} was accepted");
        assert!(
            text(&output).contains(message),
            "{extra:?}: expected {message:?} in {}",
            text(&output)
        );
    }
}

/// The groups of the rendered PrometheusRule as a Prometheus rules file
/// (JSON is YAML).
fn rules_file(home: &Path) -> String {
    let mut args = vec!["--show-only", "templates/monitoring.yaml"];
    args.extend_from_slice(&MONITORING);
    let objs = objects(&render(home, &args));
    let rule = find(&objs, "PrometheusRule", "alerts");
    let groups = &rule["spec"]["groups"];
    let alerts: Vec<&str> = groups[0]["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for wanted in [
        "TwinvolSiteDown",
        "TwinvolVolumeDegraded",
        "TwinvolResyncStalled",
        "TwinvolFailoverBlocked",
    ] {
        assert!(alerts.contains(&wanted), "{wanted} not in {alerts:?}");
    }
    json!({ "groups": groups }).to_string()
}

fn promtool(dir: &Path, args: &[&str]) -> Output {
    Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool runs (Debian's prometheus package: e2e/tools/install-deps.sh)")
}

#[test]
fn alert_rules_pass_promtool_and_each_alert_fires_and_stays_quiet() {
    let home = home();
    let dir = tempfile::tempdir().expect("temporary dir");
    std::fs::write(dir.path().join("rules.yaml"), rules_file(home.path())).expect("writes");
    std::fs::copy(
        fixture("alerts-test.yaml"),
        dir.path().join("alerts-test.yaml"),
    )
    .expect("copies");

    let check = promtool(dir.path(), &["check", "rules", "rules.yaml"]);
    assert!(check.status.success(), "{}", text(&check));
    assert!(
        text(&check).contains("SUCCESS: 5 rules found"),
        "{}",
        text(&check)
    );

    let test = promtool(dir.path(), &["test", "rules", "alerts-test.yaml"]);
    assert!(test.status.success(), "{}", text(&test));

    // The unit tests can fail: a shifted threshold breaks them.
    let rules = std::fs::read_to_string(dir.path().join("rules.yaml")).expect("reads");
    std::fs::write(
        dir.path().join("rules.yaml"),
        rules.replace("\"for\":\"1m\"", "\"for\":\"3m\""),
    )
    .expect("writes");
    let broken = promtool(dir.path(), &["test", "rules", "alerts-test.yaml"]);
    assert!(
        !broken.status.success() && text(&broken).contains("TwinvolSiteDown"),
        "a 3m threshold passed the 1m alert tests:\n{}",
        text(&broken)
    );
}

async fn plane() -> ControlPlane {
    let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
        .await
        .expect("control plane starts (binaries from e2e/tools/build-upstream.sh)");
    plane
        .install_twinvol_crds(TIMEOUT)
        .await
        .expect("the chart's CRDs install");
    let monitoring = fixture("monitoring-crds.yaml");
    plane
        .kubectl_ok(&["apply", "-f", &monitoring])
        .expect("stand-in monitoring CRDs apply");
    plane
        .kubectl_ok(&[
            "wait",
            "--for=condition=Established",
            "--timeout=120s",
            "crd/servicemonitors.monitoring.coreos.com",
            "crd/prometheusrules.monitoring.coreos.com",
        ])
        .expect("monitoring CRDs Established");
    plane
        .kubectl_ok(&["create", "namespace", NAMESPACE])
        .expect("namespace");
    plane
}

fn secret_of(plane: &ControlPlane) -> String {
    plane
        .kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "secret",
            "twinvol-replication",
            "-o",
            "jsonpath={.data.secret}",
        ])
        .expect("the replication Secret exists")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_objects_are_valid_kubernetes_and_install_keeps_the_secret_and_crds() {
    let plane = plane().await;
    let home = home();
    let two = fixture("two-sites.yaml");
    let mut with_monitoring = vec!["-f", two.as_str()];
    with_monitoring.extend_from_slice(&MONITORING);

    // Server-side validation of every rendered object, both value sets.
    for extra in [vec![], with_monitoring] {
        let yaml = render(home.path(), &extra);
        let out = plane
            .kubectl_ok_with_stdin(&["apply", "--dry-run=server", "-f", "-"], &yaml)
            .unwrap_or_else(|e| panic!("server refused the render with {extra:?}: {e}"));
        let accepted = out
            .lines()
            .filter(|l| l.contains("(server dry run)"))
            .count();
        assert_eq!(
            accepted,
            objects(&yaml).len(),
            "every object accepted:\n{out}"
        );
    }
    // The server does refuse a broken object (the check can fail).
    let broken = render(home.path(), &["--set", "node.healthPort=notaport"]);
    assert!(
        plane
            .kubectl_ok_with_stdin(&["apply", "--dry-run=server", "-f", "-"], &broken)
            .is_err(),
        "a non-numeric port was accepted"
    );

    // install → upgrade → uninstall against the API server.
    let kubeconfig = plane.kubeconfig().display().to_string();
    let chart = chart();
    let common = [
        "--kubeconfig",
        kubeconfig.as_str(),
        "--namespace",
        NAMESPACE,
    ];
    let run = |verb: &[&str], extra: &[&str]| {
        let mut args: Vec<&str> = verb.to_vec();
        args.extend_from_slice(&common);
        args.extend_from_slice(extra);
        helm_ok(home.path(), &args)
    };
    let notes = run(&["install", "twinvol", &chart], &["-f", &two]);
    assert!(
        notes.contains("keeps the CRDs"),
        "NOTES say what uninstall keeps: {notes}"
    );
    let secret = secret_of(&plane);
    assert!(secret.len() >= 32, "secret {secret:?}");
    // The server serves monitoring.coreos.com/v1: helm saw it.
    plane
        .kubectl_ok(&["-n", NAMESPACE, "get", "prometheusrule/twinvol-alerts"])
        .expect("PrometheusRule installed where the CRD exists");

    run(
        &["upgrade", "twinvol", &chart],
        &["-f", &two, "--set", "image.tag=next"],
    );
    assert_eq!(secret_of(&plane), secret, "the upgrade kept the secret");
    let image = plane
        .kubectl_ok(&[
            "-n",
            NAMESPACE,
            "get",
            "deploy/twinvol-operator",
            "-o",
            "jsonpath={.spec.template.spec.containers[0].image}",
        ])
        .expect("operator Deployment");
    assert_eq!(image, "twinvol.local/twinvol:next");

    let out = run(&["uninstall", "twinvol"], &[]);
    assert!(
        out.contains("twinvol-replication"),
        "helm says what it kept: {out}"
    );
    assert!(
        plane
            .kubectl_ok(&["-n", NAMESPACE, "get", "deploy/twinvol-operator"])
            .is_err(),
        "the Deployment is gone"
    );
    assert_eq!(secret_of(&plane), secret, "uninstall kept the secret");
    plane
        .kubectl_ok(&[
            "get",
            "crd/mirroredvolumes.twinvol.io",
            "crd/sites.twinvol.io",
        ])
        .expect("uninstall kept the CRDs");
    plane
        .kubectl_ok(&["get", "site/room-a", "site/room-b"])
        .expect("uninstall kept the Sites");

    // A reinstall adopts the kept secret, unchanged.
    let kept = ["--take-ownership", "-f", two.as_str()];
    run(&["install", "twinvol", &chart], &kept);
    assert_eq!(secret_of(&plane), secret, "the reinstall reused the secret");
}
