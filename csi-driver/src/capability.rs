//! Volume capabilities: which access modes and types the driver serves, as
//! pure checks shared by the controller and the node.
//!
//! A mirrored volume has one frontend, on one node: single-node modes only
//! — `SINGLE_NODE_WRITER` (RWO), `SINGLE_NODE_READER_ONLY`,
//! `SINGLE_NODE_SINGLE_WRITER` (RWOP) and `SINGLE_NODE_MULTI_WRITER` (what
//! Kubernetes sends for RWO to a driver advertising that capability).
//! Access types: a filesystem (`ext4`, `xfs`) or the raw block device.

use crate::error::{CsiError, CsiResult};
use crate::params::FsType;
use crate::proto::csi::VolumeCapability;
use crate::proto::csi::volume_capability::{AccessMode, AccessType, access_mode::Mode};

/// How one capability accesses the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Block,
    Mount {
        /// `None`: the capability names none (the default applies).
        fs_type: Option<FsType>,
        flags: Vec<String>,
    },
}

/// A checked capability.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capability {
    pub access: Access,
    pub mode: Mode,
}

impl Capability {
    /// Only one workload may write (RWOP): a second publish target on
    /// the node is refused.
    pub fn single_writer(&self) -> bool {
        self.mode == Mode::SingleNodeSingleWriter
    }

    pub fn read_only_mode(&self) -> bool {
        self.mode == Mode::SingleNodeReaderOnly
    }

    pub fn is_block(&self) -> bool {
        matches!(self.access, Access::Block)
    }
}

/// Checks one capability.
pub fn check(capability: &VolumeCapability) -> CsiResult<Capability> {
    let mode = capability
        .access_mode
        .as_ref()
        .map(AccessMode::mode)
        .ok_or(CsiError::MissingField {
            field: "volume_capability.access_mode",
        })?;
    match mode {
        Mode::SingleNodeWriter
        | Mode::SingleNodeReaderOnly
        | Mode::SingleNodeSingleWriter
        | Mode::SingleNodeMultiWriter => {}
        Mode::Unknown => {
            return Err(CsiError::MissingField {
                field: "volume_capability.access_mode.mode",
            });
        }
        other => {
            return Err(CsiError::UnsupportedCapability {
                reason: format!(
                    "access mode {} needs several nodes; a mirrored volume is served by one node at a time (use ReadWriteOnce or ReadWriteOncePod)",
                    other.as_str_name()
                ),
            });
        }
    }
    let access = match &capability.access_type {
        Some(AccessType::Block(_)) => Access::Block,
        Some(AccessType::Mount(m)) => {
            let fs_type =
                match m.fs_type.as_str() {
                    "" => None,
                    name => Some(FsType::parse(name).ok_or_else(|| {
                        CsiError::UnsupportedCapability {
                            reason: format!("filesystem {name:?}: use ext4 or xfs"),
                        }
                    })?),
                };
            Access::Mount {
                fs_type,
                flags: m.mount_flags.clone(),
            }
        }
        None => {
            return Err(CsiError::MissingField {
                field: "volume_capability.access_type",
            });
        }
    };
    Ok(Capability { access, mode })
}

/// Checks a request's list of capabilities (at least one).
pub fn check_all(capabilities: &[VolumeCapability]) -> CsiResult<Vec<Capability>> {
    if capabilities.is_empty() {
        return Err(CsiError::MissingField {
            field: "volume_capabilities",
        });
    }
    capabilities.iter().map(check).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::csi::volume_capability::{BlockVolume, MountVolume};

    fn cap(mode: Mode, access: Option<AccessType>) -> VolumeCapability {
        VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: access,
        }
    }

    fn mount(fs: &str) -> Option<AccessType> {
        Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        }))
    }

    #[test]
    fn single_node_modes_with_mount_or_block_are_accepted() {
        for mode in [
            Mode::SingleNodeWriter,
            Mode::SingleNodeReaderOnly,
            Mode::SingleNodeSingleWriter,
            Mode::SingleNodeMultiWriter,
        ] {
            let c = check(&cap(mode, mount("xfs"))).expect("mount");
            assert_eq!(
                c.access,
                Access::Mount {
                    fs_type: Some(FsType::Xfs),
                    flags: vec![]
                }
            );
            let c = check(&cap(mode, Some(AccessType::Block(BlockVolume {})))).expect("block");
            assert!(c.is_block());
        }
        assert!(
            check(&cap(Mode::SingleNodeSingleWriter, mount("")))
                .expect("rwop")
                .single_writer()
        );
    }

    #[test]
    fn multi_node_modes_and_other_filesystems_are_refused() {
        for mode in [
            Mode::MultiNodeReaderOnly,
            Mode::MultiNodeSingleWriter,
            Mode::MultiNodeMultiWriter,
        ] {
            assert!(matches!(
                check(&cap(mode, mount("ext4"))),
                Err(CsiError::UnsupportedCapability { .. })
            ));
        }
        assert!(matches!(
            check(&cap(Mode::SingleNodeWriter, mount("btrfs"))),
            Err(CsiError::UnsupportedCapability { .. })
        ));
        assert!(matches!(
            check(&cap(Mode::SingleNodeWriter, None)),
            Err(CsiError::MissingField { .. })
        ));
        assert!(matches!(check_all(&[]), Err(CsiError::MissingField { .. })));
    }
}
