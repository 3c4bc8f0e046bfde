//! What each Site has room for, from the node plugins' heartbeat Leases:
//! every renewal carries the node's free and total pool bytes as
//! annotations, so capacity costs no API write beyond the heartbeat itself.
//!
//! A node counts only while its heartbeat is fresh, judged as the contract
//! says: by how long this process has seen no change of the Lease's
//! resourceVersion on its own monotonic clock, against the Lease's
//! `leaseDurationSeconds` — never by comparing `renewTime` with this
//! machine's wall clock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::{Client, ResourceExt};

use crate::names::{ANNOTATION_POOL_FREE, ANNOTATION_POOL_TOTAL, LABEL_APP, LABEL_SITE};

/// One node's last report.
#[derive(Debug, Clone)]
struct Report {
    site: String,
    free: u64,
    total: u64,
    version: String,
    changed: Instant,
    duration: Duration,
}

/// The free space of one fresh node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSpace {
    pub free: u64,
    pub total: u64,
}

/// The latest heartbeat reports, kept current by a watch.
#[derive(Debug, Clone, Default)]
pub struct NodeReports {
    reports: Arc<Mutex<HashMap<String, Report>>>,
}

impl NodeReports {
    /// Starts watching the heartbeat Leases in `namespace`.
    pub fn watch(client: Client, namespace: &str) -> Self {
        let this = Self::default();
        let api: Api<Lease> = Api::namespaced(client, namespace);
        let selector = format!("{}={}", LABEL_APP.0, LABEL_APP.1);
        let reports = this.clone();
        tokio::spawn(async move {
            let mut stream =
                watcher::watcher(api, watcher::Config::default().labels(&selector)).boxed();
            while let Some(event) = stream.next().await {
                match event {
                    Ok(Event::Apply(lease) | Event::InitApply(lease)) => reports.seen(&lease),
                    Ok(Event::Delete(lease)) => reports.forget(&lease.name_any()),
                    Ok(Event::Init | Event::InitDone) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "watch of the heartbeat Leases failed; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        this
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Report>> {
        self.reports.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn seen(&self, lease: &Lease) {
        let name = lease.name_any();
        let annotation = |key: &str| -> Option<u64> { lease.annotations().get(key)?.parse().ok() };
        let (Some(site), Some(free), Some(total)) = (
            lease.labels().get(LABEL_SITE).cloned(),
            annotation(ANNOTATION_POOL_FREE),
            annotation(ANNOTATION_POOL_TOTAL),
        ) else {
            return;
        };
        let version = lease.resource_version().unwrap_or_default();
        let duration = lease
            .spec
            .as_ref()
            .and_then(|s| s.lease_duration_seconds)
            .and_then(|s| u64::try_from(s).ok())
            .map_or(Duration::from_secs(40), Duration::from_secs);
        let mut reports = self.lock();
        let changed = match reports.get(&name) {
            Some(r) if r.version == version => r.changed,
            _ => Instant::now(),
        };
        reports.insert(
            name,
            Report {
                site,
                free,
                total,
                version,
                changed,
                duration,
            },
        );
    }

    fn forget(&self, name: &str) {
        self.lock().remove(name);
    }

    /// The fresh nodes of `site` (every site when `None`).
    pub fn fresh(&self, site: Option<&str>) -> Vec<NodeSpace> {
        self.lock()
            .values()
            .filter(|r| site.is_none_or(|s| s == r.site))
            .filter(|r| r.changed.elapsed() <= r.duration)
            .map(|r| NodeSpace {
                free: r.free,
                total: r.total,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::coordination::v1::LeaseSpec;
    use kube::api::ObjectMeta;

    fn lease(name: &str, site: &str, free: u64, version: &str, duration: i32) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(name.into()),
                resource_version: Some(version.into()),
                labels: Some([(LABEL_SITE.to_owned(), site.to_owned())].into()),
                annotations: Some(
                    [
                        (ANNOTATION_POOL_FREE.to_owned(), free.to_string()),
                        (ANNOTATION_POOL_TOTAL.to_owned(), (free * 2).to_string()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn fresh_reports_are_counted_per_site() {
        let r = NodeReports::default();
        r.seen(&lease("twinvol-node-a1", "room-a", 100, "1", 40));
        r.seen(&lease("twinvol-node-a2", "room-a", 50, "1", 40));
        r.seen(&lease("twinvol-node-b1", "room-b", 10, "1", 40));
        assert_eq!(r.fresh(Some("room-a")).len(), 2);
        assert_eq!(
            r.fresh(Some("room-b")),
            vec![NodeSpace {
                free: 10,
                total: 20
            }]
        );
        assert_eq!(r.fresh(None).len(), 3);
        r.forget("twinvol-node-b1");
        assert!(r.fresh(Some("room-b")).is_empty());
    }

    #[test]
    fn a_lease_unchanged_for_longer_than_its_duration_is_stale() {
        let r = NodeReports::default();
        r.seen(&lease("twinvol-node-a1", "room-a", 100, "7", 0));
        std::thread::sleep(Duration::from_millis(20));
        // Seen again with the same resourceVersion: not a renewal.
        r.seen(&lease("twinvol-node-a1", "room-a", 100, "7", 0));
        assert!(
            r.fresh(Some("room-a")).is_empty(),
            "no change for longer than 0 s"
        );
    }
}
