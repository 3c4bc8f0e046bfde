//! NodeStageVolume and NodeUnstageVolume.
//!
//! **Stage** (idempotent; each step first looks whether it is done):
//! 1. the volume must be published to this node (ControllerPublish), and
//!    its replicas placed with their addresses reported (waited for, up to
//!    the stage timeout: a freshly created volume gets them within
//!    seconds);
//! 2. the frontend process: adopted if one runs for the volume, else
//!    started (after clearing what a dead one left: its FUSE mount, loop
//!    devices over its file); it takes the lease through the Kubernetes
//!    arbiter (bumping the epoch; the in-sync set comes from the
//!    MirroredVolume) and exports the FUSE file;
//! 3. the block device: the loop device over the FUSE file
//!    (`losetup --direct-io=on`), or the kernel NBD client on the
//!    frontend's NBD socket where the kernel has one;
//! 4. for a filesystem volume: `mkfs` only if `blkid` finds nothing on the
//!    device, then mount at the staging path.
//!
//! **Unstage** undoes all of it — unmount, detach the device, stop the
//! frontend (which flushes both replicas and releases its lease) — and
//! leaves no mount, loop device or process behind. An unknown volume is
//! already unstaged. The frontend is stopped only once the loop device is
//! really gone: a process that unshared its mount namespace while the
//! volume was mounted keeps a copy of the mount, which unmounting here does
//! not flush; unstaging then fails (FailedPrecondition, naming that
//! process) and keeps serving that filesystem instead of losing its
//! unwritten data. Staging again refuses likewise rather than mount the
//! filesystem a second time.

use std::path::Path;
use std::time::{Duration, Instant};

use kube::ResourceExt;
use twinvol_crds::MirroredVolume;

use crate::capability::{self, Access};
use crate::dataplane::process::{self, ProcessFiles};
use crate::dataplane::{FrontendSpec, ReplicaAddress};
use crate::error::{CsiError, CsiResult};
use crate::names::ANNOTATION_FS_TYPE;
use crate::params::{self, FsType};
use crate::proto::csi::{NodeStageVolumeRequest, NodeUnstageVolumeRequest};
use crate::sys::{filesystem, loopdev, mounts};
use crate::volume;

use super::state::{Exposure, StageRecord, VolumeDir};
use super::{NodeService, required};

/// How long a frontend may take to flush and release its lease on
/// unstage before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(30);
/// How long a detached loop device may take to go (its last close).
const DETACH_WAIT: Duration = Duration::from_secs(10);

impl NodeService {
    pub(super) fn volume_dir(&self, volume: &str) -> VolumeDir {
        VolumeDir::new(&self.config.state_dir, volume)
    }

