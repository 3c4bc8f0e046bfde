//! What changed between two [`Sample`]s, in the words a kubectl user would
//! use: one line per change (a pod created, scheduled, Ready or deleted; a
//! Site's health or fencing; the volume's epoch, in-sync set, frontend,
//! replica states and resync progress; conditions; attachments). The demo
//! prints these as they happen (`twinvol-cluster follow`); kept apart from
//! the sampler so that the wording is tested without a cluster.

use std::collections::BTreeMap;

use super::sampler::{PodSample, ReplicaSample, Sample};

/// The lines saying how `next` differs from `prev`; with no `prev`, the
/// lines describing `next` as a whole (the state when following starts).
pub fn changes(prev: Option<&Sample>, next: &Sample) -> Vec<String> {
    let Some(prev) = prev else {
        return describe(next);
    };
    let mut out = Vec::new();
    pods(&prev.pods, &next.pods, &mut out);
    for (site, healthy, fenced) in &next.sites {
        let before = prev.sites.iter().find(|(s, _, _)| s == site);
        match before {
            None => out.push(format!("Site {site}: Healthy={healthy}")),
            Some((_, h, f)) => {
                if h != healthy {
                    out.push(format!("Site {site} Healthy: {h} -> {healthy}"));
                }
                if f != fenced {
                    out.push(format!(
                        "Site {site} {}",
                        if *fenced { "FENCED" } else { "unfenced" }
                    ));
                }
            }
        }
    }
    if !prev.pvc_bound && next.pvc_bound {
        out.push(format!(
            "claim Bound to volume {}",
            next.volume.as_deref().unwrap_or("-")
        ));
    }
    if prev.epoch != next.epoch {
        out.push(format!(
            "volume epoch {} -> {}",
            opt(prev.epoch),
            opt(next.epoch)
        ));
    }
    if prev.in_sync != next.in_sync {
        out.push(format!(
            "in-sync set {} -> {}",
            set(&prev.in_sync),
            set(&next.in_sync)
        ));
    }
    if prev.frontend != next.frontend {
        out.push(format!(
            "frontend {} -> {}",
            prev.frontend.as_deref().unwrap_or("none"),
            next.frontend.as_deref().unwrap_or("none")
        ));
    }
    replicas(&prev.replicas, &next.replicas, &mut out);
    let before = by_type(&prev.conditions);
    for (kind, now) in by_type(&next.conditions) {
        if before.get(kind) != Some(&now) {
            out.push(format!("condition {kind}={now}"));
        }
    }
    for (node, attached) in &next.attachments {
        match prev.attachments.iter().find(|(n, _)| n == node) {
            None if *attached => out.push(format!("VolumeAttachment to {node}: attached")),
            None => out.push(format!("VolumeAttachment to {node} created")),
            Some((_, was)) if was != attached => out.push(format!(
                "VolumeAttachment to {node}: {}",
                if *attached { "attached" } else { "detached" }
            )),
            Some(_) => {}
        }
    }
    for (node, _) in &prev.attachments {
        if !next.attachments.iter().any(|(n, _)| n == node) {
            out.push(format!("VolumeAttachment to {node} removed"));
        }
    }
    out
}

fn describe(s: &Sample) -> Vec<String> {
    let mut out: Vec<String> = s.pods.iter().map(pod_state).collect();
    if s.pods.is_empty() {
        out.push("no pod".into());
    }
    for (site, healthy, fenced) in &s.sites {
        out.push(format!(
            "Site {site}: Healthy={healthy}{}",
            if *fenced { ", FENCED" } else { "" }
        ));
    }
    if let Some(volume) = &s.volume {
        out.push(format!(
            "volume {volume}: epoch {}, in-sync set {}, frontend {}",
            opt(s.epoch),
            set(&s.in_sync),
            s.frontend.as_deref().unwrap_or("none")
        ));
        for r in &s.replicas {
            out.push(format!("replica on {}: {}{}", r.site, r.state, progress(r)));
        }
        if !s.conditions.is_empty() {
            out.push(format!("conditions {}", s.conditions.join(", ")));
        }
    }
    out
}

fn pod_state(p: &PodSample) -> String {
    format!(
        "pod {} on {}: {}{}",
        pod(p),
        p.node.as_deref().unwrap_or("no node yet"),
        p.phase.as_deref().unwrap_or("no phase"),
        match (p.ready, p.deleting) {
            (_, true) => ", being deleted",
            (true, false) => ", Ready",
            (false, false) => ", not Ready",
        }
    )
}

fn pod(p: &PodSample) -> String {
    format!("{} [{}]", p.name, &p.uid[..8.min(p.uid.len())])
}

fn pods(prev: &[PodSample], next: &[PodSample], out: &mut Vec<String>) {
    for p in next {
        let Some(was) = prev.iter().find(|q| q.uid == p.uid) else {
            out.push(match &p.node {
                Some(node) => format!("pod {} created, on {node}", pod(p)),
                None => format!("pod {} created", pod(p)),
            });
            continue;
        };
        let on = p.node.as_deref().unwrap_or("-");
        if was.node.is_none()
            && let Some(node) = &p.node
        {
            out.push(format!("pod {} scheduled on {node}", pod(p)));
        }
        if !was.deleting && p.deleting {
            out.push(format!("pod {} on {on} being deleted", pod(p)));
        }
        if was.started != p.started {
            out.push(format!(
                "pod {}: container {} on {on}",
                pod(p),
                if p.started { "running" } else { "not running" }
            ));
        }
        if p.restarts > was.restarts {
            out.push(format!(
                "pod {}: container restarted in place ({} restarts)",
                pod(p),
                p.restarts
            ));
        }
        if was.ready != p.ready {
            out.push(format!(
                "pod {} {} on {on}",
                pod(p),
                if p.ready { "READY" } else { "no longer Ready" }
            ));
        }
        if was.phase != p.phase && matches!(p.phase.as_deref(), Some("Failed" | "Unknown")) {
            out.push(format!("pod {} phase {}", pod(p), opt(p.phase.as_deref())));
        }
    }
    for p in prev {
        if !next.iter().any(|q| q.uid == p.uid) {
            out.push(format!(
                "pod {} gone (was on {})",
                pod(p),
                p.node.as_deref().unwrap_or("no node")
            ));
        }
    }
}

