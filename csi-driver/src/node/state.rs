//! What the node service keeps on disk about each staged volume, under
//! `<state-dir>/volumes/<volume>/`:
//!
//! | file | what |
//! |---|---|
//! | `frontend.json`, `.pid`, `.ready` | the frontend process (see `dataplane::process`; its log is `<state-dir>/logs/<volume>.frontend.log`, kept after unstaging) |
//! | `frontend.status.json` | the frontend's own report (lease, replica states) |
//! | `fuse/<volume>` | the FUSE file the loop device is attached to |
//! | `stage.json` | the staging record: path, access type, device, publish targets |
//!
//! Everything else (is it mounted, which loop device) is read back from
//! the system, so a service restarted after kill -9 — or a node restarted
//! from nothing, where the record survives but processes, mounts and loop
//! devices do not — sees what really is.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataplane::ProcessFiles;
use crate::dataplane::process::write_atomic;
use crate::error::{CsiError, CsiResult};

/// How the volume is exposed on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum Exposure {
    Block,
    Mount { fs_type: String },
}

/// The staging record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StageRecord {
    pub staging_path: PathBuf,
    pub exposure: Exposure,
    /// The block device (a loop device, or an NBD device).
    pub device: PathBuf,
    /// Mount options asked for at staging.
    #[serde(default)]
    pub mount_flags: Vec<String>,
    /// The publish targets, with whether each is read-only.
    #[serde(default)]
    pub targets: Vec<Target>,
    /// RWOP: at most one target.
    #[serde(default)]
    pub single_writer: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Target {
    pub path: PathBuf,
    pub read_only: bool,
}

/// The directory of one volume's state.
#[derive(Debug, Clone)]
pub struct VolumeDir {
    pub dir: PathBuf,
    pub volume: String,
}

impl VolumeDir {
    pub fn new(state_dir: &Path, volume: &str) -> Self {
        Self {
            dir: state_dir.join("volumes").join(volume),
            volume: volume.to_owned(),
        }
    }

    /// The frontend's files; its log is `<state-dir>/logs/<volume>.frontend.log`,
    /// kept after unstaging for whoever investigates later.
    pub fn frontend(&self) -> ProcessFiles {
        let logs = self
            .dir
            .parent()
            .and_then(Path::parent)
            .map(|state| state.join("logs"))
            .unwrap_or_else(|| self.dir.clone());
        ProcessFiles::new(&self.dir, "frontend")
            .with_log(logs.join(format!("{}.frontend.log", self.volume)))
    }

    pub fn fuse_dir(&self) -> PathBuf {
        self.dir.join("fuse")
    }

    pub fn fuse_file(&self) -> PathBuf {
        self.fuse_dir().join(&self.volume)
    }

    /// The frontend's control socket (NodeExpandVolume): beside its spec,
    /// or — when that path is too long for a unix socket (108 bytes) — in
    /// `sockets/` of the state directory (two levels up: `volumes/<volume>`)
    /// under a name derived from it. Never outside the state directory: the
    /// node plugin's container has a read-only root, and the socket must
    /// survive a restart of that container (the frontend does).
    pub fn control_socket(&self) -> PathBuf {
        let path = self.dir.join("control.sock");
        if path.as_os_str().len() < 100 {
            return path;
        }
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(path.as_os_str().as_encoded_bytes());
        let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
        let root = self
            .dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&self.dir);
        root.join("sockets").join(format!("{name}.sock"))
    }

    pub fn status_file(&self) -> PathBuf {
        self.dir.join("frontend.status.json")
    }

    fn record_path(&self) -> PathBuf {
        self.dir.join("stage.json")
    }

    pub fn create(&self) -> CsiResult<()> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| CsiError::io("creating directory", &self.dir, e))
    }

    pub fn record(&self) -> CsiResult<Option<StageRecord>> {
        let path = self.record_path();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| CsiError::Internal {
                    detail: format!("{} is unreadable: {e}", path.display()),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(CsiError::io("reading", path, e)),
        }
    }

    pub fn save(&self, record: &StageRecord) -> CsiResult<()> {
        self.create()?;
        let bytes = serde_json::to_vec_pretty(record).map_err(|e| CsiError::Internal {
            detail: e.to_string(),
        })?;
        write_atomic(&self.record_path(), &bytes)
    }

    /// Removes the whole directory (after unstaging).
    pub fn remove(&self) -> CsiResult<()> {
        match std::fs::remove_dir_all(&self.dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(CsiError::io("removing", &self.dir, e)),
        }
    }

    /// Every volume with a state directory.
    pub fn all(state_dir: &Path) -> Vec<Self> {
        let Ok(entries) = std::fs::read_dir(state_dir.join("volumes")) else {
            return vec![];
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .map(|v| Self::new(state_dir, &v))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_round_trips_and_is_removed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let v = VolumeDir::new(dir.path(), "pvc-1");
        assert_eq!(v.record().expect("readable"), None);
        let record = StageRecord {
            staging_path: "/var/lib/kubelet/plugins/x/globalmount".into(),
            exposure: Exposure::Mount {
                fs_type: "ext4".into(),
            },
            device: "/dev/loop4".into(),
            mount_flags: vec![],
            targets: vec![Target {
                path: "/var/lib/kubelet/pods/p/volumes/v/mount".into(),
                read_only: false,
            }],
            single_writer: true,
        };
        v.save(&record).expect("saved");
        assert_eq!(v.record().expect("readable"), Some(record));
        assert_eq!(VolumeDir::all(dir.path()).len(), 1);
        v.remove().expect("removed");
        assert!(VolumeDir::all(dir.path()).is_empty());
    }

    #[test]
    fn a_control_socket_too_long_for_its_volume_dir_stays_in_the_state_dir() {
        let short = VolumeDir::new(Path::new("/var/lib/twinvol-csi/n1"), "pvc-1");
        assert_eq!(
            short.control_socket(),
            Path::new("/var/lib/twinvol-csi/n1/volumes/pvc-1/control.sock")
        );
        let state = Path::new("/var/lib/twinvol-cluster/tsc1/csi-state/node-a1");
        let long = VolumeDir::new(state, "pvc-3196275c-4404-4cc6-9dd7-23e7b3e00b29");
        let socket = long.control_socket();
        assert!(socket.starts_with(state.join("sockets")), "{socket:?}");
        assert!(socket.as_os_str().len() < 108, "{socket:?}");
        let other = VolumeDir::new(state, "pvc-3196275c-4404-4cc6-9dd7-23e7b3e00b30");
        assert_ne!(socket, other.control_socket());
    }
}