    pub(super) async fn stage_impl(&self, request: NodeStageVolumeRequest) -> CsiResult<()> {
        required(&request.volume_id, "volume_id")?;
        required(&request.staging_target_path, "staging_target_path")?;
        let cap = request
            .volume_capability
            .as_ref()
            .ok_or(CsiError::MissingField {
                field: "volume_capability",
            })
            .and_then(capability::check)?;
        let name = request.volume_id.clone();
        let _guard = self.locks.try_lock(&name)?;
        let mv = volume::require(&self.volumes, &name).await?;
        self.check_published_here(&mv)?;
        let staging = Path::new(&request.staging_target_path).to_owned();
        let exposure = match &cap.access {
            Access::Block => Exposure::Block,
            Access::Mount { fs_type, .. } => {
                let fs = fs_type
                    .or_else(|| {
                        request
                            .volume_context
                            .get(params::KEY_FS_TYPE)
                            .and_then(|f| FsType::parse(f))
                    })
                    .or_else(|| {
                        mv.annotations()
                            .get(ANNOTATION_FS_TYPE)
                            .and_then(|f| FsType::parse(f))
                    })
                    .unwrap_or(FsType::Ext4);
                Exposure::Mount {
                    fs_type: fs.as_str().to_owned(),
                }
            }
        };
        let flags = match &cap.access {
            Access::Mount { flags, .. } => flags.clone(),
            Access::Block => vec![],
        };
        let vdir = self.volume_dir(&name);
        let previous = vdir.record()?;
        if let Some(rec) = &previous {
            if rec.staging_path != staging && self.is_staged(&vdir, rec).await? {
                return Err(CsiError::AlreadyInUse {
                    volume: name,
                    what: format!("staged at {}", rec.staging_path.display()),
                });
            }
            if rec.staging_path == staging && rec.exposure != exposure {
                return Err(CsiError::AlreadyInUse {
                    volume: name,
                    what: format!("staged as {:?}", rec.exposure),
                });
            }
            if rec.staging_path == staging && self.is_staged(&vdir, rec).await? {
                return Ok(());
            }
        }
        let started = Instant::now();
        let deadline = started + self.config.stage_timeout;
        vdir.create()?;
        let size = volume::size_bytes(&mv)?;
        let device = self.start_frontend(&vdir, &name, size, deadline).await?;
        let device_at = started.elapsed();
        if let Exposure::Mount { fs_type } = &exposure {
            let fs = FsType::parse(fs_type).unwrap_or(FsType::Ext4);
            if mounts::mounted_at(&staging)?.is_none() {
                if filesystem::ensure(&device, fs, &name).await? {
                    tracing::info!(volume = %name, fs = %fs, "made the filesystem (the device held none)");
                } else if fs == FsType::Ext4
                    && let Some((from, to)) =
                        filesystem::grow_unmounted_ext4(&device, loopdev::size(&device)?).await?
                {
                    // Expanded while not staged: grown before the mount,
                    // which needs no CAP_SYS_RESOURCE (the online resize does).
                    tracing::info!(volume = %name, from, to, "grew the ext4 filesystem to the volume's size");
                }
                mounts::mount(mounts::path_str(&device)?, &staging, fs.as_str(), &flags).await?;
            }
        }
        vdir.save(&StageRecord {
            staging_path: staging,
            exposure,
            device,
            mount_flags: flags,
            targets: previous.map(|r| r.targets).unwrap_or_default(),
            single_writer: cap.single_writer(),
        })?;
        // Where a fail-over's staging time goes (the frontend: its lease
        // and replicas; the filesystem: its check and journal replay).
        tracing::info!(
            volume = %name,
            device_ms = u64::try_from(device_at.as_millis()).unwrap_or(u64::MAX),
            filesystem_ms = u64::try_from((started.elapsed() - device_at).as_millis()).unwrap_or(u64::MAX),
            "staged"
        );
        Ok(())
    }

    fn check_published_here(&self, mv: &MirroredVolume) -> CsiResult<()> {
        match volume::published(mv) {
            Some(p) if p.node == self.config.node.as_str() => Ok(()),
            Some(p) => Err(CsiError::Precondition {
                volume: mv.name_any(),
                detail: format!(
                    "it is published to node {}, not to this node ({}); ControllerPublish decides where its frontend runs",
                    p.node, self.config.node
                ),
            }),
            None => Err(CsiError::Precondition {
                volume: mv.name_any(),
                detail: format!(
                    "it is not published to any node; ControllerPublish it to {} first",
                    self.config.node
                ),
            }),
        }
    }

    /// Whether everything staging makes is there: the frontend runs, the
    /// device is attached to its file, and (filesystem) it is mounted.
    pub(super) async fn is_staged(&self, vdir: &VolumeDir, rec: &StageRecord) -> CsiResult<bool> {
        if vdir.frontend().running().is_none() {
            return Ok(false);
        }
        if !loopdev::find(&vdir.fuse_file())
            .await?
            .contains(&rec.device)
        {
            return Ok(false);
        }
        Ok(match rec.exposure {
            Exposure::Block => true,
            Exposure::Mount { .. } => mounts::mounted_at(&rec.staging_path)?.is_some(),
        })
    }

