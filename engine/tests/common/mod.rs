//! The harness shared by the engine's integration tests. Each file in
//! `tests/` is a crate of its own that declares `mod common;` and uses a
//! different part of it, hence `dead_code` is allowed here.
//!
//! - [`process`]: starting the engine's processes and running tools under
//!   a deadline, waiting for conditions with a deadline;
//! - [`stack`]: a whole mirrored volume (two replicas, a frontend, optional
//!   network namespaces and arbiter) as real processes;
//! - [`fio`], [`qemu_io`]: the real NBD clients the tests drive, and the
//!   reading of their reports;
//! - [`metrics`]: scraping a process's `/metrics`;
//! - [`rng`]: deterministic pseudo-random data, replayable from a seed.
#![allow(dead_code)] // each test crate uses a different part of the harness

pub mod fio;
pub mod metrics;
pub mod process;
pub mod qemu_io;
pub mod rng;
pub mod stack;

// Re-exported so that tests name `common::Stack`, `common::wait_until`;
// a crate that uses nothing of one of them must not warn.
#[allow(unused_imports)]
pub use process::*;
#[allow(unused_imports)]
pub use stack::*;

pub const MIB: u64 = 1024 * 1024;
