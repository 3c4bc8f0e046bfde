//! Kubernetes' own storage conformance suite against csi.twinvol.io: the
//! "External Storage" tests of `e2e.test` (built by build-upstream.sh with
//! `go test -c` from k8s.io/kubernetes at the pinned release), on the
//! two-site cluster bed with the chart installed, driven by
//! `e2e/tests/conformance/test-driver.yaml`.
//!
//! The suite's test images are built here and imported into every node
//! under the names it asks for: `KUBE_TEST_REPO_LIST` points its registries
//! at `twinvol.local/e2e-test-images`, `e2e.test --list-images` says which
//! names and tags it will pull, and `images::e2e_suite_image` builds those
//! the storage suites run (agnhost from the same module, busybox).
//!
//! By default a subset runs (`SUBSET`: a test of each suite, about ten
//! minutes); `TWINVOL_CONFORMANCE=full` runs every External Storage test
//! (e2e/conformance.sh, whose result goes into docs/conformance.md), in
//! `TWINVOL_CONFORMANCE_PROCS` parallel ginkgo processes (default 1 for
//! the subset, 3 for the full run). Zero failures are allowed; the test
//! prints each spec's state and time, and writes the summary and the
//! ginkgo JSON report to `$TWINVOL_CACHE/conformance/`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use common::{Bed, repo};
use twinvol_e2e::UpstreamBinaries;
use twinvol_e2e::cluster::images;

/// One test of each suite that applies, by the end of its full name (the
/// suite's `--ginkgo.focus` is their alternation).
const SUBSET: [&str; 9] = [
    r"\[Testpattern: Dynamic PV \(default fs\)\] provisioning should provision storage with mount options",
    r"\[Testpattern: Dynamic PV \(default fs\)\] volumes should store data",
    r"\[Testpattern: Dynamic PV \(block volmode\)\] volumes should store data",
    r"\[Testpattern: Dynamic PV \(xfs\)\]\[Slow\] volumes should allow exec of files on the volume",
    r"\[Testpattern: Dynamic PV \(default fs\)\] volumeIO should write files of various sizes, verify size, validate content",
    r"\[Testpattern: Dynamic PV \(block volmode\)\] volumeMode should not mount / map unused volumes in a pod",
    r"\[Testpattern: Dynamic PV \(default fs\)\] subPath should support existing directory",
    r"\[Testpattern: Dynamic PV \(default fs\)\(allowExpansion\)\] volume-expand should resize volume when PVC is edited while pod is using it",
    r"\[Testpattern: Dynamic PV \(default fs\)\] topology should provision a volume and schedule a pod with AllowedTopologies",
];

