//! The replica servers of the replicas placed on this node.
//!
//! The operator places each replica (`status.replicas[].node`); this loop
//! watches every MirroredVolume and, for the replica placed here:
//! creates its data in the Site's pool (`<pool>/<volume>/`, preallocated,
//! once), runs its replica server process (see `dataplane::replica`) on a
//! port kept across restarts, keeps the peers file pointing at the other
//! Site's replica, and reports the replica's address and state into the
//! MirroredVolume status by server-side apply (field manager
//! `twinvol-node-<node>`), only when they change — and, while this replica
//! resyncs its peer, the progress (`resyncBytesDone`/`Remaining`) in the
//! peer's entry, at most every 3 s; the peer's plugin then reports its
//! state `Resyncing` until it is back in the in-sync set. When the volume is
//! deleted it stops the server, removes the data, drops its entry from
//! `status.replicas` (the operator's finalizer goes when none is left) and
//! drops the Site's finalizer (`twinvol.io/replica-<site>`, the controller
//! plugin's, for clusters without the operator). Level-triggered: every event, and a tick every few seconds,
//! reconciles from what is (processes, files, the object), so a restarted
//! plugin re-adopts the servers that kept running.
//!
//! Layout of `<pool>/<volume>/`: the engine's pool directory of that one
//! volume (`<volume>/data`, `meta`, `bitmap`), plus `replica.json` (the
//! process spec; also the mark that the directory is ours), `.pid`,
//! `.log`, `.ready`, `peers` and `volume-uid` (the MirroredVolume's UID: a
//! directory of a deleted volume of the same name is removed before a new
//! one uses it).

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource, ResourceExt};
use tracing::Instrument;
use twinvol_crds::{MirroredVolume, ReplicaState, SiteName};
use twinvol_engine::protocol::VolumeId;
use twinvol_engine::replica::Pool;
use twinvol_engine::resync::{ResyncState, ResyncStatus};

use crate::dataplane::process::{self, ProcessFiles};
use crate::dataplane::{Launch, ReplicaServerSpec};
use crate::error::{CsiError, CsiResult};
use crate::names::replica_finalizer;

use super::NodeConfig;

const TICK: Duration = Duration::from_secs(5);
const READY_WAIT: Duration = Duration::from_secs(20);
const STOP_GRACE: Duration = Duration::from_secs(15);
/// Resync progress goes into the status at most this often.
const PROGRESS_EVERY: Duration = Duration::from_secs(3);

