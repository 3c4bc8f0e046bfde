//! The scenario workload of the bed's site-loss tests and of the demo: a
//! StatefulSet whose pod appends checksummed records to a file on its
//! twinvol volume, fsyncs each one, and only then reports it over TCP to a
//! collector in the test process or the cluster supervisor (on the control
//! plane's address, the third location, so it survives either site's
//! power-off). What the collector received is what was acknowledged; the
//! check reads the file back and finds every one of them, intact.
//!
//! Each acknowledged record is also appended to `acked.<app>` in the node's
//! `shared/` directory on the host (a hostPath of the bed's `nodes/`): the
//! node's disk outlives its power and its network, so records acknowledged
//! on a site cut off from the collector are known too. A write or fsync that
//! fails (an I/O error the application sees) is logged to `errors.<app>`
//! there before the container exits: [`io_errors`] reads them.
//!
//! A record is one line: `<incarnation> <seq> <payload> <sha-256 of the rest, 16 hex digits>`;
//! each start of the container is a new incarnation (a random id), counting
//! from 0. Lines that do not verify may only be unacknowledged tails.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::io::AsyncBufReadExt;

use crate::HarnessError;

/// The writer's shell script (busybox sh of the workload image).
const SCRIPT: &str = r#"
set -u
inc=$(cat /proc/sys/kernel/random/uuid | cut -c1-8)
n=0
touch /data/records
mkdir -p "/acks/$NODE_NAME/shared"
echo "started $inc on $NODE_NAME" >&2
while true; do
  rec="$inc $n $NODE_NAME-$(date +%s)-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
  sum=$(printf '%s' "$rec" | sha256sum | cut -c1-16)
  if ! printf '%s %s\n' "$rec" "$sum" | dd of=/data/records oflag=append conv=notrunc,fsync status=none; then
    echo "$inc $n $(date +%s) dd of /data/records failed" >> "/acks/$NODE_NAME/shared/errors.$APP"
    exit 1
  fi
  echo "$rec $sum" >> "/acks/$NODE_NAME/shared/acked.$APP"
  echo "$rec $sum"
  n=$((n + 1))
  usleep 20000
done | nc $COLLECTOR_IP $COLLECTOR_PORT
"#;

/// Every record the collector received, by arrival: kept in memory (a
/// test's collector), or appended to a file (the cluster supervisor's, which
/// may run for days under a kept demo).
#[derive(Clone)]
pub struct Collector {
    inner: Arc<Mutex<Received>>,
    pub addr: Option<SocketAddr>,
}

struct Received {
    count: usize,
    sink: Sink,
}

enum Sink {
    Memory(Vec<(Instant, String)>),
    File { path: PathBuf, file: std::fs::File },
}

impl Collector {
    /// Listens on `ip` (any port) and collects lines from every connection
    /// in memory.
    pub async fn start(ip: Ipv4Addr) -> Collector {
        Self::listen(ip, Sink::Memory(Vec::new()))
            .await
            .expect("collector binds")
    }

    /// Listens on `ip` (any port) and appends the lines of every connection
    /// to `path` (created, or appended to).
    pub async fn to_file(ip: Ipv4Addr, path: &Path) -> Result<Collector, HarnessError> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| HarnessError::Io {
                action: "opening",
                path: path.to_owned(),
                source,
            })?;
        Self::listen(
            ip,
            Sink::File {
                path: path.to_owned(),
                file,
            },
        )
        .await
    }

    async fn listen(ip: Ipv4Addr, sink: Sink) -> Result<Collector, HarnessError> {
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .map_err(|source| HarnessError::Io {
                action: "binding the record collector on",
                path: PathBuf::from(ip.to_string()),
                source,
            })?;
        let addr = listener.local_addr().ok();
        let inner = Arc::new(Mutex::new(Received { count: 0, sink }));
        let received = inner.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let received = received.clone();
                tokio::spawn(async move {
                    let mut lines = tokio::io::BufReader::new(stream).lines();
                    while let Ok(Some(line)) = lines.next_line().await {
                        received.lock().expect("collector lock").push(line);
                    }
                });
            }
        });
        Ok(Collector { inner, addr })
    }

    pub fn count(&self) -> usize {
        self.inner.lock().expect("collector lock").count
    }

    /// The records received, in order of arrival.
    pub fn lines(&self) -> Vec<String> {
        let received = self.inner.lock().expect("collector lock");
        match &received.sink {
            Sink::Memory(lines) => lines.iter().map(|(_, l)| l.clone()).collect(),
            Sink::File { path, .. } => std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(str::to_owned)
                .collect(),
        }
    }
}

impl Collector {
    /// The records received with when, in order of arrival (a collector
    /// to a file keeps no times: none).
    pub fn arrivals(&self) -> Vec<(Instant, String)> {
        match &self.inner.lock().expect("collector lock").sink {
            Sink::Memory(lines) => lines.clone(),
            Sink::File { .. } => Vec::new(),
        }
    }
}

impl Received {
    fn push(&mut self, line: String) {
        use std::io::Write;
        self.count += 1;
        match &mut self.sink {
            Sink::Memory(lines) => lines.push((Instant::now(), line)),
            // A failed append loses the line from this log only: the nodes'
            // acked.<app> logs hold it too.
            Sink::File { file, .. } => {
                let _ = writeln!(file, "{line}");
            }
        }
    }
}