/// Never run, in either mode: tests that take the bed's nodes down
/// (`[Disruptive]`, which the bed's own fault tests cover) or that need
/// features the bed's kubelets do not have.
const SKIP: &str = r"\[Disruptive\]|\[Feature:SELinux\]|\[Feature:VolumeSnapshotDataSource\]|\[Feature:VolumeAttributesClass\]";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_storage_suites_pass_against_the_driver() {
    let full = std::env::var("TWINVOL_CONFORMANCE").as_deref() == Ok("full");
    let procs: usize = std::env::var("TWINVOL_CONFORMANCE_PROCS")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(if full { 3 } else { 1 });
    let upstream = UpstreamBinaries::from_env();
    let e2e = upstream
        .get("e2e.test")
        .expect("e2e.test (build-upstream.sh e2e.test)");
    let agnhost = upstream
        .get("agnhost")
        .expect("agnhost (build-upstream.sh agnhost)");
    let kubectl = upstream.get("kubectl").expect("kubectl");
    let Some(mut bed) = Bed::install(serde_json::json!({})).await else {
        return;
    };

    let work = bed.home.path().join("conformance");
    std::fs::create_dir_all(&work).expect("work dir");
    for file in ["test-driver.yaml", "storageclass.yaml"] {
        std::fs::copy(
            repo().join("e2e/tests/conformance").join(file),
            work.join(file),
        )
        .expect("conformance file copied");
    }
    let repo_list = work.join("repo-list.yaml");
    let registry = images::E2E_SUITE_REGISTRY;
    std::fs::write(
        &repo_list,
        format!("promoterE2eRegistry: {registry}\ne2eRegistry: {registry}\n"),
    )
    .expect("repo list written");

    // The images the suite will ask for, under its names.
    let listed = Command::new(&e2e)
        .arg("--list-images")
        .env("KUBE_TEST_REPO_LIST", &repo_list)
        .output()
        .expect("e2e.test --list-images runs");
    assert!(
        listed.status.success(),
        "e2e.test --list-images: {}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let started = Instant::now();
    let mut built = Vec::new();
    for reference in String::from_utf8_lossy(&listed.stdout).lines() {
        let Some(rest) = reference.trim().strip_prefix(&format!("{registry}/")) else {
            continue;
        };
        let Some((name, tag)) = rest.split_once(':') else {
            continue;
        };
        if let Some(image) = images::e2e_suite_image(&images::cache_dir(), name, tag, &agnhost)
            .expect("e2e suite image built")
        {
            built.push(image.reference.clone());
            bed.cluster.add_image(image).expect("imported");
        }
    }
    assert!(
        built.iter().any(|r| r.contains("/busybox:"))
            && built.iter().any(|r| r.contains("/agnhost:")),
        "e2e.test --list-images named no busybox or agnhost under {registry}: {built:?}"
    );
    eprintln!(
        "e2e suite images built and imported in {:.1} s: {built:?}",
        started.elapsed().as_secs_f64()
    );

    let focus = if full {
        r"External.Storage \[Driver: csi.twinvol.io\]".to_owned()
    } else {
        format!(
            r"External.Storage \[Driver: csi.twinvol.io\] ({})$",
            SUBSET.join("|")
        )
    };
    let report = work.join("report.json");
    let suite_flags: Vec<String> = vec![
        format!("--kubeconfig={}", bed.cluster.kubeconfig().display()),
        "--provider=local".into(),
        format!("--kubectl-path={}", kubectl.display()),
        format!(
            "--storage.testdriver={}",
            work.join("test-driver.yaml").display()
        ),
        format!("--repo-root={}", work.display()),
        format!("--report-dir={}", work.display()),
        "--node-os-distro=debian".into(),
    ];
    let ginkgo_flags: Vec<String> = vec![
        format!("focus={focus}"),
        format!("skip={SKIP}"),
        format!("json-report={}", report.display()),
        "no-color".into(),
        format!("timeout={}", if full { "4h" } else { "1h" }),
    ];
    let mut command = if procs > 1 {
        let ginkgo = upstream
            .get("ginkgo")
            .expect("ginkgo (build-upstream.sh ginkgo)");
        let mut c = Command::new(ginkgo);
        c.arg(format!("--procs={procs}"));
        c.args(ginkgo_flags.iter().map(|f| format!("--{f}")));
        c.arg(&e2e).arg("--").args(&suite_flags);
        c
    } else {
        let mut c = Command::new(&e2e);
        c.args(ginkgo_flags.iter().map(|f| format!("--ginkgo.{f}")));
        c.args(&suite_flags);
        c
    };
    command
        .env("KUBE_TEST_REPO_LIST", &repo_list)
        .current_dir(&work)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    eprintln!(
        "running the {} storage suites ({procs} process{}): {command:?}",
        if full { "full" } else { "subset of the" },
        if procs > 1 { "es" } else { "" }
    );
    let started = Instant::now();
    let status = command.status().expect("e2e.test runs");
    let elapsed = started.elapsed();

    let specs = read_report(&report);
    let summary = summarise(&specs, full, procs, elapsed.as_secs_f64());
    eprintln!("{summary}");
    let out = images::cache_dir()
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("/var/cache/twinvol"))
        .join("conformance");
    std::fs::create_dir_all(&out).expect("conformance result dir");
    let mode = if full { "full" } else { "subset" };
    std::fs::write(out.join(format!("{mode}.txt")), &summary).expect("summary written");
    std::fs::copy(&report, out.join(format!("{mode}.json"))).expect("report kept");

    let failed: Vec<&Spec> = specs.iter().filter(|s| s.failed()).collect();
    let passed = specs.iter().filter(|s| s.state == "passed").count();
    assert!(
        failed.is_empty() && status.success(),
        "{} of {} specs failed (e2e.test {status}):\n{}\n{}",
        failed.len(),
        specs.len(),
        failed
            .iter()
            .map(|s| format!("- {}\n  {}", s.name, s.message))
            .collect::<Vec<_>>()
            .join("\n"),
        bed.diagnostics()
    );
    let expected = if full { 20 } else { SUBSET.len() };
    assert!(
        passed >= expected,
        "only {passed} specs passed, fewer than the {expected} expected: the focus matched too little"
    );
    bed.shutdown();
}