/// Runs the replicas placed on this node.
pub struct ReplicaSupervisor {
    api: Api<MirroredVolume>,
    config: NodeConfig,
    site: SiteName,
    /// The Site's pool on this node.
    pool_root: PathBuf,
    /// Volumes whose server this process found running (logged once).
    adopted: std::sync::Mutex<std::collections::HashSet<String>>,
    /// When each volume's resync progress was last written.
    progress_reported: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl ReplicaSupervisor {
    pub fn new(client: Client, config: NodeConfig, site: SiteName, pool: &str) -> Self {
        let pool_root = config.host_root.join(pool.trim_start_matches('/'));
        Self {
            api: Api::all(client),
            config,
            site,
            pool_root,
            adopted: Default::default(),
            progress_reported: Default::default(),
        }
    }

    pub fn pool_root(&self) -> &Path {
        &self.pool_root
    }

    fn manager(&self) -> String {
        format!("twinvol-node-{}", self.config.node)
    }

    fn replica_dir(&self, volume: &str) -> PathBuf {
        self.pool_root.join(volume)
    }

    fn files(&self, volume: &str) -> ProcessFiles {
        ProcessFiles::new(self.replica_dir(volume), "replica")
    }

    /// Watches and reconciles until the task is dropped: one worker task
    /// per volume (see [`worker`]), so that a volume whose server is slow
    /// to start or to stop (up to [`READY_WAIT`], [`STOP_GRACE`]) holds up
    /// no other volume.
    pub async fn run(self) {
        if let Err(e) = std::fs::create_dir_all(&self.pool_root) {
            tracing::error!(pool = %self.pool_root.display(), error = %e, "cannot create the Site's pool directory");
        }
        let this = std::sync::Arc::new(self);
        let mut workers = Workers::new(this.clone());
        let mut stream = watcher::watcher(this.api.clone(), watcher::Config::default()).boxed();
        let mut tick = tokio::time::interval(TICK);
        // The names of the current list while the watcher (re)lists; the
        // volumes that were known before and are not in it were deleted
        // while the watch was down.
        let mut relisting: Option<std::collections::BTreeSet<String>> = None;
        let mut listed = false;
        loop {
            tokio::select! {
                event = stream.next() => match event {
                    Some(Ok(Event::Apply(mv))) => workers.present(mv),
                    Some(Ok(Event::InitApply(mv))) => {
                        if let Some(names) = relisting.as_mut() {
                            names.insert(mv.name_any());
                        }
                        workers.present(mv);
                    }
                    Some(Ok(Event::Delete(mv))) => workers.gone(&mv.name_any()),
                    Some(Ok(Event::Init)) => relisting = Some(Default::default()),
                    Some(Ok(Event::InitDone)) => {
                        if let Some(names) = relisting.take() {
                            for name in workers.present_names() {
                                if !names.contains(&name) {
                                    tracing::info!(volume = %name, "the volume was deleted while the watch was down");
                                    workers.gone(&name);
                                }
                            }
                        }
                        listed = true;
                        workers.remove_orphans();
                    }
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "watch of the MirroredVolumes failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    None => return,
                },
                Some(name) = workers.done.recv() => workers.finished(&name),
                _ = tick.tick() => if listed {
                    workers.remove_orphans();
                },
            }
        }
    }

    async fn reconcile_logged(&self, mv: &MirroredVolume) {
        if let Err(e) = self.reconcile(mv).await {
            tracing::warn!(volume = %mv.name_any(), error = %twinvol_engine::error_chain(&e), "replica reconcile failed; retrying");
        }
    }

    /// Removes the volume's replica; says whether it is gone.
    async fn remove_logged(&self, volume: &str) -> bool {
        match self.remove_data(volume).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(volume, error = %twinvol_engine::error_chain(&e), "cannot remove replica data; retrying");
                false
            }
        }
    }

    async fn reconcile(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let name = mv.name_any();
        let placed_here = mv
            .status
            .iter()
            .flat_map(|s| &s.replicas)
            .find(|r| r.node.as_ref().is_some_and(|n| *n == self.config.node));
        if mv.meta().deletion_timestamp.is_some() {
            self.remove_data(&name).await?;
            self.drop_entry(mv).await?;
            return self.drop_finalizer(mv).await;
        }
        let Some(entry) = placed_here else {
            // Placed elsewhere (or not yet): nothing of ours should run.
            if self.files(&name).running().is_some() {
                tracing::info!(volume = %name, "the replica is no longer placed here: stopping its server");
                process::stop(&self.files(&name), STOP_GRACE).await?;
            }
            return Ok(());
        };
        if entry.site != self.site {
            return Err(CsiError::Precondition {
                volume: name,
                detail: format!(
                    "its replica of site {} is placed on this node, which is in site {}",
                    entry.site, self.site
                ),
            });
        }
        self.drop_other_incarnation(mv).await?;
        let size = crate::volume::size_bytes(mv)?;
        self.ensure_data(&name, size).await?;
        self.record_incarnation(mv)?;
        self.write_peers(mv)?;
        let address = self.ensure_server(mv).await?;
        self.report(mv, &address).await
    }

    /// The file naming the MirroredVolume (its UID) whose replica the
    /// directory holds.
    fn uid_file(&self, volume: &str) -> PathBuf {
        self.replica_dir(volume).join("volume-uid")
    }

    /// A directory left by a deleted volume of the same name (its data not
    /// removed yet when the new one was created — a worker busy meanwhile,
    /// a finalizer bypassed) is removed first: the new volume must never
    /// be served the old one's data.
    async fn drop_other_incarnation(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let (name, Some(uid)) = (mv.name_any(), mv.uid()) else {
            return Ok(());
        };
        let Some(recorded) = self.recorded_uid(&name) else {
            return Ok(());
        };
        if recorded == uid {
            return Ok(());
        }
        tracing::warn!(volume = %name, old_uid = %recorded, uid, "the replica's directory belongs to a deleted volume of the same name: removing it first");
        self.remove_data(&name).await
    }

    fn record_incarnation(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let (name, Some(uid)) = (mv.name_any(), mv.uid()) else {
            return Ok(());
        };
        if self.recorded_uid(&name).as_deref() != Some(uid.as_str()) {
            process::write_atomic(&self.uid_file(&name), uid.as_bytes())?;
        }
        Ok(())
    }

    /// The UID in the directory's `volume-uid`, if it has one.
    fn recorded_uid(&self, volume: &str) -> Option<String> {
        std::fs::read_to_string(self.uid_file(volume))
            .ok()
            .map(|s| s.trim().to_owned())
    }

    async fn ensure_data(&self, volume: &str, size: u64) -> CsiResult<()> {
        let dir = self.replica_dir(volume);
        let id = VolumeId::new(volume).map_err(|e| CsiError::Precondition {
            volume: volume.to_owned(),
            detail: e.to_string(),
        })?;
        if dir.join(volume).join("data").exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&dir).map_err(|e| CsiError::io("creating directory", &dir, e))?;
        let vol = volume.to_owned();
        tokio::task::spawn_blocking(move || {
            Pool::open(&dir)
                .and_then(|p| p.create_volume(&id, size))
                .map(drop)
        })
        .await
        .map_err(|e| CsiError::Internal {
            detail: e.to_string(),
        })?
        .map_err(|e| CsiError::Internal {
            detail: format!(
                "creating the replica of {vol}: {}",
                twinvol_engine::error_chain(&e)
            ),
        })?;
        tracing::info!(volume, size, "created the replica's data");
        Ok(())
    }

    fn write_peers(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let lines: String = mv
            .status
            .iter()
            .flat_map(|s| &s.replicas)
            .filter(|r| r.site != self.site)
            .filter_map(|r| Some(format!("{}={}\n", r.site, r.address.as_ref()?)))
            .collect();
        let path = self.replica_dir(&mv.name_any()).join("peers");
        if std::fs::read_to_string(&path).ok().as_deref() != Some(lines.as_str()) {
            process::write_atomic(&path, lines.as_bytes())?;
        }
        Ok(())
    }

    /// Runs the server (adopting one that runs) and returns its address.
    async fn ensure_server(&self, mv: &MirroredVolume) -> CsiResult<String> {
        let name = mv.name_any();
        let files = self.files(&name);
        let rate = mv
            .spec
            .resync_rate_limit
            .as_ref()
            .and_then(|r| r.bytes().ok());
        let previous: Option<ReplicaServerSpec> = files.read_spec().ok();
        if let (Some(spec), Some(pid)) = (&previous, files.running())
            && spec.resync_rate_limit == rate
        {
            let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner());
            if adopted.insert(name.clone()) {
                tracing::info!(volume = %name, pid, listen = %spec.listen, "adopted the running replica server");
            }
            return Ok(spec.listen.to_string());
        }
        self.adopted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.clone());
        if files.running().is_some() {
            // The rate limit changed: restart with the new one.
            process::stop(&files, STOP_GRACE).await?;
        }
        let listen = match previous.map(|s| s.listen) {
            Some(addr) if addr.ip() == self.config.node_ip && port_free(addr) => addr,
            _ => free_address(self.config.node_ip)?,
        };
        let dir = self.replica_dir(&name);
        let spec = ReplicaServerSpec {
            volume: name.clone(),
            site: self.site.to_string(),
            pool_dir: dir.clone(),
            listen,
            secret_file: self.config.secret_file.clone(),
            peers_file: dir.join("peers"),
            ready_file: files.ready(),
            resync_rate_limit: rate,
            metrics_listen: None,
        };
        files.write_spec(&spec)?;
        let launch = Launch {
            mode: "replica",
            ..self.config.launch.clone()
        };
        process::spawn(&launch, &files)?;
        process::wait_ready(&files, READY_WAIT).await?;
        Ok(listen.to_string())
    }

    /// The progress of this replica's resync to its peer, as its server
    /// last wrote it: (peer, bytes copied this attempt, bytes remaining).
    fn resync_progress(&self, volume: &str) -> Option<(SiteName, u64, u64)> {
        let status = ResyncStatus::load(&self.replica_dir(volume), volume).ok()??;
        let peer = SiteName::new(status.peer.clone()?).ok()?;
        let active = matches!(
            status.state,
            ResyncState::Copying
                | ResyncState::Done
                | ResyncState::Waiting
                | ResyncState::Connecting
        ) || status.copied_bytes > 0;
        active.then_some((peer, status.attempt_copied_bytes, status.remaining_bytes))
    }

    /// Reports, when they changed: this replica's address and state, and —
    /// when this replica resyncs its peer — the resync's progress in the
    /// peer's entry (at most every [`PROGRESS_EVERY`] while it moves). One
    /// apply carries every field this node's manager owns, since an apply
    /// drops the fields it leaves out.
    async fn report(&self, mv: &MirroredVolume, address: &str) -> CsiResult<()> {
        let name = mv.name_any();
        let status = mv.status.clone().unwrap_or_default();
        let in_sync = status.in_sync.contains(&self.site)
            || (status.in_sync.is_empty() && status.epoch.get() == 0);
        let current = status.replicas.iter().find(|r| r.site == self.site);
        // The peer copying to this replica writes the progress into this
        // replica's entry: while some remains, it is resyncing.
        let state = if in_sync {
            ReplicaState::InSync
        } else if current
            .and_then(|r| r.resync_bytes_remaining)
            .is_some_and(|b| b.get() > 0)
        {
            ReplicaState::Resyncing
        } else {
            ReplicaState::OutOfSync
        };
        // Progress only into an entry the operator created (it holds the
        // required fields), and only while this replica is the source.
        let progress = self.resync_progress(&name).filter(|(peer, _, _)| {
            in_sync && *peer != self.site && status.replicas.iter().any(|r| r.site == *peer)
        });
        let own_same =
            current.is_some_and(|r| r.address.as_deref() == Some(address) && r.state == state);
        let progress_same = progress.as_ref().is_none_or(|(peer, done, remaining)| {
            status.replicas.iter().any(|r| {
                r.site == *peer
                    && r.resync_bytes_done.map(|b| b.get()) == Some(*done)
                    && r.resync_bytes_remaining.map(|b| b.get()) == Some(*remaining)
            })
        });
        if own_same && progress_same {
            return Ok(());
        }
        if own_same && !self.progress_due(&name, progress.as_ref().is_some_and(|p| p.2 == 0)) {
            return Ok(());
        }
        let mut replicas = vec![serde_json::json!({
            "site": self.site,
            "address": address,
            "state": state,
        })];
        if let Some((peer, done, remaining)) = &progress {
            replicas.push(serde_json::json!({
                "site": peer,
                "resyncBytesDone": done,
                "resyncBytesRemaining": remaining,
            }));
        }
        let patch = serde_json::json!({
            "apiVersion": "twinvol.io/v1alpha1",
            "kind": "MirroredVolume",
            "metadata": {"name": name},
            "status": {"replicas": replicas},
        });
        self.api
            .patch_status(
                &name,
                &PatchParams::apply(&self.manager()).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| CsiError::kube(format!("reporting the replica of {name}"), e))?;
        tracing::info!(volume = %name, address, state = ?state, progress = ?progress, "reported the replica");
        Ok(())
    }

    /// Whether a progress-only report of `volume` may be written now: at
    /// most every [`PROGRESS_EVERY`], except the final one (nothing left).
    fn progress_due(&self, volume: &str, finished: bool) -> bool {
        let mut last = self
            .progress_reported
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let due = finished
            || last
                .get(volume)
                .is_none_or(|t| t.elapsed() >= PROGRESS_EVERY);
        if due {
            last.insert(volume.to_owned(), std::time::Instant::now());
        }
        due
    }

    /// Stops the server and removes everything of the volume's replica.
    async fn remove_data(&self, volume: &str) -> CsiResult<()> {
        let dir = self.replica_dir(volume);
        if !dir.exists() {
            return Ok(());
        }
        process::stop(&self.files(volume), STOP_GRACE).await?;
        std::fs::remove_dir_all(&dir).map_err(|e| CsiError::io("removing", &dir, e))?;
        tracing::info!(volume, "removed the replica's data");
        Ok(())
    }

    /// Removes this node's replica entry from `status.replicas` once its
    /// data is gone: the operator releases its own finalizer when no entry
    /// is left. A merge patch of the list with the resourceVersion read, so
    /// no other writer's entry is lost (a conflict retries next round).
    async fn drop_entry(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let Some(status) = &mv.status else {
            return Ok(());
        };
        let mine = |r: &&twinvol_crds::ReplicaStatus| {
            r.site == self.site && r.node.as_ref().is_some_and(|n| *n == self.config.node)
        };
        if !status.replicas.iter().any(|r| mine(&r)) {
            return Ok(());
        }
        let others: Vec<&twinvol_crds::ReplicaStatus> =
            status.replicas.iter().filter(|r| !mine(r)).collect();
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": mv.resource_version()},
            "status": {"replicas": others},
        });
        let name = mv.name_any();
        match self
            .api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(volume = %name, "replica data removed: status entry dropped");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(CsiError::kube(
                format!("dropping the replica entry of {name}"),
                e,
            )),
        }
    }

    async fn drop_finalizer(&self, mv: &MirroredVolume) -> CsiResult<()> {
        let mine = replica_finalizer(&self.site);
        let finalizers = mv.finalizers();
        if !finalizers.contains(&mine) {
            return Ok(());
        }
        let keep: Vec<&String> = finalizers.iter().filter(|f| **f != mine).collect();
        let patch = serde_json::json!({
            "metadata": {"resourceVersion": mv.resource_version(), "finalizers": keep}
        });
        let name = mv.name_any();
        match self
            .api
            .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => {
                tracing::info!(volume = %name, finalizer = %mine, "replica data removed: finalizer dropped");
                Ok(())
            }
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
            Err(e) => Err(CsiError::kube(
                format!("dropping the finalizer of {name}"),
                e,
            )),
        }
    }
}

