//! The cluster for people: `e2e/cluster.sh up|down|status|kubeconfig|fault …`
//! (the `twinvol-cluster` binary).
//!
//! `up` starts a supervisor (`twinvol-cluster serve`, in a session of its
//! own, so it outlives the shell) that runs the same [`Cluster`] the tests
//! use and holds its slot; it answers one request per connection on a unix
//! socket (`/run/twinvol-cluster/cli/control.sock`: one JSON line in, one
//! out). `down` asks it to tear down; if it is gone (crashed, killed),
//! `down` sweeps what it left. Every `up` and `down` also sweeps the
//! leftovers of every slot no live process holds.
//!
//! Beside the cluster, the supervisor builds and imports the chart's images,
//! gives the chart's values for the bed, and runs the records workload's
//! collectors ([`cli_bed`]); `follow` watches a workload from this process.

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    HarnessError,
    cluster::{Cluster, ClusterOptions, Link, NodeId, Site, cli_bed, layout, sweep},
    control_plane::client_from,
    observe::{self, FollowOptions},
};

/// The supervisor's directory: its socket, state and log.
pub const CLI_DIR: &str = "/run/twinvol-cluster/cli";

fn socket_path() -> PathBuf {
    Path::new(CLI_DIR).join("control.sock")
}

fn state_path() -> PathBuf {
    Path::new(CLI_DIR).join("state.json")
}

fn log_path() -> PathBuf {
    Path::new(CLI_DIR).join("serve.log")
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> HarnessError {
    let path = path.to_owned();
    move |source| HarnessError::Io {
        action,
        path,
        source,
    }
}

/// A fault (or its repair) a user can ask for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    KillNode(NodeId),
    StartNode(NodeId),
    PowerOff(Site),
    PowerOn(Site),
    CutInterSite,
    RestoreInterSite,
    Partition(Site),
    Heal(Site),
    CutNodeLink(NodeId),
    RestoreNodeLink(NodeId),
}

impl Fault {
    /// `kill-node a1`, `power-off a`, `cut-intersite`, …
    pub fn parse(verb: &str, arg: Option<&str>) -> Result<Self, String> {
        let node = || -> Result<NodeId, String> {
            arg.ok_or_else(|| format!("{verb} needs a node (a1, b2, …)"))?
                .parse()
        };
        let site = || -> Result<Site, String> {
            arg.ok_or_else(|| format!("{verb} needs a site (a or b)"))?
                .parse()
        };
        Ok(match verb {
            "kill-node" => Fault::KillNode(node()?),
            "start-node" => Fault::StartNode(node()?),
            "power-off" => Fault::PowerOff(site()?),
            "power-on" => Fault::PowerOn(site()?),
            "cut-intersite" => Fault::CutInterSite,
            "restore-intersite" => Fault::RestoreInterSite,
            "partition" => Fault::Partition(site()?),
            "heal" => Fault::Heal(site()?),
            "cut-node-link" => Fault::CutNodeLink(node()?),
            "restore-node-link" => Fault::RestoreNodeLink(node()?),
            other => {
                return Err(format!(
                    "unknown fault {other:?}; known: {}",
                    FAULTS.join(", ")
                ));
            }
        })
    }

    fn to_request(&self) -> Value {
        let (verb, arg) = match self {
            Fault::KillNode(n) => ("kill-node", Some(n.short())),
            Fault::StartNode(n) => ("start-node", Some(n.short())),
            Fault::PowerOff(s) => ("power-off", Some(s.letter().to_string())),
            Fault::PowerOn(s) => ("power-on", Some(s.letter().to_string())),
            Fault::CutInterSite => ("cut-intersite", None),
            Fault::RestoreInterSite => ("restore-intersite", None),
            Fault::Partition(s) => ("partition", Some(s.letter().to_string())),
            Fault::Heal(s) => ("heal", Some(s.letter().to_string())),
            Fault::CutNodeLink(n) => ("cut-node-link", Some(n.short())),
            Fault::RestoreNodeLink(n) => ("restore-node-link", Some(n.short())),
        };
        json!({"op": "fault", "verb": verb, "arg": arg})
    }
}

