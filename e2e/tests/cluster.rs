//! The stretched cluster against the real thing: two sites of real kubelets
//! on containerd in network namespaces, the control plane on the host, and
//! every check made from outside the harness (kubectl, pings from the
//! namespaces, the processes in /proc, the mounts in mountinfo).
//!
//! One cluster serves the whole scenario in [`two_sites_run_pods_and_survive_their_faults`]
//! (starting one dominates the run time); [`a_failed_test_leaves_nothing_behind`]
//! panics with a cluster up and checks the machine afterwards. The two never
//! run at once: the machine has two cores.
//!
//! Needs root, the upstream binaries (`e2e/tools/build-upstream.sh`) and the
//! Debian packages of `e2e/tools/install-deps.sh`.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Node;
use kube::Api;
use twinvol_e2e::{
    Cluster, ClusterOptions,
    cluster::{NodeId, Site, cmd::ping_from, layout, node_condition, sweep},
    wait::{self, Poll},
};

static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const POD_TIMEOUT: &str = "--timeout=180s";

fn node(site: Site) -> NodeId {
    NodeId::new(site, 1).expect("index 1 exists")
}

/// A pod of the workload image pinned to `node` by the scheduler's own
/// means (node selector), running `script`.
fn pod(name: &str, node: NodeId, script: &str) -> String {
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeSelector": {
                "kubernetes.io/hostname": node.node_name(),
                layout::ZONE_LABEL: node.site.zone(),
            },
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": twinvol_e2e::cluster::images::WORKLOAD,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", script],
            }],
        },
    })
    .to_string()
}

/// Applies `manifest`, retrying while the namespace's default
/// ServiceAccount does not exist yet (the controller manager makes it).
async fn apply(cluster: &Cluster, manifest: &str) {
    wait::until(Duration::from_secs(60), || async {
        match cluster.kubectl_apply(manifest) {
            Ok(_) => Poll::Ready(()),
            Err(e) => Poll::Pending(e.to_string()),
        }
    })
    .await
    .expect("manifest applied");
}

fn wait_pod_ready(cluster: &Cluster, name: &str) {
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            POD_TIMEOUT,
        ])
        .unwrap_or_else(|e| {
            let describe = cluster
                .kubectl_ok(&["describe", "pod", name])
                .unwrap_or_default();
            panic!("pod {name} not Ready: {e}\n{describe}")
        });
}

fn exec(cluster: &Cluster, pod: &str, script: &str) -> Result<String, String> {
    cluster
        .kubectl_ok(&["exec", pod, "--", "/bin/sh", "-c", script])
        .map_err(|e| e.to_string())
}

fn pod_ip(cluster: &Cluster, name: &str) -> String {
    cluster
        .kubectl_ok(&["get", "pod", name, "-o", "jsonpath={.status.podIP}"])
        .expect("pod IP")
}

/// What `curl` in `from` gets from the web server of the pod at `ip`.
fn fetch(cluster: &Cluster, from: &str, ip: &str) -> Result<String, String> {
    exec(
        cluster,
        from,
        &format!("curl -s --max-time 4 http://{ip}:8080/"),
    )
}

/// The pod calls the API server through the `kubernetes` Service with its
/// own service-account token (what in-cluster clients do) and returns the
/// answer (a 403 for listing pods, naming the pod's service account: proof
/// the token was read by the API server).
fn call_api(cluster: &Cluster, from: &str) -> Result<String, String> {
    exec(
        cluster,
        from,
        "sa=/var/run/secrets/kubernetes.io/serviceaccount; \
         curl -s --max-time 6 --cacert $sa/ca.crt -H \"Authorization: Bearer $(cat $sa/token)\" \
         https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/default/pods",
    )
}

async fn node_status(cluster: &Cluster, id: NodeId) -> Option<String> {
    let nodes: Api<Node> = Api::all(cluster.client());
    let node = nodes.get_opt(&id.node_name()).await.ok()??;
    node_condition(&node, "Ready")
}

