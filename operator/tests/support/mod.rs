//! The operator's test bed: a real control plane (etcd + kube-apiserver
//! from the e2e harness) with twinvol's CRDs, the `twinvol-operator` binary
//! as a real process, the `twinvol-test-heartbeat` stand-ins for the node
//! plugins and frontends (real processes; SIGKILL makes a site go dark),
//! and helpers that create Sites, Nodes, volumes and the plain Pods,
//! claims, PersistentVolumes and VolumeAttachments that stand in for
//! workloads (there is no kubelet here: the test plays the kubelet and the
//! StatefulSet controller where the story needs them, and says so).

#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use twinvol_crds::{MirroredVolume, NodeName, Site};
use twinvol_csi_driver::arbiter::KubeArbiter;
use twinvol_e2e::process::ManagedProcess;
use twinvol_e2e::wait::{self, Poll};
use twinvol_e2e::{ControlPlane, ControlPlaneOptions};
use twinvol_engine::arbiter::{Arbiter, ArbiterError, Change};
use twinvol_engine::protocol::ReplicaId;

pub const NS: &str = "twinvol-system";
pub const APPS: &str = "default";

/// The timings every test runs the operator with: 250 ms heartbeats,
/// stale after 1.5 s, 2 s frontend leases, 0.5 s margin, 2 s recovery.
pub const STALENESS: Duration = Duration::from_millis(1500);
pub const LEASE: Duration = Duration::from_secs(2);
pub const MARGIN: Duration = Duration::from_millis(500);
pub const RECOVERY: Duration = Duration::from_secs(2);

/// Generous bound for anything to happen on a loaded machine.
pub const WAIT: Duration = Duration::from_secs(60);

pub struct Bed {
    pub plane: ControlPlane,
    pub client: Client,
    logs: PathBuf,
    started: Instant,
    timeline: Mutex<Vec<String>>,
    ports: Mutex<std::collections::HashMap<String, u16>>,
}