/// The fault verbs, for help texts.
pub const FAULTS: [&str; 10] = [
    "kill-node NODE",
    "start-node NODE",
    "power-off SITE",
    "power-on SITE",
    "cut-intersite",
    "restore-intersite",
    "partition SITE",
    "heal SITE",
    "cut-node-link NODE",
    "restore-node-link NODE",
];

fn request(body: &Value, timeout: Duration) -> Result<Value, HarnessError> {
    let socket = socket_path();
    let mut stream = match UnixStream::connect(&socket) {
        Ok(stream) => stream,
        Err(_) if supervisor_alive().is_none() => return Err(no_cluster()),
        Err(e) => return Err(io_error("connecting to", &socket)(e)),
    };
    stream
        .set_read_timeout(Some(timeout))
        .map_err(io_error("configuring", &socket))?;
    writeln!(stream, "{body}").map_err(io_error("writing to", &socket))?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .map_err(io_error("reading from", &socket))?;
    let answer: Value = serde_json::from_str(&line).map_err(|e| {
        HarnessError::Cluster(format!("bad answer from the supervisor {line:?}: {e}"))
    })?;
    if answer["ok"].as_bool() == Some(true) {
        Ok(answer)
    } else {
        Err(HarnessError::Cluster(
            answer["error"]
                .as_str()
                .unwrap_or("the supervisor failed")
                .to_owned(),
        ))
    }
}

fn supervisor_alive() -> Option<i32> {
    let state: Value = serde_json::from_str(&std::fs::read_to_string(state_path()).ok()?).ok()?;
    let pid = i32::try_from(state["pid"].as_i64()?).ok()?;
    let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    alive.then_some(pid)
}

fn no_cluster() -> HarnessError {
    HarnessError::Cluster("no cluster is up: start one with `bash e2e/cluster.sh up`".into())
}

fn sweep_abandoned() -> Result<(), HarnessError> {
    for (slot, found) in sweep::sweep_abandoned(&layout::base_dir())? {
        eprintln!("swept leftovers of slot {}:\n{found}", slot.number());
    }
    Ok(())
}

