//! API writes in steady state scale with nodes, not volumes (issue 11).
//!
//! A real API server, the controller plugin and two node plugins (each in
//! its own network namespace) with their production heartbeat settings;
//! `N` volumes created, published and staged (raw block: frontend, FUSE
//! file, loop device) alternately on the two nodes; once they settled, the
//! API server's own `apiserver_request_total` counts every request that is
//! not a GET, LIST or WATCH over a window of steady state. The bound: 2
//! writes/s in total for the cluster (the two heartbeats take 1.33/s).
//!
//! The test command runs it small (`TWINVOL_BENCH_VOLUMES`, default 4;
//! `TWINVOL_BENCH_SECONDS`, default 20); `benches/api-writes.sh` runs it at
//! 100 volumes over 60 s and records the per-resource breakdown and the
//! data plane's memory (`TWINVOL_BENCH_OUT`, a JSON file).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::client::{block_cap, create_request, params, publish_request, stage_request};
use common::{Bed, Csi};
use futures::StreamExt;
use twinvol_csi_driver::proto::csi::volume_capability::access_mode::Mode;

/// Reads of the API: everything else is a write.
const READS: [&str; 3] = ["GET", "LIST", "WATCH"];

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `(verb, group/resource/subresource) → count` of every write the API
/// server has served, from its metrics.
fn writes(bed: &Bed) -> BTreeMap<(String, String), f64> {
    let text = bed
        .plane
        .kubectl_ok(&["get", "--raw", "/metrics"])
        .expect("the API server's metrics");
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_owned())
                .unwrap_or_default()
        };
        let verb = label("verb");
        if READS.contains(&verb.as_str()) {
            continue;
        }
        let mut resource = format!("{}/{}", label("group"), label("resource"));
        let sub = label("subresource");
        if !sub.is_empty() {
            resource.push('/');
            resource.push_str(&sub);
        }
        *out.entry((verb, resource)).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
    }
    out
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: i32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn pids_named(root: &std::path::Path, file: &str) -> Vec<i32> {
    let mut out = vec![];
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n == file)
                && let Some(pid) = std::fs::read_to_string(&p)
                    .ok()
                    .and_then(|t| t.trim().parse().ok())
            {
                out.push(pid);
            }
        }
    }
    out
}