    /// Starts (or adopts) the frontend and returns its block device.
    async fn start_frontend(
        &self,
        vdir: &VolumeDir,
        name: &str,
        size: u64,
        deadline: Instant,
    ) -> CsiResult<std::path::PathBuf> {
        let files = vdir.frontend();
        if files.running().is_none() {
            self.clear_leftovers(vdir).await?;
            let replicas = self.wait_for_replicas(name, deadline).await?;
            let spec = FrontendSpec {
                volume: name.to_owned(),
                node: self.config.node.to_string(),
                local_site: self.site.to_string(),
                replicas,
                secret_file: self.config.secret_file.clone(),
                lease_duration_ms: millis(self.config.lease_duration),
                lease_margin_ms: millis(self.config.lease_margin),
                replica_timeout_ms: millis(self.config.replica_timeout),
                fuse_dir: vdir.fuse_dir(),
                // The kernel has no NBD client here; when it has, the
                // frontend also exports on a socket in the state dir.
                nbd_socket: None,
                ready_file: files.ready(),
                status_file: vdir.status_file(),
                metrics_listen: None,
                control_socket: Some(vdir.control_socket()),
                size: Some(size),
                heartbeat: Some(crate::dataplane::FrontendHeartbeat {
                    report: crate::heartbeat::report_path(&self.config.state_dir),
                    namespace: self.config.namespace.clone(),
                }),
            };
            if let Some(dir) = vdir.control_socket().parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| CsiError::io("creating directory", dir, e))?;
            }
            files.write_spec(&spec)?;
            process::spawn(&self.config.launch, &files)?;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        process::wait_ready(&files, left.max(Duration::from_secs(1))).await?;
        loopdev::attach(&vdir.fuse_file()).await
    }

    /// What a frontend that died (or a node that lost power) left behind:
    /// a FUSE mount without its server, loop devices over it.
    async fn clear_leftovers(&self, vdir: &VolumeDir) -> CsiResult<()> {
        if let Some(rec) = vdir.record()? {
            mounts::unmount_lazy(&rec.staging_path).await?;
        }
        loopdev::detach_and_wait(&vdir.fuse_file(), &vdir.volume, DETACH_WAIT).await?;
        mounts::unmount_lazy(&vdir.fuse_dir()).await?;
        Ok(())
    }

    /// Both replicas' addresses from the MirroredVolume status, waiting
    /// until the operator placed them and their node plugins reported.
    async fn wait_for_replicas(
        &self,
        name: &str,
        deadline: Instant,
    ) -> CsiResult<Vec<ReplicaAddress>> {
        loop {
            let mv = volume::require(&self.volumes, name).await?;
            let reported: Vec<ReplicaAddress> = mv
                .status
                .iter()
                .flat_map(|s| &s.replicas)
                .filter_map(|r| {
                    Some(ReplicaAddress {
                        site: r.site.to_string(),
                        address: r.address.clone()?,
                    })
                })
                .collect();
            let missing: Vec<&str> = mv
                .spec
                .sites
                .iter()
                .filter(|s| !reported.iter().any(|r| r.site == s.as_str()))
                .map(|s| s.as_str())
                .collect();
            if missing.is_empty() {
                return Ok(mv
                    .spec
                    .sites
                    .iter()
                    .filter_map(|s| reported.iter().find(|r| r.site == s.as_str()).cloned())
                    .collect());
            }
            if Instant::now() >= deadline {
                return Err(CsiError::NotReady {
                    volume: name.to_owned(),
                    detail: format!(
                        "no replica address reported for site(s) {} yet: the operator places each replica on a node (status.replicas[].node) and that node's plugin reports its address",
                        missing.join(", ")
                    ),
                });
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    pub(super) async fn unstage_impl(&self, request: NodeUnstageVolumeRequest) -> CsiResult<()> {
        required(&request.volume_id, "volume_id")?;
        required(&request.staging_target_path, "staging_target_path")?;
        let name = request.volume_id;
        let _guard = self.locks.try_lock(&name)?;
        let vdir = self.volume_dir(&name);
        mounts::unmount_all(Path::new(&request.staging_target_path)).await?;
        if let Some(rec) = vdir.record()? {
            for target in &rec.targets {
                mounts::unmount_all(&target.path).await?;
            }
            mounts::unmount_all(&rec.staging_path).await?;
        }
        // Only once the device is really gone: a filesystem still mounted
        // elsewhere would lose its unwritten data with the frontend.
        loopdev::detach_and_wait(&vdir.fuse_file(), &vdir.volume, DETACH_WAIT).await?;
        stop_frontend(&vdir.frontend()).await?;
        mounts::unmount_lazy(&vdir.fuse_dir()).await?;
        vdir.remove()?;
        tracing::info!(volume = %name, "unstaged");
        Ok(())
    }
}

async fn stop_frontend(files: &ProcessFiles) -> CsiResult<()> {
    process::stop(files, STOP_GRACE).await
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
