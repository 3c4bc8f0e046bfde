//! Following a workload as it happens (`twinvol-cluster follow`, the demo's
//! progress lines): the [`Observer`] samples, [`narrate::changes`] says what
//! changed, each line stamped with the seconds since a given moment (the
//! power cut), until every goal holds in one sample or the time is up.

use std::{
    io::Write,
    str::FromStr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kube::Client;

use super::{Observer, Sample, narrate};
use crate::HarnessError;

/// What following waits for (all of them in one sample).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Goal {
    /// A pod of the workload Ready (and not being deleted) on this node.
    ReadyOn(String),
    /// Both replicas in the volume's in-sync set.
    InSync,
}

impl Goal {
    pub fn holds(&self, s: &Sample) -> bool {
        match self {
            Goal::ReadyOn(node) => s.running_on(node).is_some(),
            Goal::InSync => s.in_sync.len() == 2,
        }
    }
}

impl std::fmt::Display for Goal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Goal::ReadyOn(node) => write!(f, "pod Ready on {node}"),
            Goal::InSync => write!(f, "both replicas in sync"),
        }
    }
}

impl FromStr for Goal {
    type Err = String;

    /// `ready-on=NODE` or `in-sync`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('=') {
            Some(("ready-on", node)) if !node.is_empty() => Ok(Goal::ReadyOn(node.to_owned())),
            None if s == "in-sync" => Ok(Goal::InSync),
            _ => Err(format!(
                "unknown goal {s:?}: use ready-on=NODE (e.g. ready-on=node-b1) or in-sync"
            )),
        }
    }
}

/// What to follow.
#[derive(Debug, Clone)]
pub struct FollowOptions {
    /// Pods labelled `app=<app>` in `default`.
    pub app: String,
    /// The claim whose volume to follow.
    pub pvc: String,
    /// Lines are stamped with the time since this moment.
    pub zero: Instant,
    pub goals: Vec<Goal>,
    pub timeout: Duration,
}

/// The [`Instant`] that was `unix_seconds` (wall clock) ago; an error for a
/// moment in the future or before 1970.
pub fn instant_of(unix_seconds: f64) -> Result<Instant, HarnessError> {
    let bad = || HarnessError::InvalidOption {
        option: "since (seconds since 1970, in the past)",
        value: unix_seconds.to_string(),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| bad())?;
    let then = Duration::try_from_secs_f64(unix_seconds).map_err(|_| bad())?;
    let ago = now.checked_sub(then).ok_or_else(bad)?;
    Instant::now().checked_sub(ago).ok_or_else(bad)
}

/// Prints every change until the goals hold; returns when they did, since
/// `opts.zero`. With an `action` (a fault: the power cut), the state is
/// sampled first, then the action runs and the clock starts as it does
/// (`opts.zero` is then ignored), so that nothing it causes is missed.
pub async fn follow<A>(
    client: Client,
    opts: &FollowOptions,
    action: Option<A>,
    out: &mut impl Write,
) -> Result<Duration, HarnessError>
where
    A: FnOnce() -> Result<String, HarnessError> + Send + 'static,
{
    let observer = Observer::start(client, &opts.app, &opts.pvc);
    let deadline = Instant::now() + opts.timeout;
    let mut seen = 0;
    let mut prev: Option<Sample> = None;
    let mut zero = opts.zero;
    if let Some(action) = action {
        let first = Instant::now() + Duration::from_secs(30);
        while observer.samples_from(0).is_empty() {
            if Instant::now() > first {
                observer.stop();
                return Err(HarnessError::Cluster(
                    "no sample of the workload within 30 s: is the API server reachable?".into(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let samples = observer.samples_from(0);
        seen = samples.len();
        let (_, sample) = samples.last().cloned().expect("one sample at least");
        for line in narrate::changes(None, &sample) {
            let _ = writeln!(out, "  before  {line}");
        }
        prev = Some(sample);
        zero = Instant::now();
        let said = tokio::task::spawn_blocking(action)
            .await
            .map_err(|e| HarnessError::Cluster(format!("the action did not finish: {e}")))??;
        let _ = writeln!(
            out,
            "{:>8.1} s  {said} (the clock started as it was asked for)",
            zero.elapsed().as_secs_f64()
        );
    }
    let stamp = |t: Instant| t.saturating_duration_since(zero).as_secs_f64();
    loop {
        for (t, sample) in observer.samples_from(seen) {
            seen += 1;
            for line in narrate::changes(prev.as_ref(), &sample) {
                let _ = writeln!(out, "{:>8.1} s  {line}", stamp(t));
            }
            let _ = out.flush();
            if !opts.goals.is_empty() && opts.goals.iter().all(|g| g.holds(&sample)) {
                observer.stop();
                return Ok(t.saturating_duration_since(zero));
            }
            prev = Some(sample);
        }
        if Instant::now() > deadline {
            observer.stop();
            let goals: Vec<String> = opts.goals.iter().map(Goal::to_string).collect();
            return Err(HarnessError::NotReady {
                what: goals.join(" and "),
                waited: opts.timeout,
                last: prev
                    .map(|s| narrate::changes(None, &s).join("; "))
                    .unwrap_or_else(|| "no sample (is the API server reachable?)".into()),
                log_tail: String::new(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_parse_and_refuse_what_they_do_not_know() {
        assert_eq!(
            "ready-on=node-b1".parse(),
            Ok(Goal::ReadyOn("node-b1".into()))
        );
        assert_eq!("in-sync".parse(), Ok(Goal::InSync));
        assert!("ready-on=".parse::<Goal>().is_err());
        assert!("home".parse::<Goal>().is_err());
    }

    #[test]
    fn since_must_be_a_past_moment() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970")
            .as_secs_f64();
        let zero = instant_of(now - 2.0).expect("two seconds ago");
        let ago = zero.elapsed().as_secs_f64();
        assert!((1.9..3.0).contains(&ago), "{ago}");
        assert!(instant_of(now + 60.0).is_err());
        assert!(instant_of(-1.0).is_err());
    }
}