fn summary(kib: &[u64]) -> serde_json::Value {
    let n = kib.len().max(1) as u64;
    serde_json::json!({
        "count": kib.len(),
        "mean_mib": kib.iter().sum::<u64>() as f64 / n as f64 / 1024.0,
        "max_mib": kib.iter().max().copied().unwrap_or(0) as f64 / 1024.0,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn steady_state_api_writes_scale_with_nodes_not_volumes() {
    let volumes = env_or("TWINVOL_BENCH_VOLUMES", 4) as usize;
    let window = Duration::from_secs(env_or("TWINVOL_BENCH_SECONDS", 20));
    let started = Instant::now();
    let mut bed = Bed::start(&["room-a", "room-b"]).await;
    // The binary's defaults: what a cluster runs.
    bed.heartbeat_flags.clear();
    bed.place_replicas();
    let controller_plugin = bed.start_controller().await;
    let node_plugins = [bed.start_node(0).await, bed.start_node(1).await];
    let mut controller = Csi::connect(&controller_plugin.socket)
        .await
        .expect("controller");
    let mut ids = vec![];
    for i in 0..volumes {
        let node = &bed.nodes[i % 2];
        let id = controller
            .controller
            .create_volume(create_request(
                &format!("pvc-bench-{i}"),
                8 << 20,
                params(&[]),
            ))
            .await
            .expect("CreateVolume")
            .into_inner()
            .volume
            .expect("a volume")
            .volume_id;
        controller
            .controller
            .controller_publish_volume(publish_request(&id, &node.name))
            .await
            .expect("ControllerPublish");
        ids.push((id, i % 2));
    }
    let created = started.elapsed();
    // Stage a few at a time (each starts a frontend process).
    let stagings: Vec<_> = ids
        .iter()
        .map(|(id, n)| {
            let node = &bed.nodes[*n];
            let staging = node.root.join("staging").join(id);
            std::fs::create_dir_all(&staging).expect("staging dir");
            (id.clone(), staging, node_plugins[*n].socket.clone())
        })
        .collect();
    let results: Vec<_> = futures::stream::iter(stagings)
        .map(|(id, staging, socket)| async move {
            let mut csi = Csi::connect(&socket).await.expect("node plugin");
            csi.node
                .node_stage_volume(stage_request(
                    &id,
                    &staging,
                    block_cap(Mode::SingleNodeWriter),
                ))
                .await
                .map_err(|e| format!("NodeStage {id}: {e}"))
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for r in &results {
        if let Err(e) = r {
            panic!("{e}\n{}", bed.log_tails());
        }
    }
    let staged = started.elapsed();
    eprintln!("{volumes} volumes created in {created:?}, staged by {staged:?}");

    // Settle: the placement, the replicas' first reports, the frontends'
    // acquisitions all land; then count.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let before = writes(&bed);
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    let after = writes(&bed);
    let seconds = t0.elapsed().as_secs_f64();
    let mut rows: Vec<(String, String, f64)> = after
        .iter()
        .map(|((verb, res), n)| {
            let was = before
                .get(&(verb.clone(), res.clone()))
                .copied()
                .unwrap_or(0.0);
            (verb.clone(), res.clone(), (n - was) / seconds)
        })
        .filter(|(_, _, rate)| *rate > 0.0)
        .collect();
    rows.sort_by(|a, b| b.2.total_cmp(&a.2));
    let total: f64 = rows.iter().map(|r| r.2).sum();
    eprintln!("API writes per second over {seconds:.1} s of steady state, {volumes} volumes:");
    for (verb, res, rate) in &rows {
        eprintln!("  {rate:7.3}/s  {verb:6} {res}");
    }
    eprintln!("  {total:7.3}/s  total");

    let root = bed.dir.path().to_owned();
    let frontends: Vec<u64> = pids_named(&root, "frontend.pid")
        .into_iter()
        .filter_map(rss_kib)
        .collect();
    let replicas: Vec<u64> = pids_named(&root, "replica.pid")
        .into_iter()
        .filter_map(rss_kib)
        .collect();
    let heartbeats: Vec<u64> = pids_named(&root, "heartbeat.pid")
        .into_iter()
        .filter_map(rss_kib)
        .collect();
    let report = serde_json::json!({
        "volumes": volumes,
        "window_s": seconds,
        "writes_per_s_total": total,
        "writes": rows.iter().map(|(v, r, x)| serde_json::json!({"verb": v, "resource": r, "per_s": x})).collect::<Vec<_>>(),
        "rss": {
            "frontend": summary(&frontends),
            "replica_server": summary(&replicas),
            "heartbeat": summary(&heartbeats),
        },
        "staged_after_s": staged.as_secs_f64(),
    });
    eprintln!("{report:#}");
    if let Some(out) = std::env::var_os("TWINVOL_BENCH_OUT") {
        std::fs::write(out, serde_json::to_vec_pretty(&report).expect("json")).expect("report");
    }
    assert_eq!(
        frontends.len(),
        volumes,
        "every staged volume has its frontend"
    );
    assert!(
        total <= 2.0,
        "{total:.2} API writes/s in steady state with {volumes} volumes (bound: 2/s)"
    );
    // The volumes' own objects are not written in steady state at all.
    let volume_writes: f64 = rows
        .iter()
        .filter(|(_, res, _)| res.contains("mirroredvolumes"))
        .map(|r| r.2)
        .sum();
    assert!(
        volume_writes == 0.0,
        "MirroredVolumes written {volume_writes:.3}/s in steady state"
    );
}