/// The StatefulSet `name` in `default`: one replica preferring site
/// `home` (a preferred node affinity, so that it can run on the other site
/// and comes home when moved), claiming `size` of `storage_class`.
pub fn statefulset(
    name: &str,
    storage_class: &str,
    size: &str,
    home_zone: &str,
    collector: SocketAddr,
    nodes_dir: &Path,
) -> String {
    statefulset_with(
        name,
        storage_class,
        size,
        home_zone,
        collector,
        nodes_dir,
        "",
    )
}

/// [`statefulset`] with more containers in the pod: `containers` is YAML
/// list items indented by eight spaces (they may mount `data` at /data).
pub fn statefulset_with(
    name: &str,
    storage_class: &str,
    size: &str,
    home_zone: &str,
    collector: SocketAddr,
    nodes_dir: &Path,
    containers: &str,
) -> String {
    let script = serde_json::to_string(SCRIPT).expect("a string");
    format!(
        r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: {name}, namespace: default}}
spec:
  serviceName: {name}
  replicas: 1
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 2
      affinity:
        nodeAffinity:
          preferredDuringSchedulingIgnoredDuringExecution:
            - weight: 100
              preference:
                matchExpressions:
                  - {{key: topology.kubernetes.io/zone, operator: In, values: [{home_zone}]}}
      containers:
        - name: writer
          image: twinvol.local/workload:1
          imagePullPolicy: Never
          command: [/bin/sh, -c, {script}]
          env:
            - {{name: COLLECTOR_IP, value: "{ip}"}}
            - {{name: COLLECTOR_PORT, value: "{port}"}}
            - {{name: APP, value: "{name}"}}
            - name: NODE_NAME
              valueFrom: {{fieldRef: {{fieldPath: spec.nodeName}}}}
          readinessProbe:
            exec: {{command: [/bin/sh, -c, "test -s /data/records"]}}
            periodSeconds: 1
            failureThreshold: 1
          volumeMounts:
            - {{name: data, mountPath: /data}}
            # The bed's nodes/ holds every node's kubelet directory: without
            # HostToContainer this pod would keep a private copy of other
            # pods' volume mounts (a node's unstage then finds its
            # filesystem still mounted here and refuses).
            - {{name: acks, mountPath: /acks, mountPropagation: HostToContainer}}
{containers}      volumes:
        - name: acks
          hostPath: {{path: "{nodes}", type: Directory}}
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        storageClassName: {storage_class}
        resources: {{requests: {{storage: {size}}}}}
"#,
        nodes = nodes_dir.display(),
        ip = collector.ip(),
        port = collector.port(),
    )
}

/// What the check of a records file found.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Lines in the file whose checksum verifies.
    pub valid: usize,
    /// Lines that do not (torn or zeroed tails of a power cut).
    pub invalid: Vec<String>,
    /// Acknowledged records absent from the file (must be empty).
    pub missing: Vec<String>,
    /// Acknowledged records in the file.
    pub found: usize,
    /// Incarnations seen in the file, with their record counts.
    pub incarnations: BTreeMap<String, usize>,
}

fn checksum(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// Checks `file` (the records file's contents) against the acknowledged
/// records: every acknowledged one must be there with its checksum.
pub fn verify(file: &str, acked: &[String]) -> Verdict {
    let mut verdict = Verdict::default();
    let mut present = BTreeSet::new();
    for line in file.lines() {
        let Some((rec, sum)) = line.rsplit_once(' ') else {
            verdict.invalid.push(line.to_owned());
            continue;
        };
        if checksum(rec) == sum {
            verdict.valid += 1;
            present.insert(line.to_owned());
            let inc = rec.split(' ').next().unwrap_or_default().to_owned();
            *verdict.incarnations.entry(inc).or_default() += 1;
        } else {
            verdict.invalid.push(line.chars().take(120).collect());
        }
    }
    for record in acked {
        if present.contains(record) {
            verdict.found += 1;
        } else {
            verdict.missing.push(record.clone());
        }
    }
    verdict
}

/// The lines of `shared/<file>` of every node.
fn node_logs(nodes_dir: &Path, file: &str) -> Vec<String> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir(nodes_dir).into_iter().flatten().flatten() {
        let log = entry.path().join("shared").join(file);
        if let Ok(text) = std::fs::read_to_string(&log) {
            all.extend(text.lines().map(str::to_owned));
        }
    }
    all
}

/// The node's log of the records `app`'s pods acknowledged on it.
pub fn acked_log(nodes_dir: &Path, node: &str, app: &str) -> std::path::PathBuf {
    nodes_dir
        .join(node)
        .join("shared")
        .join(format!("acked.{app}"))
}

/// The records `app`'s pods acknowledged, from the nodes' `shared/acked.<app>` logs.
pub fn acked_on_nodes(nodes_dir: &Path, app: &str) -> Vec<String> {
    node_logs(nodes_dir, &format!("acked.{app}"))
}

/// The I/O errors `app`'s pods saw (a failed write or fsync of a record),
/// from the nodes' `shared/errors.<app>` logs.
pub fn io_errors(nodes_dir: &Path, app: &str) -> Vec<String> {
    node_logs(nodes_dir, &format!("errors.{app}"))
}

/// Every record `app` acknowledged: the collector's and the nodes' logs.
pub fn all_acked(collector: &Collector, nodes_dir: &Path, app: &str) -> Vec<String> {
    let mut all: BTreeSet<String> = collector.lines().into_iter().collect();
    all.extend(acked_on_nodes(nodes_dir, app));
    all.into_iter().collect()
}