/// `up`: starts the supervisor and waits until the cluster is Ready.
pub fn up(nodes_per_site: u8) -> Result<String, HarnessError> {
    if supervisor_alive().is_some() {
        let answer = request(&json!({"op": "kubeconfig"}), Duration::from_secs(10))?;
        return Ok(format!(
            "already up\nexport KUBECONFIG={}",
            answer["kubeconfig"].as_str().unwrap_or_default()
        ));
    }
    sweep_abandoned()?;
    std::fs::create_dir_all(CLI_DIR).map_err(io_error("creating", Path::new(CLI_DIR)))?;
    let _ = std::fs::remove_file(state_path());
    let _ = std::fs::remove_file(socket_path());
    let exe = std::env::current_exe().map_err(io_error("finding", Path::new("/proc/self/exe")))?;
    let log = log_path();
    let out = std::fs::File::create(&log).map_err(io_error("creating", &log))?;
    let err = out.try_clone().map_err(io_error("duplicating", &log))?;
    let mut child = Command::new("setsid")
        .arg(&exe)
        .arg("serve")
        .arg("--nodes-per-site")
        .arg(nodes_per_site.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .map_err(|source| HarnessError::Spawn {
            component: "twinvol-cluster serve".into(),
            path: exe.clone(),
            source,
        })?;
    // Known from now on, so that a `down` while it starts (the demo
    // interrupted) stops it too; `serve` rewrites the file once up.
    let path = state_path();
    std::fs::write(
        &path,
        json!({"pid": child.id(), "starting": true}).to_string(),
    )
    .map_err(io_error("writing", &path))?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs(600);
    loop {
        if let Ok(text) = std::fs::read_to_string(state_path())
            && let Ok(state) = serde_json::from_str::<Value>(&text)
            && state.get("kubeconfig").is_some()
        {
            return Ok(format!(
                "up in {:.1} s (slot {}, {} node(s) per site)\n{}\nexport KUBECONFIG={}",
                started.elapsed().as_secs_f64(),
                state["slot"],
                nodes_per_site,
                state["describe"].as_str().unwrap_or_default(),
                state["kubeconfig"].as_str().unwrap_or_default()
            ));
        }
        if let Ok(Some(status)) = child.try_wait() {
            return Err(HarnessError::ExitedEarly {
                component: "twinvol-cluster serve".into(),
                status: status.to_string(),
                log_tail: crate::process::tail(&log, 60),
            });
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Cluster(format!(
                "the cluster did not come up in 10 minutes; see {}",
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `down`: tears the cluster down (or sweeps what a dead supervisor left).
pub fn down() -> Result<String, HarnessError> {
    let mut said = String::new();
    if let Some(pid) = supervisor_alive() {
        match request(&json!({"op": "down"}), Duration::from_secs(300)) {
            Ok(_) => said.push_str("cluster torn down\n"),
            Err(e) => said.push_str(&format!(
                "the supervisor did not answer ({e}); killing it\n"
            )),
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    } else {
        said.push_str("no supervisor running\n");
    }
    sweep_abandoned()?;
    let _ = std::fs::remove_file(state_path());
    let _ = std::fs::remove_file(socket_path());
    said.push_str("nothing of ours left");
    Ok(said)
}

pub fn status() -> Result<String, HarnessError> {
    if supervisor_alive().is_none() {
        return Ok("down".into());
    }
    let answer = request(&json!({"op": "status"}), Duration::from_secs(30))?;
    Ok(answer["status"].as_str().unwrap_or_default().to_owned())
}

pub fn kubeconfig() -> Result<String, HarnessError> {
    let answer = request(&json!({"op": "kubeconfig"}), Duration::from_secs(10))?;
    Ok(answer["kubeconfig"].as_str().unwrap_or_default().to_owned())
}

/// `images`: builds twinvol's image from the release binaries in `bin_dir`
/// under `tag`, and the sidecars', and imports them into every node.
pub fn images(bin_dir: &Path, tag: &str) -> Result<String, HarnessError> {
    let bin_dir = std::path::absolute(bin_dir).map_err(io_error("resolving", bin_dir))?;
    crate::bed::release_binaries(&bin_dir)?;
    let answer = request(
        &json!({"op": "images", "bin_dir": bin_dir, "tag": tag}),
        Duration::from_secs(600),
    )?;
    Ok(answer["message"].as_str().unwrap_or_default().to_owned())
}

/// `values`: the chart's values for this bed (JSON, for `helm -f`).
pub fn values(tag: &str) -> Result<String, HarnessError> {
    let answer = request(
        &json!({"op": "values", "tag": tag}),
        Duration::from_secs(30),
    )?;
    serde_json::to_string_pretty(&answer["values"])
        .map_err(|e| HarnessError::Cluster(format!("the values do not serialize: {e}")))
}

/// `workload`: the records StatefulSet's manifest (its collector started in
/// the supervisor), for `kubectl apply -f -`.
pub fn workload(
    name: &str,
    storage_class: &str,
    size: &str,
    site: Site,
) -> Result<String, HarnessError> {
    let answer = request(
        &json!({"op": "workload", "name": name, "storage_class": storage_class,
                "size": size, "site": site.letter().to_string()}),
        Duration::from_secs(30),
    )?;
    Ok(answer["manifest"].as_str().unwrap_or_default().to_owned())
}

/// `records`: checks every acknowledged record of `app` is in `pod`'s
/// volume, once at least `at_least` were acknowledged (waiting up to
/// [`cli_bed::RECORDS_WAIT`]). The summary, and whether none is missing.
pub fn records(app: &str, pod: &str, at_least: u64) -> Result<(String, bool), HarnessError> {
    let deadline = Instant::now() + cli_bed::RECORDS_WAIT;
    loop {
        let answer = request(
            &json!({"op": "records", "app": app, "pod": pod}),
            Duration::from_secs(60),
        );
        // While waiting for the writer, a failed read (its pod not running
        // yet) is tried again; a plain check reports it at once.
        match answer {
            Ok(a) if a["acked"].as_u64().unwrap_or(0) >= at_least => {
                return Ok(cli_bed::summarize_records(&a));
            }
            Err(e) if at_least == 0 => return Err(e),
            Ok(_) | Err(_) if Instant::now() < deadline => {}
            Ok(a) => {
                return Err(HarnessError::Cluster(format!(
                    "{app}: {} records acknowledged, not {at_least}, within {:?}",
                    a["acked"],
                    cli_bed::RECORDS_WAIT
                )));
            }
            Err(e) => return Err(e),
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// `follow`: prints what happens to the workload until the goals hold;
/// returns the one-line result.
/// With a `fault`, it is injected once the state before it was sampled,
/// and the clock starts with it.
pub async fn follow(opts: &FollowOptions, fault: Option<Fault>) -> Result<String, HarnessError> {
    let kubeconfig = PathBuf::from(kubeconfig()?);
    let client = client_from(&kubeconfig).await?;
    let action = fault.map(|f| move || self::fault(&f));
    let took = observe::follow(client, opts, action, &mut std::io::stdout()).await?;
    let goals: Vec<String> = opts.goals.iter().map(ToString::to_string).collect();
    Ok(format!(
        "reached: {} at {:.1} s",
        goals.join(" and "),
        took.as_secs_f64()
    ))
}

pub fn fault(fault: &Fault) -> Result<String, HarnessError> {
    let answer = request(&fault.to_request(), Duration::from_secs(300))?;
    Ok(answer["message"].as_str().unwrap_or_default().to_owned())
}

/// `serve`: runs the cluster until asked to go down.
pub async fn serve(nodes_per_site: u8) -> Result<(), HarnessError> {
    let mut cluster = Cluster::start(ClusterOptions {
        nodes_per_site,
        ..ClusterOptions::default()
    })
    .await?;
    let socket = socket_path();
    let _ = std::fs::remove_file(&socket);
    let listener = UnixListener::bind(&socket).map_err(io_error("binding", &socket))?;
    let state = json!({
        "pid": std::process::id(),
        "slot": cluster.slot().number(),
        "root": cluster.root(),
        "kubeconfig": cluster.kubeconfig(),
        "describe": cluster.describe(),
    });
    let path = state_path();
    std::fs::write(&path, state.to_string()).map_err(io_error("writing", &path))?;
    eprintln!("cluster up: {}", cluster.describe());
    let mut bench = cli_bed::Workbench::default();
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => continue,
        });
        let mut line = String::new();
        if reader.read_line(&mut line).is_err() {
            continue;
        }
        let request: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        let (answer, stop) = handle(&mut cluster, &mut bench, &request).await;
        let mut stream = stream;
        let _ = writeln!(stream, "{answer}");
        if stop {
            break;
        }
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&path);
    cluster.shutdown()
}

async fn handle(
    cluster: &mut Cluster,
    bench: &mut cli_bed::Workbench,
    request: &Value,
) -> (Value, bool) {
    let op = request["op"].as_str().unwrap_or_default();
    if let Some(result) = bench.handle(cluster, op, request).await {
        return (answer(result), false);
    }
    let result: Result<Value, HarnessError> = match op {
        "kubeconfig" => Ok(json!({"kubeconfig": cluster.kubeconfig()})),
        "status" => {
            let nodes = cluster
                .kubectl_ok(&["get", "nodes", "-o", "wide", "-L", layout::ZONE_LABEL])
                .unwrap_or_else(|e| format!("kubectl get nodes: {e}\n"));
            Ok(json!({"status": format!("{}\n{nodes}", cluster.describe())}))
        }
        "down" => return (json!({"ok": true}), true),
        "fault" => {
            let verb = request["verb"].as_str().unwrap_or_default();
            let arg = request["arg"].as_str();
            match Fault::parse(verb, arg) {
                Ok(fault) => apply(cluster, &fault).await.map(|m| json!({"message": m})),
                Err(e) => Err(HarnessError::Cluster(e)),
            }
        }
        other => Err(HarnessError::Cluster(format!("unknown request {other:?}"))),
    };
    (answer(result), false)
}

fn answer(result: Result<Value, HarnessError>) -> Value {
    match result {
        Ok(mut value) => {
            value["ok"] = json!(true);
            value
        }
        Err(e) => json!({"ok": false, "error": e.to_string()}),
    }
}

async fn apply(cluster: &mut Cluster, fault: &Fault) -> Result<String, HarnessError> {
    let ready = Duration::from_secs(180);
    Ok(match *fault {
        Fault::KillNode(n) => {
            cluster.kill_node(n)?;
            format!(
                "{n}: every process killed (SIGKILL); `fault start-node {}` brings it back",
                n.short()
            )
        }
        Fault::StartNode(n) => {
            let t = Instant::now();
            cluster.start_node(n)?;
            cluster.wait_ready(&[n], ready).await?;
            format!(
                "{n} booted fresh, Ready after {:.1} s",
                t.elapsed().as_secs_f64()
            )
        }
        Fault::PowerOff(s) => {
            cluster.power_off_site(s)?;
            format!("{s} powered off: its nodes are dead, its links dark")
        }
        Fault::PowerOn(s) => {
            let t = Instant::now();
            cluster.power_on_site(s)?;
            let nodes = cluster.nodes_of(s);
            cluster.wait_ready(&nodes, ready).await?;
            format!(
                "{s} powered on, nodes Ready after {:.1} s",
                t.elapsed().as_secs_f64()
            )
        }
        Fault::CutInterSite => {
            cluster.cut(Link::InterSite)?;
            "the inter-site link is cut".into()
        }
        Fault::RestoreInterSite => {
            cluster.restore(Link::InterSite)?;
            "the inter-site link is restored".into()
        }
        Fault::Partition(s) => {
            cluster.partition(s)?;
            format!("{s} is cut off the control plane")
        }
        Fault::Heal(s) => {
            cluster.heal(s)?;
            format!("{s} reaches the control plane again")
        }
        Fault::CutNodeLink(n) => {
            cluster.cut(Link::Node(n))?;
            format!("{n}'s link is cut")
        }
        Fault::RestoreNodeLink(n) => {
            cluster.restore(Link::Node(n))?;
            format!("{n}'s link is restored")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_parse_from_their_verbs_and_round_trip() {
        let a1: NodeId = "a1".parse().expect("node");
        for fault in [
            Fault::KillNode(a1),
            Fault::StartNode(a1),
            Fault::PowerOff(Site::A),
            Fault::PowerOn(Site::B),
            Fault::CutInterSite,
            Fault::RestoreInterSite,
            Fault::Partition(Site::A),
            Fault::Heal(Site::A),
            Fault::CutNodeLink(a1),
            Fault::RestoreNodeLink(a1),
        ] {
            let request = fault.to_request();
            let parsed = Fault::parse(
                request["verb"].as_str().expect("verb"),
                request["arg"].as_str(),
            );
            assert_eq!(parsed, Ok(fault));
        }
        assert!(Fault::parse("power-off", None).is_err());
        assert!(Fault::parse("explode", None).is_err());
    }
}
