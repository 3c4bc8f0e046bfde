//! Running the processes of a test: the engine binary started with a ready
//! file and a log ([`start_proc`]), any command run to completion under a
//! deadline ([`run_with_deadline`], [`run_ok`]), and waiting for a condition
//! with a deadline ([`wait_until`], [`wait_for_log`]) — never a bare sleep.
//!
//! Every process is started in its own process group, so that killing it
//! also kills whatever it started (`ip netns exec`, fio's workers).

use std::fs::File;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// How long a process may take to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(20);

/// The engine binary built for this test run.
pub fn engine_bin() -> &'static str {
    env!("CARGO_BIN_EXE_twinvol-engine")
}

/// One running process of the stack.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
    /// `key=value` lines of its ready file.
    pub ready: Vec<(String, String)>,
}

impl Proc {
    pub fn ready_value(&self, key: &str) -> Option<&str> {
        self.ready
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL to the process group; reaps the child.
    pub fn kill(&mut self) {
        // SAFETY: kill(2) with a negative pid signals that process group; the
        // group was created for this child (process_group(0)).
        unsafe {
            libc::kill(-self.pid(), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `deadline` for a clean exit (SIGKILL
    /// after). Returns whether it exited by itself.
    pub fn terminate(&mut self, deadline: Duration) -> bool {
        // SAFETY: as in `kill`.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let end = Instant::now() + deadline;
        while Instant::now() < end {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(POLL);
        }
        self.kill();
        false
    }
}

fn spawn_logged(name: &str, args: &[String], log: &Path, netns: Option<&str>) -> Child {
    let out = File::options()
        .create(true)
        .append(true)
        .open(log)
        .unwrap_or_else(|e| panic!("cannot open log {}: {e}", log.display()));
    let err = out.try_clone().expect("clone log handle");
    let mut cmd = match netns {
        // `ip netns exec` execs the engine in place: same pid, same group.
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, engine_bin()]);
            c
        }
        None => Command::new(engine_bin()),
    };
    cmd.args(args)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env_remove("TWINVOL_LOG_JSON")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {name}: {e}"))
}

fn parse_ready(path: &Path) -> Option<Vec<(String, String)>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// The last `lines` lines of a file (for failure reports).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Waits for `cond` with a deadline; `None` on timeout.
pub fn wait_until<T>(deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(POLL);
    }
}

/// Starts `args` and waits for its ready file; panics with the log if it
/// exits first or the deadline passes.
pub fn start_proc(name: &str, args: Vec<String>, dir: &Path) -> Proc {
    start_proc_in(name, args, dir, None)
}

/// As [`start_proc`], inside network namespace `netns` if given.
pub fn start_proc_in(name: &str, mut args: Vec<String>, dir: &Path, netns: Option<&str>) -> Proc {
    let log = dir.join(format!("{name}.log"));
    let ready_path = dir.join(format!("{name}.ready"));
    let _ = std::fs::remove_file(&ready_path);
    args.push("--ready-file".into());
    args.push(ready_path.display().to_string());
    let mut child = spawn_logged(name, &args, &log, netns);
    let ready = wait_until(READY_DEADLINE, || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!(
                "{name} exited ({status}) before becoming ready; its log:\n{}",
                tail(&log, 40)
            );
        }
        parse_ready(&ready_path)
    });
    match ready {
        Some(ready) => Proc {
            name: name.to_owned(),
            child,
            log,
            ready,
        },
        None => {
            // SAFETY: as in `Proc::kill`.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            panic!(
                "{name} not ready within {READY_DEADLINE:?}; its log:\n{}",
                tail(&log, 40)
            );
        }
    }
}

/// Runs a command to completion with a deadline (killing its process group
/// when it passes); the test fails if it does not end in time.
pub fn run_with_deadline(mut cmd: Command, deadline: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn().expect("spawn command");
    let pid = child.id() as i32;
    let mut stdout = child.stdout.take().expect("piped stdout");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stdout.read_to_end(&mut v);
        v
    });
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    let status = wait_until(deadline, || child.try_wait().ok().flatten());
    let status = match status {
        Some(s) => s,
        None => {
            // SAFETY: as in `Proc::kill`.
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = child.wait();
            let err = err_reader.join().unwrap_or_default();
            panic!(
                "command did not finish within {deadline:?}; stderr:\n{}",
                String::from_utf8_lossy(&err)
            );
        }
    };
    Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    }
}

/// SHA-256 of a file, hex.
pub fn digest(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
/// Runs `cmd` with [`run_with_deadline`] and fails the test, with the
/// command and its output, unless it succeeds; returns its stdout.
pub fn run_ok(cmd: Command, deadline: Duration) -> String {
    let described = format!("{cmd:?}");
    let output = run_with_deadline(cmd, deadline);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{described} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// A command with its arguments (for [`run_ok`]).
pub fn command<S: AsRef<std::ffi::OsStr>>(
    program: &str,
    args: impl IntoIterator<Item = S>,
) -> Command {
    let mut cmd = Command::new(program);
    cmd.args(args);
    cmd
}

/// Stdout then stderr of a finished command, as text (what a user of the
/// tool would see on the terminal).
pub fn output_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `twinvol-engine volume create` of `volume` with `size` (bytes, or with
/// a suffix such as `1M`) in `pool`; fails the test if it fails.
pub fn create_volume(pool: &Path, volume: &str, size: &str) {
    let mut c = Command::new(engine_bin());
    c.args(["volume", "create", "--pool"])
        .arg(pool)
        .args(["--volume", volume, "--size", size]);
    let out = run_with_deadline(c, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "volume create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits up to `deadline` for the log at `path` to contain `needle`;
/// whether it did.
pub fn wait_for_log(path: &Path, needle: &str, deadline: Duration) -> bool {
    wait_until(deadline, || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|t| t.contains(needle))
    })
    .is_some()
}

/// Whether the file at `path` holds any non-zero byte (a volume's data
/// file once a client's writes reached it); false if it cannot be read.
pub fn holds_nonzero_byte(path: &Path) -> bool {
    std::fs::read(path)
        .map(|d| d.iter().any(|&b| b != 0))
        .unwrap_or(false)
}

/// A process a test started itself (not part of a [`crate::common::Stack`]):
/// killed when dropped, even when the test panics, and then the tail of
/// its log is printed.
pub struct KillOnDrop(pub Proc);

impl std::ops::Deref for KillOnDrop {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- {} ---\n{}",
                self.0.log.display(),
                tail(&self.0.log, 40)
            );
        }
    }
}
