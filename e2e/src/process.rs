//! One component process the harness started: its own process group (so that
//! whatever it forks dies with it), stdout and stderr in a log file, and a
//! `Drop` that kills the whole group and reaps it — on success, on error and
//! while a test panics alike.

use std::{
    fs::{self, File},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
};

use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};

use crate::HarnessError;

/// A running component.
#[derive(Debug)]
pub struct ManagedProcess {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl ManagedProcess {
    /// Starts `program` with `args` in a new process group, output to `log`.
    pub fn spawn(
        name: &str,
        program: &Path,
        args: &[String],
        log: &Path,
    ) -> Result<Self, HarnessError> {
        let io_error = |action| {
            move |source| HarnessError::Io {
                action,
                path: log.to_owned(),
                source,
            }
        };
        let out = File::create(log).map_err(io_error("creating"))?;
        let err = out.try_clone().map_err(io_error("duplicating"))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| HarnessError::Spawn {
                component: name.to_owned(),
                path: program.to_owned(),
                source,
            })?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reaped: false,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The exit status if the process already ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// An error for a process found dead before it was ready.
    pub fn exited_early(&self, status: ExitStatus) -> HarnessError {
        HarnessError::ExitedEarly {
            component: self.name.clone(),
            status: status.to_string(),
            log_tail: self.log_tail(40),
        }
    }

    /// The last `lines` lines of the component's log.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Kills the process group and reaps the leader. Idempotent.
    pub fn kill(&mut self) {
        if self.reaped {
            return;
        }
        // The child is the leader of its own group (process_group(0)), so
        // its pid is the group id. ESRCH (already gone) is fine.
        if let Ok(pgid) = i32::try_from(self.child.id()) {
            let _ = killpg(Pid::from_raw(pgid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
        self.reaped = true;
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `lines` lines of the file at `path` (or why it can't be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
    }

    #[test]
    fn drop_kills_the_whole_process_group() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("sh.log");
        // The shell forks a grandchild that would outlive a plain kill of
        // the shell; it prints its pid so the test can check on it.
        let process = ManagedProcess::spawn(
            "sh",
            Path::new("/bin/sh"),
            &["-c".into(), "sleep 300 & echo $!; wait".into()],
            &log,
        )
        .expect("spawns");
        let deadline = Instant::now() + Duration::from_secs(10);
        let grandchild: i32 = loop {
            if let Ok(pid) = fs::read_to_string(&log).unwrap_or_default().trim().parse() {
                break pid;
            }
            assert!(Instant::now() < deadline, "grandchild pid never logged");
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(alive(grandchild));
        drop(process);
        // Killed and, having been re-parented, reaped by init: poll briefly.
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(grandchild) && !is_zombie(grandchild) {
            assert!(
                Instant::now() < deadline,
                "grandchild {grandchild} survived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn is_zombie(pid: i32) -> bool {
        fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
    }

    #[test]
    fn exited_early_carries_the_log_tail() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("fail.log");
        let mut process = ManagedProcess::spawn(
            "failing",
            Path::new("/bin/sh"),
            &[
                "-c".into(),
                "echo first; echo 'bad flag --x' >&2; exit 3".into(),
            ],
            &log,
        )
        .expect("spawns");
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            if let Some(status) = process.exited() {
                break status;
            }
            assert!(Instant::now() < deadline, "never exited");
            std::thread::sleep(Duration::from_millis(20));
        };
        let message = process.exited_early(status).to_string();
        assert!(message.contains("failing exited"), "{message}");
        assert!(message.contains("bad flag --x"), "{message}");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("log");
        fs::write(&path, "1\n2\n3\n4\n").expect("writes");
        assert_eq!(tail(&path, 2), "3\n4");
        assert_eq!(tail(&path, 10), "1\n2\n3\n4");
    }
}