fn replicas(prev: &[ReplicaSample], next: &[ReplicaSample], out: &mut Vec<String>) {
    for r in next {
        match prev.iter().find(|q| q.site == r.site) {
            None => out.push(format!("replica on {}: {}{}", r.site, r.state, progress(r))),
            Some(was) => {
                if was.state != r.state {
                    out.push(format!(
                        "replica on {}: {} -> {}",
                        r.site, was.state, r.state
                    ));
                }
                if (was.done, was.remaining) != (r.done, r.remaining) && r.remaining.is_some() {
                    out.push(format!("resync to {}{}", r.site, progress(r)));
                }
            }
        }
    }
}

/// `: 24.0 of 96.0 MiB copied (25 %)` when the replica's entry carries
/// resync progress.
fn progress(r: &ReplicaSample) -> String {
    match (r.done, r.remaining) {
        (Some(done), Some(left)) => {
            let total = done + left;
            let mib = |b: u64| b as f64 / 1_048_576.0;
            let percent = if total == 0 {
                100.0
            } else {
                done as f64 * 100.0 / total as f64
            };
            format!(
                ": {:.1} of {:.1} MiB copied ({percent:.0} %)",
                mib(done),
                mib(total)
            )
        }
        _ => String::new(),
    }
}

/// `type=status(reason)` entries by type.
fn by_type(conditions: &[String]) -> BTreeMap<&str, String> {
    conditions
        .iter()
        .map(|c| match c.split_once('=') {
            Some((kind, rest)) => (kind, rest.to_owned()),
            None => (c.as_str(), String::new()),
        })
        .collect()
}

fn set(sites: &[String]) -> String {
    format!("{{{}}}", sites.join(", "))
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod_on(uid: &str, node: Option<&str>, ready: bool) -> PodSample {
        PodSample {
            uid: uid.into(),
            name: "writer-0".into(),
            node: node.map(str::to_owned),
            phase: Some("Running".into()),
            started: ready,
            ready,
            deleting: false,
            restarts: 0,
        }
    }

    fn steady() -> Sample {
        Sample {
            pods: vec![pod_on("aaaaaaaa-1", Some("node-a1"), true)],
            sites: vec![
                ("site-a".into(), "True".into(), false),
                ("site-b".into(), "True".into(), false),
            ],
            pvc_bound: true,
            volume: Some("pvc-1".into()),
            epoch: Some(2),
            in_sync: vec!["site-a".into(), "site-b".into()],
            frontend: Some("node-a1".into()),
            replicas: vec![ReplicaSample {
                site: "site-a".into(),
                state: "InSync".into(),
                done: None,
                remaining: None,
            }],
            conditions: vec!["Degraded=False(InSync)".into()],
            attachments: vec![("node-a1".into(), true)],
        }
    }

    #[test]
    fn a_fail_over_reads_as_its_steps() {
        let before = steady();
        let mut after = before.clone();
        after.sites[0] = ("site-a".into(), "False".into(), true);
        after.epoch = Some(3);
        after.in_sync = vec!["site-b".into()];
        after.frontend = Some("node-b1".into());
        after.pods = vec![pod_on("bbbbbbbb-2", Some("node-b1"), false)];
        after.conditions = vec!["Degraded=True(ReplicaLost)".into()];
        after.attachments = vec![("node-b1".into(), true)];
        let lines = changes(Some(&before), &after);
        for expected in [
            "pod writer-0 [bbbbbbbb] created, on node-b1",
            "pod writer-0 [aaaaaaaa] gone (was on node-a1)",
            "Site site-a Healthy: True -> False",
            "Site site-a FENCED",
            "volume epoch 2 -> 3",
            "in-sync set {site-a, site-b} -> {site-b}",
            "frontend node-a1 -> node-b1",
            "condition Degraded=True(ReplicaLost)",
            "VolumeAttachment to node-b1: attached",
            "VolumeAttachment to node-a1 removed",
        ] {
            assert!(
                lines.iter().any(|l| l == expected),
                "{expected:?} not in {lines:#?}"
            );
        }
    }

    #[test]
    fn resync_progress_is_shown_in_mebibytes_and_percent() {
        let before = steady();
        let mut after = before.clone();
        after.replicas[0].state = "Resyncing".into();
        after.replicas[0].done = Some(24 << 20);
        after.replicas[0].remaining = Some(72 << 20);
        assert_eq!(
            changes(Some(&before), &after),
            [
                "replica on site-a: InSync -> Resyncing",
                "resync to site-a: 24.0 of 96.0 MiB copied (25 %)"
            ]
        );
    }

    #[test]
    fn an_unchanged_sample_says_nothing_and_a_first_one_says_everything() {
        let s = steady();
        assert!(changes(Some(&s), &s).is_empty());
        let all = changes(None, &s);
        assert_eq!(all[0], "pod writer-0 [aaaaaaaa] on node-a1: Running, Ready");
        assert!(all.iter().any(|l| l.starts_with("volume pvc-1: epoch 2")));
    }
}
