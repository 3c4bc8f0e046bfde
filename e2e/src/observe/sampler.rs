//! A watcher (in a test process, or `twinvol-cluster follow`) that samples,
//! every 200 ms, what a fail-over is made of — the workload's pods (node,
//! phase, container started, Ready, being deleted), the Sites' health and
//! fencing, the MirroredVolume (epoch, in-sync set, frontend, replicas and
//! resync progress, conditions) and the VolumeAttachments — and keeps every
//! changed sample, so that a test can find when each step first happened on
//! one clock (the process's monotonic clock) with a 0.2 s resolution.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::storage::v1::VolumeAttachment;
use kube::api::ListParams;
use kube::{Api, Client};
use twinvol_crds::{MirroredVolume, Site};

/// One pod of the workload as sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct PodSample {
    pub uid: String,
    pub name: String,
    pub node: Option<String>,
    pub phase: Option<String>,
    pub started: bool,
    pub ready: bool,
    pub deleting: bool,
    /// The container's restart count (kubelet restarted it in place).
    pub restarts: i32,
}

/// One replica of the volume as sampled.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplicaSample {
    pub site: String,
    pub state: String,
    pub done: Option<u64>,
    pub remaining: Option<u64>,
}

/// Everything sampled at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    pub pods: Vec<PodSample>,
    /// (site, Healthy condition status, fenced).
    pub sites: Vec<(String, String, bool)>,
    pub pvc_bound: bool,
    pub volume: Option<String>,
    pub epoch: Option<u64>,
    pub in_sync: Vec<String>,
    pub frontend: Option<String>,
    pub replicas: Vec<ReplicaSample>,
    /// `type=status(reason)` of every condition.
    pub conditions: Vec<String>,
    /// (node, attached) of the volume's attachments.
    pub attachments: Vec<(String, bool)>,
}

impl Sample {
    pub fn site_healthy(&self, site: &str) -> Option<bool> {
        self.sites
            .iter()
            .find(|(s, _, _)| s == site)
            .map(|(_, h, _)| h == "True")
    }

    /// The uid of the workload's pod running Ready on `node`, if one is.
    pub fn running_on(&self, node: &str) -> Option<String> {
        self.pods
            .iter()
            .find(|p| p.node.as_deref() == Some(node) && p.ready && !p.deleting)
            .map(|p| p.uid.clone())
    }

    pub fn site_fenced(&self, site: &str) -> bool {
        self.sites.iter().any(|(s, _, f)| s == site && *f)
    }

    pub fn condition(&self, kind: &str) -> Option<&str> {
        self.conditions
            .iter()
            .find(|c| c.starts_with(&format!("{kind}=")))
            .map(String::as_str)
    }
}

/// `b - a` in seconds, one decimal, negative when `b` came first.
pub fn between(a: Instant, b: Instant) -> String {
    if b >= a {
        format!("{:.1} s", (b - a).as_secs_f64())
    } else {
        format!("-{:.1} s", (a - b).as_secs_f64())
    }
}