/// One spec of the ginkgo JSON report.
struct Spec {
    name: String,
    state: String,
    seconds: f64,
    message: String,
}

impl Spec {
    fn failed(&self) -> bool {
        !matches!(self.state.as_str(), "passed" | "skipped" | "pending")
    }

    /// The suite of the spec: the word after its `[Testpattern: …]`.
    fn suite(&self) -> String {
        self.name
            .split_once("[Testpattern: ")
            .and_then(|(_, rest)| rest.split_once("] "))
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("")
            .to_owned()
    }
}

fn read_report(path: &Path) -> Vec<Spec> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("the ginkgo report {}: {e}", path.display()));
    let suites: serde_json::Value = serde_json::from_str(&text).expect("the report is JSON");
    let mut specs = Vec::new();
    for suite in suites.as_array().into_iter().flatten() {
        for spec in suite["SpecReports"].as_array().into_iter().flatten() {
            if spec["LeafNodeType"] != "It" {
                continue;
            }
            let mut parts: Vec<String> = spec["ContainerHierarchyTexts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect();
            parts.push(spec["LeafNodeText"].as_str().unwrap_or("").to_owned());
            specs.push(Spec {
                name: parts.join(" "),
                state: spec["State"].as_str().unwrap_or("unknown").to_owned(),
                seconds: spec["RunTime"].as_f64().unwrap_or(0.0) / 1e9,
                message: spec["Failure"]["Message"]
                    .as_str()
                    .unwrap_or("")
                    .lines()
                    .take(6)
                    .collect::<Vec<_>>()
                    .join("\n  "),
            });
        }
    }
    specs
}

/// The counts per suite and state, then every spec that ran.
fn summarise(specs: &[Spec], full: bool, procs: usize, seconds: f64) -> String {
    let mut by_suite: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for spec in specs {
        *by_suite
            .entry(spec.suite())
            .or_default()
            .entry(spec.state.clone())
            .or_default() += 1;
    }
    let count = |state: &str| specs.iter().filter(|s| s.state == state).count();
    let mut text = format!(
        "storage conformance ({}, {procs} process{}): {} passed, {} failed, {} skipped of {} in {seconds:.0} s\n",
        if full { "full" } else { "subset" },
        if procs > 1 { "es" } else { "" },
        count("passed"),
        specs.iter().filter(|s| s.failed()).count(),
        count("skipped"),
        specs.len(),
    );
    text += &format!(
        "{:<28} {:>7} {:>7} {:>7}\n",
        "suite", "passed", "failed", "skipped"
    );
    for (suite, states) in &by_suite {
        let get = |s: &str| states.get(s).copied().unwrap_or(0);
        let failed: usize = states
            .iter()
            .filter(|(s, _)| !matches!(s.as_str(), "passed" | "skipped" | "pending"))
            .map(|(_, n)| n)
            .sum();
        text += &format!(
            "{:<28} {:>7} {:>7} {:>7}\n",
            if suite.is_empty() { "(other)" } else { suite },
            get("passed"),
            failed,
            get("skipped")
        );
    }
    text += "specs that ran:\n";
    for spec in specs.iter().filter(|s| s.state != "skipped") {
        text += &format!("{:>8} {:>6.1} s  {}\n", spec.state, spec.seconds, spec.name);
    }
    text
}
