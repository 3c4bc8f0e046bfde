//! The node's system tools, each behind a small typed function: running a
//! command ([`command`]), the mount table ([`mounts`]), loop devices
//! ([`loopdev`]) and filesystems ([`filesystem`]).
//!
//! The node plugin calls the standard tools (`mount`, `umount`, `losetup`,
//! `blkid`, `mkfs.*`, `resize2fs`, `xfs_growfs`) rather than the syscalls:
//! they are what an administrator reads in the logs and runs by hand, and
//! they know the corner cases (loop device allocation races, mount helpers).
//! Reads (the mount table, device sizes) come straight from /proc and /sys.

pub mod command;
pub mod filesystem;
pub mod loopdev;
pub mod mounts;