/// The sampler.
#[derive(Clone)]
pub struct Observer {
    samples: Arc<Mutex<Vec<(Instant, Sample)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Observer {
    /// Samples pods labelled `app=<app>` in `default` and the claim
    /// `pvc` (its volume once bound).
    pub fn start(client: Client, app: &str, pvc: &str) -> Observer {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let observer = Observer {
            samples: samples.clone(),
            stop: stop.clone(),
        };
        let (app, pvc) = (app.to_owned(), pvc.to_owned());
        tokio::spawn(async move {
            let mut last: Option<Sample> = None;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(sample) = take(&client, &app, &pvc).await {
                    let now = Instant::now();
                    if last.as_ref() != Some(&sample) {
                        samples
                            .lock()
                            .expect("samples lock")
                            .push((now, sample.clone()));
                        last = Some(sample);
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        observer
    }

    /// The first sample at or after `since` for which `ok` holds.
    pub fn first(&self, since: Instant, ok: impl Fn(&Sample) -> bool) -> Option<Instant> {
        self.samples
            .lock()
            .expect("samples lock")
            .iter()
            .filter(|(t, _)| *t >= since)
            .find(|(_, s)| ok(s))
            .map(|(t, _)| *t)
    }

    /// The samples kept from the `index`-th on (0: all), with when.
    pub fn samples_from(&self, index: usize) -> Vec<(Instant, Sample)> {
        self.samples
            .lock()
            .expect("samples lock")
            .iter()
            .skip(index)
            .cloned()
            .collect()
    }

    /// How many changed samples were kept at or after `since`.
    pub fn changes_since(&self, since: Instant) -> usize {
        self.samples
            .lock()
            .expect("samples lock")
            .iter()
            .filter(|(t, _)| *t >= since)
            .count()
    }

    /// Like [`Self::first`], but the sample taken just before `since`
    /// counts too (the state then still holds at `since`).
    pub fn latest(&self) -> Option<Sample> {
        self.samples
            .lock()
            .expect("samples lock")
            .last()
            .map(|(_, s)| s.clone())
    }

    /// Waits until a sample satisfies `ok`; panics with the last sample and
    /// `what` after `timeout`.
    pub async fn wait(
        &self,
        what: &str,
        since: Instant,
        timeout: Duration,
        ok: impl Fn(&Sample) -> bool,
    ) -> Instant {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(t) = self.first(since, &ok) {
                return t;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not seen within {timeout:?}; last sample {:#?}",
                    self.latest()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every change seen, one line each, times relative to `zero`.
    pub fn transcript(&self, zero: Instant) -> String {
        let mut text = String::new();
        for (t, s) in self.samples.lock().expect("samples lock").iter() {
            let rel = if *t >= zero {
                format!("+{:.1}", (*t - zero).as_secs_f64())
            } else {
                format!("-{:.1}", (zero - *t).as_secs_f64())
            };
            let pods: Vec<String> = s
                .pods
                .iter()
                .map(|p| {
                    format!(
                        "{}@{}:{}{}{}{}{}",
                        &p.uid[..8.min(p.uid.len())],
                        p.node.as_deref().unwrap_or("-"),
                        p.phase.as_deref().unwrap_or("-"),
                        if p.started { ",started" } else { "" },
                        if p.ready { ",ready" } else { "" },
                        if p.deleting { ",deleting" } else { "" },
                        if p.restarts > 0 {
                            format!(",restarts={}", p.restarts)
                        } else {
                            String::new()
                        },
                    )
                })
                .collect();
            let replicas: Vec<String> = s
                .replicas
                .iter()
                .map(|r| {
                    format!(
                        "{}:{}{}",
                        r.site,
                        r.state,
                        match (r.done, r.remaining) {
                            (Some(d), Some(left)) => format!("({d}/{})", d + left),
                            _ => String::new(),
                        }
                    )
                })
                .collect();
            text += &format!(
                "{rel:>7}s pods {pods:?} sites {:?} epoch {:?} in-sync {:?} frontend {:?} replicas {replicas:?} va {:?} {:?}\n",
                s.sites, s.epoch, s.in_sync, s.frontend, s.attachments, s.conditions
            );
        }
        text
    }

    pub fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if Arc::strong_count(&self.samples) <= 2 {
            self.stop();
        }
    }
}

async fn take(client: &Client, app: &str, pvc: &str) -> Result<Sample, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let list = pods
        .list(&ListParams::default().labels(&format!("app={app}")))
        .await?;
    let mut sample = Sample::default();
    for pod in list.items {
        let status = pod.status.clone().unwrap_or_default();
        let started = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.running.is_some());
        let restarts = status
            .container_statuses
            .as_ref()
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count);
        let ready = status
            .conditions
            .as_ref()
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
        sample.pods.push(PodSample {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name: pod.metadata.name.clone().unwrap_or_default(),
            node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
            phase: status.phase.clone(),
            started,
            ready,
            deleting: pod.metadata.deletion_timestamp.is_some(),
            restarts,
        });
    }
    let sites: Api<Site> = Api::all(client.clone());
    for site in sites.list(&ListParams::default()).await?.items {
        let status = site.status.clone().unwrap_or_default();
        let healthy = status
            .conditions
            .iter()
            .find(|c| c.type_ == "Healthy")
            .map(|c| c.status.clone())
            .unwrap_or_default();
        sample.sites.push((
            site.metadata.name.clone().unwrap_or_default(),
            healthy,
            status.fenced,
        ));
    }
    let claims: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), "default");
    if let Some(claim) = claims.get_opt(pvc).await? {
        sample.pvc_bound = claim
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .is_some_and(|p| p == "Bound");
        sample.volume = claim.spec.and_then(|s| s.volume_name);
    }
    if let Some(pv_name) = sample.volume.clone() {
        let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
        let handle = pvs
            .get_opt(&pv_name)
            .await?
            .and_then(|pv| pv.spec)
            .and_then(|s| s.csi)
            .map(|c| c.volume_handle)
            .unwrap_or_else(|| pv_name.clone());
        let volume = handle;
        let volumes: Api<MirroredVolume> = Api::all(client.clone());
        if let Some(mv) = volumes.get_opt(&volume).await? {
            let status = mv.status.unwrap_or_default();
            sample.epoch = Some(status.epoch.get());
            sample.in_sync = status.in_sync.iter().map(|s| s.to_string()).collect();
            sample.frontend = status.frontend.as_ref().map(|f| f.node.to_string());
            sample.replicas = status
                .replicas
                .iter()
                .map(|r| ReplicaSample {
                    site: r.site.to_string(),
                    state: format!("{:?}", r.state),
                    done: r.resync_bytes_done.map(|b| b.get()),
                    remaining: r.resync_bytes_remaining.map(|b| b.get()),
                })
                .collect();
            sample.conditions = status
                .conditions
                .iter()
                .map(|c| format!("{}={}({})", c.type_, c.status, c.reason))
                .collect();
        }
        let attachments: Api<VolumeAttachment> = Api::all(client.clone());
        for va in attachments.list(&ListParams::default()).await?.items {
            if va.spec.source.persistent_volume_name.as_deref() == Some(pv_name.as_str()) {
                sample.attachments.push((
                    va.spec.node_name.clone(),
                    va.status.as_ref().is_some_and(|s| s.attached),
                ));
            }
        }
    }
    Ok(sample)
}