/// Waits until kubectl shows `id`'s Ready condition as `want` (`True`, or
/// not `True` when `want` is `None`).
async fn wait_node(cluster: &Cluster, id: NodeId, ready: bool, timeout: Duration) -> Duration {
    let t = Instant::now();
    wait::until(timeout, || async {
        // Through kubectl, as a user would look.
        let status = cluster
            .kubectl_ok(&[
                "get",
                "node",
                &id.node_name(),
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .unwrap_or_default();
        if (status == "True") == ready {
            Poll::Ready(())
        } else {
            Poll::Pending(format!("{id} Ready={status}"))
        }
    })
    .await
    .unwrap_or_else(|last| panic!("{id} never became ready={ready}: {last}"));
    t.elapsed()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn mounted(point: &str) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(point))
}

const WEB: &str = "mkdir -p /www && echo hello-from-$(hostname) > /www/index.html && \
                   exec httpd -f -p 8080 -h /www";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_run_pods_and_survive_their_faults() {
    let _one = ONE_CLUSTER_AT_A_TIME.lock().await;
    let mut cluster = Cluster::start(ClusterOptions::default())
        .await
        .expect("cluster starts (binaries from e2e/tools/build-upstream.sh)");
    let (a1, b1) = (node(Site::A), node(Site::B));
    let (slot, root) = (cluster.slot(), cluster.root().to_owned());
    let times = cluster.start_times().clone();
    println!(
        "cold start: {:.1} s in all (sweep {:.1}, network {:.1}, control plane {:.1}, images {:.1}, \
         nodes booted {:.1}, nodes Ready {:.1} after boot)",
        times.total.as_secs_f64(),
        times.sweep.as_secs_f64(),
        times.network.as_secs_f64(),
        times.control_plane.as_secs_f64(),
        times.images.as_secs_f64(),
        times.nodes_booted.as_secs_f64(),
        times.nodes_ready.as_secs_f64(),
    );

    // Every node Ready with its zone label, seen through kubectl.
    let labels = cluster
        .kubectl_ok(&["get", "nodes", "-L", layout::ZONE_LABEL, "--no-headers"])
        .expect("kubectl get nodes");
    println!("{labels}");
    for id in cluster.nodes() {
        let line = labels
            .lines()
            .find(|l| l.split_whitespace().next() == Some(&id.node_name()))
            .unwrap_or_else(|| panic!("{id} missing from:\n{labels}"));
        assert!(line.contains(" Ready "), "{line}");
        assert!(line.trim_end().ends_with(&id.site.zone()), "{line}");
    }

    // Idle usage of the whole cluster over 10 s.
    let before = cluster.usage();
    let window = Duration::from_secs(10);
    tokio::time::sleep(window).await;
    let after = cluster.usage();
    let cpu = after.cpu.saturating_sub(before.cpu).as_secs_f64() / window.as_secs_f64();
    println!(
        "idle: {:.2} cores of CPU, {} MiB resident in {} processes ({} nodes + control plane)",
        cpu,
        after.rss_bytes / (1024 * 1024),
        after.processes,
        cluster.nodes().len()
    );
    assert!(
        after.processes >= 4 + 3 * cluster.nodes().len(),
        "{after:?}"
    );

    // A pod on each site, running the workload image.
    apply(&cluster, &pod("web-a", a1, WEB)).await;
    apply(&cluster, &pod("web-b", b1, WEB)).await;
    wait_pod_ready(&cluster, "web-a");
    wait_pod_ready(&cluster, "web-b");
    let placed = cluster
        .kubectl_ok(&["get", "pods", "-o", "wide", "--no-headers"])
        .expect("pods");
    println!("{placed}");
    let (ip_a, ip_b) = (pod_ip(&cluster, "web-a"), pod_ip(&cluster, "web-b"));

    // Site A's pod reaches site B's, and back.
    assert_eq!(
        fetch(&cluster, "web-a", &ip_b).expect("A reaches B").trim(),
        "hello-from-web-b"
    );
    assert_eq!(
        fetch(&cluster, "web-b", &ip_a).expect("B reaches A").trim(),
        "hello-from-web-a"
    );

    // The API through the `kubernetes` Service, with the pod's own token.
    let service_host = exec(&cluster, "web-a", "echo $KUBERNETES_SERVICE_HOST").expect("env");
    assert_eq!(
        service_host.trim(),
        cluster.kubernetes_service_ip().to_string()
    );
    let answer = call_api(&cluster, "web-a").expect("curl through the Service");
    assert!(
        answer.contains("system:serviceaccount:default:default"),
        "the API server did not see the pod's token: {answer}"
    );

    // An image made from a Go-built CSI sidecar runs as a pod.
    let sidecar = twinvol_e2e::cluster::images::sidecar(
        &ClusterOptions::default().image_cache,
        &ClusterOptions::default().upstream,
        "csi-provisioner",
        "v6.4.0",
    )
    .expect("sidecar image builds");
    let reference = sidecar.reference.clone();
    cluster
        .add_image(sidecar)
        .expect("imported into every node");
    let version_pod = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "provisioner-version"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": b1.node_name()},
            "restartPolicy": "Never",
            "containers": [{
                "name": "main",
                "image": reference,
                "imagePullPolicy": "Never",
                "args": ["--version"],
            }],
        },
    })
    .to_string();
    apply(&cluster, &version_pod).await;
    cluster
        .kubectl_ok(&[
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/provisioner-version",
            POD_TIMEOUT,
        ])
        .expect("the sidecar's pod ran to completion");
    let version = cluster
        .kubectl_ok(&["logs", "provisioner-version"])
        .expect("logs");
    assert!(version.contains("v6.4.0"), "{version}");

    // Bidirectional mount propagation: a privileged pod mounts ext4 on a
    // loop device under a shared hostPath; the node's host path and a
    // second pod on that node see it.
    let shared = cluster.shared_dir(a1).expect("shared dir");
    let mounter = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "mounter"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": a1.node_name()},
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "main",
                "image": twinvol_e2e::cluster::images::WORKLOAD,
                "imagePullPolicy": "Never",
                "securityContext": {"privileged": true},
                "command": ["/bin/sh", "-c",
                    "set -e; truncate -s 64M /host/disk.img; \
                     for try in 1 2 3 4 5; do \
                       dev=$(/usr/sbin/losetup -f); n=${dev#/dev/loop}; \
                       [ -b $dev ] || mknod $dev b 7 $n; \
                       /usr/sbin/losetup $dev /host/disk.img && break; sleep 1; done; \
                     mkfs.ext4 -q $dev; mkdir -p /host/vol; mount -t ext4 $dev /host/vol; \
                     echo written-by-mounter > /host/vol/hello; \
                     trap 'umount /host/vol; /usr/sbin/losetup -d $dev; exit 0' TERM; \
                     touch /tmp/ready; while true; do sleep 1; done"],
                "readinessProbe": {"exec": {"command": ["cat", "/tmp/ready"]}, "periodSeconds": 1},
                "volumeMounts": [{"name": "host", "mountPath": "/host",
                                  "mountPropagation": "Bidirectional"}],
            }],
            "volumes": [{"name": "host", "hostPath": {"path": shared, "type": "Directory"}}],
        },
    })
    .to_string();
    let viewer = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "viewer"},
        "spec": {
            "nodeSelector": {"kubernetes.io/hostname": a1.node_name()},
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "main",
                "image": twinvol_e2e::cluster::images::WORKLOAD,
                "imagePullPolicy": "Never",
                "command": ["/bin/sh", "-c", "exec sleep 100000"],
                "volumeMounts": [{"name": "host", "mountPath": "/host",
                                  "mountPropagation": "HostToContainer"}],
            }],
            "volumes": [{"name": "host", "hostPath": {"path": shared, "type": "Directory"}}],
        },
    })
    .to_string();
    apply(&cluster, &viewer).await;
    wait_pod_ready(&cluster, "viewer");
    apply(&cluster, &mounter).await;
    wait_pod_ready(&cluster, "mounter");
    let vol = shared.join("vol");
    assert!(
        mounted(&vol.display().to_string()),
        "{} is no mount point on the host",
        vol.display()
    );
    assert_eq!(
        std::fs::read_to_string(vol.join("hello")).expect("the host sees the file"),
        "written-by-mounter\n"
    );
    let seen = exec(
        &cluster,
        "viewer",
        "cat /host/vol/hello; grep -c ' /host/vol ' /proc/self/mountinfo",
    )
    .expect("viewer reads");
    assert_eq!(
        seen, "written-by-mounter\n1\n",
        "the second pod sees the mount"
    );
    let loops = sweep::find(slot, &root).loop_devices;
    println!("loop devices of the cluster: {loops:?}");
    assert_eq!(loops.len(), 1, "the mounter's loop device is found as ours");

    // Fault: the inter-site link. Pods on A can't reach B; both reach the API.
    let (ns_a, ns_b) = (cluster.netns(a1), cluster.netns(b1));
    let (node_a_ip, node_b_ip) = (
        cluster.node_ip(a1).to_string(),
        cluster.node_ip(b1).to_string(),
    );
    let api_ip = cluster.control_plane_ip().to_string();
    assert!(
        ping_from(&ns_a, &node_b_ip, 2),
        "A reaches B before the cut"
    );
    cluster.cut_intersite().expect("cut");
    assert!(!ping_from(&ns_a, &node_b_ip, 2), "A still reaches B");
    assert!(!ping_from(&ns_b, &node_a_ip, 2), "B still reaches A");
    assert!(ping_from(&ns_a, &api_ip, 2), "A lost the API");
    assert!(ping_from(&ns_b, &api_ip, 2), "B lost the API");
    assert!(
        fetch(&cluster, "web-a", &ip_b).is_err(),
        "pod A still reaches pod B"
    );
    assert!(call_api(&cluster, "web-a").is_ok_and(|a| a.contains("serviceaccount")));
    assert!(call_api(&cluster, "web-b").is_ok_and(|a| a.contains("serviceaccount")));
    cluster.restore_intersite().expect("restore");
    assert!(
        ping_from(&ns_a, &node_b_ip, 2),
        "A doesn't reach B after restore"
    );
    assert_eq!(
        fetch(&cluster, "web-a", &ip_b)
            .expect("A reaches B again")
            .trim(),
        "hello-from-web-b"
    );

    // The inter-site link shaped to 40 Mbit/s with tbf: 2 MiB from B to A
    // take at least 0.4 s (unshaped: milliseconds).
    exec(
        &cluster,
        "web-b",
        "dd if=/dev/zero of=/www/big bs=1M count=2 2>/dev/null",
    )
    .expect("a 2 MiB file on B");
    let download = |cluster: &Cluster| -> (u64, f64) {
        let out = exec(
            cluster,
            "web-a",
            &format!("curl -s -o /dev/null --max-time 20 -w '%{{size_download}} %{{time_total}}' http://{ip_b}:8080/big"),
        )
        .expect("download from B");
        let mut fields = out.split_whitespace();
        let size = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        let secs = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
        (size, secs)
    };
    let (size, free) = download(&cluster);
    assert_eq!(size, 2 * 1024 * 1024);
    cluster.limit_intersite(Some(40)).expect("tbf");
    let (size, shaped) = download(&cluster);
    cluster.limit_intersite(None).expect("tbf removed");
    println!("2 MiB from B to A: {free:.3} s unshaped, {shaped:.3} s at 40 Mbit/s");
    assert_eq!(size, 2 * 1024 * 1024);
    assert!(
        shaped >= 0.35,
        "tbf did not shape the inter-site link: {shaped} s"
    );

    // Fault: site A partitioned from the control plane (still reaches B).
    let grace = ClusterOptions::default().node_monitor_grace;
    let bound = grace * 3 + Duration::from_secs(60);
    cluster.partition(Site::A).expect("partition");
    assert!(!ping_from(&ns_a, &api_ip, 2), "A still reaches the API");
    assert!(ping_from(&ns_b, &api_ip, 2), "B lost the API");
    assert!(ping_from(&ns_a, &node_b_ip, 2), "A lost B");
    let took = wait_node(&cluster, a1, false, bound).await;
    println!(
        "partitioned {a1} NotReady after {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(node_status(&cluster, b1).await.as_deref(), Some("True"));
    cluster.heal(Site::A).expect("heal");
    let took = wait_node(&cluster, a1, true, bound).await;
    println!("healed {a1} Ready again after {:.1} s", took.as_secs_f64());

    // Fault: power off site A. Its nodes go NotReady, its pods' processes
    // are gone, it is dark from B; on power-on its nodes boot fresh.
    let web_a_pids = cluster.node_pids(a1).expect("pids");
    assert!(web_a_pids.len() > 5, "{web_a_pids:?}");
    cluster.power_off_site(Site::A).expect("power off");
    let survivors: Vec<i32> = web_a_pids.iter().copied().filter(|&p| alive(p)).collect();
    assert!(
        survivors.is_empty(),
        "processes of {a1} survived: {survivors:?}"
    );
    assert!(
        !mounted(&vol.display().to_string()),
        "{a1}'s mount survived the power cut"
    );
    assert!(!ping_from(&ns_b, &node_a_ip, 2), "B still reaches A");
    let took = wait_node(&cluster, a1, false, bound).await;
    println!(
        "powered-off {a1} NotReady after {:.1} s",
        took.as_secs_f64()
    );
    assert_eq!(node_status(&cluster, b1).await.as_deref(), Some("True"));
    let t = Instant::now();
    cluster.power_on_site(Site::A).expect("power on");
    cluster
        .wait_ready(&[a1], Duration::from_secs(180))
        .await
        .expect("A's node Ready again");
    println!(
        "warm start: {a1} Ready {:.1} s after power-on (old disk, images already there)",
        t.elapsed().as_secs_f64()
    );
    wait_pod_ready(&cluster, "web-a");
    let ip_a = pod_ip(&cluster, "web-a");
    assert_eq!(
        fetch(&cluster, "web-b", &ip_a)
            .expect("B reaches A's restarted pod")
            .trim(),
        "hello-from-web-a"
    );

    // Fault: kill -9 a node (its whole cgroup), then bring it back.
    let daemons = cluster.node_daemons(b1).expect("daemons");
    let everything = cluster.node_pids(b1).expect("pids");
    cluster.kill_node(b1).expect("kill");
    for pid in &everything {
        assert!(
            !alive(*pid),
            "pid {pid} of {b1} survived kill -9 ({daemons:?})"
        );
    }
    let t = Instant::now();
    cluster.start_node(b1).expect("restart");
    cluster
        .wait_ready(&[b1], Duration::from_secs(180))
        .await
        .expect("B's node Ready again");
    println!(
        "warm start: {b1} Ready {:.1} s after kill -9 and restart",
        t.elapsed().as_secs_f64()
    );
    wait_pod_ready(&cluster, "web-b");

    // Down: nothing of ours is left (but the files, when asked to keep them).
    let keep = ClusterOptions::default().keep_files;
    cluster.shutdown().expect("teardown");
    let mut left = sweep::find(slot, &root);
    if keep {
        left.files.retain(|f| std::path::Path::new(f) != root);
    }
    assert!(left.is_empty(), "left behind after teardown:\n{left}");
}

#[test]
fn a_failed_test_leaves_nothing_behind() {
    let _one = ONE_CLUSTER_AT_A_TIME.blocking_lock();
    let (tx, rx) = std::sync::mpsc::channel();
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let cluster = Cluster::start(ClusterOptions::default())
                .await
                .expect("cluster starts");
            tx.send((cluster.slot(), cluster.root().to_owned()))
                .expect("send");
            apply(&cluster, &pod("doomed", node(Site::B), "exec sleep 100000")).await;
            wait_pod_ready(&cluster, "doomed");
            panic!("a test failing with a cluster and a pod running");
        })
    })
    .join();
    assert!(outcome.is_err(), "the thread was meant to panic");
    let (slot, root) = rx.recv().expect("the cluster started");
    let mut left = sweep::find(slot, &root);
    if ClusterOptions::default().keep_files {
        left.files.retain(|f| std::path::Path::new(f) != root);
    }
    assert!(left.is_empty(), "a panicking test left behind:\n{left}");
}
