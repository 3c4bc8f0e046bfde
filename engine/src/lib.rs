//! twinvol's data path, without Kubernetes: the replication protocol, the
//! replica server, and the frontend that mirrors writes to two replicas and
//! exports the volume over NBD and as a FUSE file.

pub mod activity_log;
pub mod arbiter;
pub mod bitmap;
pub mod clock;
pub mod data_sync;
pub mod frontend;
pub mod metrics;
pub mod process;
pub mod protocol;
pub mod replica;
pub mod resync;
pub mod slot;
pub mod storage;
pub mod units;

/// Formats an error with all its sources, `outer: inner: innermost`, for
/// one-line logs and for messages carried over the wire.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(inner) = cur {
        let t = inner.to_string();
        if !s.ends_with(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = inner.source();
    }
    s
}