/// What a volume's worker is to bring about.
#[derive(Clone)]
enum Desired {
    /// The volume as last seen.
    Present(Box<MirroredVolume>),
    /// Deleted (or an orphaned directory): the replica's data goes.
    Gone,
}

/// The volumes' workers, owned by the watch loop (their only sender).
struct Workers {
    supervisor: std::sync::Arc<ReplicaSupervisor>,
    by_name: std::collections::HashMap<String, tokio::sync::watch::Sender<Desired>>,
    done_tx: tokio::sync::mpsc::UnboundedSender<String>,
    /// Workers that ended (their volume's data removed).
    done: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Workers {
    fn new(supervisor: std::sync::Arc<ReplicaSupervisor>) -> Self {
        let (done_tx, done) = tokio::sync::mpsc::unbounded_channel();
        Self {
            supervisor,
            by_name: Default::default(),
            done_tx,
            done,
        }
    }

    fn set(&mut self, name: &str, desired: Desired) {
        match self.by_name.get(name) {
            // A worker exits only after telling `done`; until the loop
            // reads that, it still reads its channel.
            Some(tx) => {
                tx.send_replace(desired);
            }
            None => self.spawn(name.to_owned(), desired),
        }
    }

    fn spawn(&mut self, name: String, desired: Desired) {
        let (tx, rx) = tokio::sync::watch::channel(desired);
        let supervisor = self.supervisor.clone();
        let done = self.done_tx.clone();
        let span = tracing::info_span!("replica", volume = %name);
        tokio::spawn(worker(supervisor, name.clone(), rx, done).instrument(span));
        self.by_name.insert(name, tx);
    }

    fn present(&mut self, mv: MirroredVolume) {
        let name = mv.name_any();
        self.set(&name, Desired::Present(Box::new(mv)));
    }

    fn gone(&mut self, name: &str) {
        self.set(name, Desired::Gone);
    }

    fn present_names(&self) -> Vec<String> {
        self.by_name
            .iter()
            .filter(|(_, tx)| matches!(*tx.borrow(), Desired::Present(_)))
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// A worker ended after removing its volume's data. If the volume came
    /// back meanwhile (created again under the same name), a new worker
    /// takes it from there.
    fn finished(&mut self, name: &str) {
        let Some(tx) = self.by_name.remove(name) else {
            return;
        };
        let last = tx.borrow().clone();
        if let Desired::Present(_) = last {
            self.spawn(name.to_owned(), last);
        }
    }

    /// Directories of volumes that no longer exist (deleted while this
    /// plugin was down): removed by a worker each, but only those marked
    /// as ours and with no worker yet.
    fn remove_orphans(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.supervisor.pool_root) else {
            return;
        };
        for entry in entries.flatten() {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            if !self.by_name.contains_key(&name) && self.supervisor.files(&name).spec().exists() {
                tracing::info!(volume = %name, "the volume no longer exists: removing its replica");
                self.spawn(name, Desired::Gone);
            }
        }
    }
}

/// One volume's worker: reconciles what `desired` says at once when it
/// changes and every [`TICK`] otherwise; ends (telling `done`) once a gone
/// volume's data is removed, unless it came back meanwhile.
async fn worker(
    supervisor: std::sync::Arc<ReplicaSupervisor>,
    name: String,
    mut desired: tokio::sync::watch::Receiver<Desired>,
    done: tokio::sync::mpsc::UnboundedSender<String>,
) {
    loop {
        let now = desired.borrow_and_update().clone();
        match now {
            Desired::Present(mv) => supervisor.reconcile_logged(&mv).await,
            Desired::Gone => {
                if supervisor.remove_logged(&name).await && !desired.has_changed().unwrap_or(true) {
                    let _ = done.send(name);
                    return;
                }
            }
        }
        tokio::select! {
            r = desired.changed() => if r.is_err() {
                return;
            },
            () = tokio::time::sleep(TICK) => {}
        }
    }
}

fn port_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

/// A free port on `ip` (bound and released: the replica binds it next).
fn free_address(ip: std::net::IpAddr) -> CsiResult<SocketAddr> {
    let listener = TcpListener::bind((ip, 0)).map_err(|e| CsiError::Internal {
        detail: format!("no free port on {ip}: {e}"),
    })?;
    listener.local_addr().map_err(|e| CsiError::Internal {
        detail: format!("no free port on {ip}: {e}"),
    })
}