impl Bed {
    pub async fn start() -> Self {
        let plane = ControlPlane::start(ControlPlaneOptions::api_server_only())
            .await
            .expect("a control plane (etcd, kube-apiserver; build them with e2e/tools/build-upstream.sh)");
        plane
            .install_twinvol_crds(Duration::from_secs(120))
            .await
            .expect("twinvol CRDs installed");
        let client = plane.client();
        let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": NS}})).expect("ns");
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("namespace created");
        // No controller-manager here: the ServiceAccounts it would make (pods
        // stand in for workloads in APPS and for the CSI controller in NS).
        let sa: k8s_openapi::api::core::v1::ServiceAccount =
            serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("sa");
        for ns in [APPS, NS] {
            Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &sa)
                .await
                .expect("service account created");
        }
        let logs = plane.dir().join("logs");
        Self {
            plane,
            client,
            logs,
            started: Instant::now(),
            timeline: Mutex::new(Vec::new()),
            ports: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Notes a moment of the story (printed with its offset).
    pub fn mark(&self, what: impl AsRef<str>) -> Duration {
        let at = self.started.elapsed();
        let line = format!("{:>8.3}s  {}", at.as_secs_f64(), what.as_ref());
        println!("{line}");
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
        at
    }

    pub fn timeline(&self) -> String {
        self.timeline
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .join("\n")
    }

    fn spawn(&self, name: &str, program: &str, args: Vec<String>) -> ManagedProcess {
        let mut all = vec![format!(
            "--kubeconfig={}",
            self.plane.kubeconfig().display()
        )];
        all.extend(args);
        ManagedProcess::spawn(
            name,
            std::path::Path::new(program),
            &all,
            &self.logs.join(format!("{name}.log")),
        )
        .unwrap_or_else(|e| panic!("starting {name}: {e}"))
    }

    /// A twinvol-operator process with the test timings.
    pub fn operator(&self, name: &str) -> ManagedProcess {
        self.operator_with(name, &[])
    }

    /// Like [`Bed::operator`], with some of the test timings replaced:
    /// `("--staleness-threshold", "6s")`.
    pub fn operator_with(&self, name: &str, timings: &[(&str, &str)]) -> ManagedProcess {
        let port = twinvol_e2e::ports::free_port().expect("a free port");
        self.ports
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), port);
        self.spawn(
            name,
            env!("CARGO_BIN_EXE_twinvol-operator"),
            vec![
                format!("--namespace={NS}"),
                format!("--identity={name}"),
                "--heartbeat-period=250ms".into(),
                "--staleness-threshold=1500ms".into(),
                "--lease-duration=2s".into(),
                "--margin=500ms".into(),
                "--recovery=2s".into(),
                "--move-home-cooldown=30s".into(),
                "--leader-lease-duration=2s".into(),
                "--leader-lease-grace=1s".into(),
                format!("--metrics-address=127.0.0.1:{port}"),
                "--log-format=json".into(),
            ]
            .into_iter()
            .map(|arg| {
                match timings
                    .iter()
                    .find(|(flag, _)| arg.starts_with(&format!("{flag}=")))
                {
                    Some((flag, value)) => format!("{flag}={value}"),
                    None => arg,
                }
            })
            .collect(),
        )
    }

    /// Node plugin heartbeats for `nodes` (one process: a site).
    pub fn heartbeats(&self, name: &str, nodes: &[&str]) -> ManagedProcess {
        let mut args = vec![
            format!("--namespace={NS}"),
            "--period=250ms".into(),
            "--duration-seconds=2".into(),
            "--pool-capacity=1099511627776".into(),
        ];
        args.extend(nodes.iter().map(|n| format!("--node={n}")));
        self.spawn(name, env!("CARGO_BIN_EXE_twinvol-test-heartbeat"), args)
    }

    /// A frontend holding `volume`'s lease from `node` (real arbiter code).
    pub fn frontend(&self, volume: &str, node: &str) -> ManagedProcess {
        self.spawn(
            &format!("frontend-{volume}-{node}"),
            env!("CARGO_BIN_EXE_twinvol-test-heartbeat"),
            vec![
                format!("--namespace={NS}"),
                format!("--frontend={volume}={node}"),
                "--lease-duration=2s".into(),
                "--lease-margin=500ms".into(),
            ],
        )
    }

    /// GET `path` from operator `name`'s HTTP endpoint: (status line, body).
    pub fn http_get(&self, name: &str, path: &str) -> (String, String) {
        use std::io::{Read, Write};
        let port = self.ports.lock().unwrap_or_else(|e| e.into_inner())[name];
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connects");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").expect("sends");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("reads");
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        (
            head.lines().next().unwrap_or_default().to_owned(),
            body.to_owned(),
        )
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.logs.join(format!("{name}.log"))
    }

    pub fn operator_log(&self, name: &str) -> String {
        twinvol_e2e::process::tail(&self.logs.join(format!("{name}.log")), 400)
    }

    pub async fn create<K>(&self, api: &Api<K>, value: Value) -> K
    where
        K: kube::Resource
            + Clone
            + serde::de::DeserializeOwned
            + serde::Serialize
            + std::fmt::Debug,
    {
        let obj: K = serde_json::from_value(value.clone())
            .unwrap_or_else(|e| panic!("bad object {value}: {e}"));
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("creating {value}: {e}"))
    }

    /// A Site selecting `zone`.
    pub async fn site(&self, name: &str, zone: &str) {
        let api: Api<Site> = Api::all(self.client.clone());
        self.create(
            &api,
            json!({"apiVersion": "twinvol.io/v1alpha1", "kind": "Site", "metadata": {"name": name},
                   "spec": {"nodeSelector": {"matchLabels": {"topology.kubernetes.io/zone": zone}},
                            "pool": "/var/lib/twinvol"}}),
        )
        .await;
    }

    /// A Node in `zone`, Ready (as its kubelet would report).
    pub async fn node(&self, name: &str, zone: &str) {
        let api: Api<Node> = Api::all(self.client.clone());
        self.create(
            &api,
            json!({"metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}}}),
        )
        .await;
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "stand-in kubelet", "lastHeartbeatTime": now, "lastTransitionTime": now}]}})),
        )
        .await
        .expect("node status");
    }

    pub async fn volume(&self, name: &str, sites: [&str; 2], preferred: &str, failback: &str) {
        let api: Api<MirroredVolume> = Api::all(self.client.clone());
        self.create(
            &api,
            json!({"apiVersion": "twinvol.io/v1alpha1", "kind": "MirroredVolume",
                   "metadata": {"name": name},
                   "spec": {"size": "1Gi", "sites": sites, "preferredSite": preferred, "failback": failback}}),
        )
        .await;
    }

    /// The PV and claim of `volume` (bound statically), for pods to use.
    pub async fn claim(&self, volume: &str) {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        self.create(
            &pvs,
            json!({"metadata": {"name": format!("pv-{volume}")},
                   "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
                            "persistentVolumeReclaimPolicy": "Retain",
                            "claimRef": {"namespace": APPS, "name": format!("data-{volume}")},
                            "csi": {"driver": "csi.twinvol.io", "volumeHandle": volume}}}),
        )
        .await;
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(self.client.clone(), APPS);
        self.create(
            &claims,
            json!({"metadata": {"name": format!("data-{volume}")},
                   "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "",
                            "volumeName": format!("pv-{volume}"),
                            "resources": {"requests": {"storage": "1Gi"}}}}),
        )
        .await;
    }

    /// A pod using `volume`'s claim, bound to `node` (what a StatefulSet
    /// and the scheduler would make), and the VolumeAttachment of the
    /// volume to that node (what the attach/detach controller would make).
    pub async fn pod(&self, name: &str, volume: &str, node: &str) -> String {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), APPS);
        let pod = self
            .create(
                &pods,
                json!({"metadata": {"name": name, "labels": {"app": name}},
                       "spec": {"nodeName": node, "automountServiceAccountToken": false,
                                "containers": [{"name": "app", "image": "busybox", "imagePullPolicy": "Never"}],
                                "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": format!("data-{volume}")}}]}}),
            )
            .await;
        // The kubelet's report: running and ready (a pending pod would be
        // evicted without asking its PodDisruptionBudget).
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        pods.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Running", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now}]}})),
        )
        .await
        .expect("pod status");
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        self.create(
            &vas,
            json!({"metadata": {"name": format!("csi-{volume}-{node}")},
                   "spec": {"attacher": "csi.twinvol.io", "nodeName": node,
                            "source": {"persistentVolumeName": format!("pv-{volume}")}}}),
        )
        .await;
        pod.metadata.uid.unwrap_or_default()
    }

    pub async fn pod_uid(&self, name: &str) -> Option<(String, bool)> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), APPS);
        pods.get_opt(name).await.ok().flatten().map(|p| {
            (
                p.metadata.uid.unwrap_or_default(),
                p.metadata.deletion_timestamp.is_some(),
            )
        })
    }

    pub async fn attachment_exists(&self, name: &str) -> bool {
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        vas.get_opt(name).await.ok().flatten().is_some()
    }

    /// The kubelet's part of a graceful pod deletion: the pod's containers
    /// stopped, the pod object goes.
    pub async fn kubelet_finishes(&self, pod: &str) {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), APPS);
        let _ = pods
            .delete(
                pod,
                &DeleteParams {
                    grace_period_seconds: Some(0),
                    ..DeleteParams::default()
                },
            )
            .await;
    }

    pub async fn delete_attachment(&self, name: &str) {
        let vas: Api<VolumeAttachment> = Api::all(self.client.clone());
        let _ = vas.delete(name, &DeleteParams::default()).await;
    }

    pub async fn pdb(&self, name: &str, app: &str) {
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), APPS);
        self.create(
            &api,
            json!({"metadata": {"name": name},
                   "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": app}}}}),
        )
        .await;
    }

    pub async fn delete_pdb(&self, name: &str) {
        let api: Api<PodDisruptionBudget> = Api::namespaced(self.client.clone(), APPS);
        api.delete(name, &DeleteParams::default())
            .await
            .expect("pdb deleted");
    }

    pub async fn mv(&self, name: &str) -> MirroredVolume {
        Api::<MirroredVolume>::all(self.client.clone())
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("reading MirroredVolume {name}: {e}"))
    }

    pub async fn site_obj(&self, name: &str) -> Site {
        Api::<Site>::all(self.client.clone())
            .get(name)
            .await
            .unwrap_or_else(|e| panic!("reading Site {name}: {e}"))
    }

    pub async fn node_taints(&self, name: &str) -> Vec<String> {
        let node = Api::<Node>::all(self.client.clone())
            .get(name)
            .await
            .expect("node");
        node.spec
            .and_then(|s| s.taints)
            .unwrap_or_default()
            .into_iter()
            .map(|t| t.key)
            .collect()
    }

    pub async fn annotate<K>(&self, api: &Api<K>, name: &str, annotations: Value)
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": annotations}})),
        )
        .await
        .unwrap_or_else(|e| panic!("annotating {name}: {e}"));
    }

    /// Waits for `check` with the bed's generous deadline; panics with what
    /// was last seen and the tail of `log` (a process log name).
    pub async fn until<T, F, Fut>(&self, what: &str, log: &str, check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Poll<T>>,
    {
        match wait::until(WAIT, check).await {
            Ok(v) => v,
            Err(last) => panic!(
                "timed out waiting for {what}; last seen: {last}\ntimeline:\n{}\n--- {log} log ---\n{}",
                self.timeline(),
                self.operator_log(log)
            ),
        }
    }

    /// What a frontend does when its resync finished: the replica of
    /// `site` returns to the in-sync set (a compare-and-swap through the
    /// real arbiter), and its node plugin reports it InSync.
    /// Waits (following operator `log`) until `volume`'s epoch is past 1;
    /// returns the volume as then.
    pub async fn epoch_bumped(&self, volume: &str, log: &str) -> MirroredVolume {
        self.until(&format!("{volume}'s epoch bumped"), log, || async {
            let mv = self.mv(volume).await;
            if epoch(&mv) > 1 {
                Poll::Ready(mv)
            } else {
                Poll::Pending(format!("{:?}", mv.status))
            }
        })
        .await
    }

    pub async fn resync_done(&self, volume: &str, site: &str) {
        self.report_replica(volume, site, "Resyncing", Some(4096))
            .await;
        let arbiter = KubeArbiter::new(
            self.client.clone(),
            volume,
            NodeName::new("test-resync").expect("valid"),
        );
        let replica = ReplicaId::new(site).expect("valid");
        loop {
            let record = arbiter.read().await.expect("record");
            if record.in_sync.contains(&replica) {
                break;
            }
            match arbiter
                .update(&record.version, Change::ReturnToInSync(replica.clone()))
                .await
            {
                Ok(_) => break,
                Err(ArbiterError::Conflict { .. }) => continue,
                Err(e) => panic!("returning {site} to the in-sync set of {volume}: {e}"),
            }
        }
        self.report_replica(volume, site, "InSync", None).await;
    }

    /// What a frontend does when it loses a replica: it leaves the in-sync set.
    pub async fn replica_lost(&self, volume: &str, site: &str) {
        let arbiter = KubeArbiter::new(
            self.client.clone(),
            volume,
            NodeName::new("test-frontend").expect("valid"),
        );
        let replica = ReplicaId::new(site).expect("valid");
        loop {
            let record = arbiter.read().await.expect("record");
            match arbiter
                .update(&record.version, Change::RemoveFromInSync(replica.clone()))
                .await
            {
                Ok(_) => break,
                Err(ArbiterError::Conflict { .. }) => continue,
                Err(e) => panic!("removing {site} from the in-sync set of {volume}: {e}"),
            }
        }
        self.report_replica(volume, site, "OutOfSync", None).await;
    }

    /// The node plugin's report of a replica's state (read-modify-write of
    /// its entry with a resourceVersion precondition, as the node plugin
    /// would do).
    pub async fn report_replica(
        &self,
        volume: &str,
        site: &str,
        state: &str,
        remaining: Option<u64>,
    ) {
        let api: Api<kube::api::DynamicObject> = Api::all_with(
            self.client.clone(),
            &kube::api::ApiResource::erase::<MirroredVolume>(&()),
        );
        loop {
            let mut obj = api.get(volume).await.expect("volume");
            let replicas = obj.data["status"]["replicas"]
                .as_array_mut()
                .expect("placed replicas");
            for r in replicas.iter_mut() {
                if r["site"] == site {
                    r["state"] = json!(state);
                    match remaining {
                        Some(b) => r["resyncBytesRemaining"] = json!(b),
                        None => {
                            if let Some(o) = r.as_object_mut() {
                                o.remove("resyncBytesRemaining");
                            }
                        }
                    }
                }
            }
            match api
                .replace_status(volume, &PostParams::default(), &obj)
                .await
            {
                Ok(_) => break,
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => panic!("reporting {volume}/{site}: {e}"),
            }
        }
    }
}

/// The status of condition `type_` of a volume: (status, reason, message).
pub fn condition(mv: &MirroredVolume, type_: &str) -> Option<(String, String, String)> {
    mv.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn site_condition(site: &Site, type_: &str) -> Option<(String, String, String)> {
    site.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

pub fn epoch(mv: &MirroredVolume) -> u64 {
    mv.status.as_ref().map_or(0, |s| s.epoch.get())
}

pub fn in_sync(mv: &MirroredVolume) -> Vec<String> {
    mv.status
        .as_ref()
        .map(|s| s.in_sync.iter().map(ToString::to_string).collect())
        .unwrap_or_default()
}

pub fn frontend_node(mv: &MirroredVolume) -> Option<String> {
    mv.status
        .as_ref()?
        .frontend
        .as_ref()
        .map(|f| f.node.to_string())
}

pub fn ready(v: bool) -> Poll<()> {
    if v {
        Poll::Ready(())
    } else {
        Poll::Pending(String::new())
    }
}
