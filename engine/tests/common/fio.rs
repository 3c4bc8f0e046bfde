//! fio with its nbd engine against an export: random writes, every block
//! verified (crc32c) after it is written, the run failing on the first
//! mismatch — a client nobody here wrote checking that what it wrote is
//! what it reads back. The report is fio's terse format (version 3), one
//! `;`-separated line per job, read with [`terse_jobs`] and [`terse_error`].

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use super::wait_until;

/// A fio command: job `name` writing at random over the NBD export at
/// `uri` from random seed `seed`, verifying every block, reporting in the
/// terse format. `shape` sets the job's own depth, block sizes, size and
/// rate (`--iodepth=16`, `--bs=64k`, …). It runs in `dir`: fio may leave
/// state files in its working directory.
pub fn verified_random_writes(
    dir: &Path,
    uri: &str,
    name: &str,
    seed: u64,
    shape: &[&str],
) -> Command {
    let mut fio = Command::new("fio");
    fio.current_dir(dir)
        .arg(format!("--name={name}"))
        .arg("--ioengine=nbd")
        .arg(format!("--uri={uri}"))
        .arg("--rw=randwrite")
        .args(shape)
        .args([
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_dump=0",
            "--verify_state_save=0",
        ])
        .arg(format!("--randseed={seed}"))
        .arg("--output-format=terse");
    fio
}

/// The job lines of a terse report, one per job.
pub fn terse_jobs(report: &str) -> Vec<&str> {
    report.lines().filter(|l| l.starts_with("3;")).collect()
}

/// A terse job line's error code (field 5): `Some("0")` when the job saw
/// neither an I/O error nor a verification failure.
pub fn terse_error(job: &str) -> Option<&str> {
    job.split(';').nth(4)
}

/// fio running in the background while a test breaks something under it;
/// killed if dropped before it finished.
pub struct Background(Child);

impl Background {
    /// Starts `fio` (from [`verified_random_writes`]) with its report piped.
    pub fn spawn(mut fio: Command) -> Self {
        let child = fio
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fio");
        Self(child)
    }

    /// Whether fio has ended.
    pub fn is_done(&mut self) -> bool {
        !matches!(self.0.try_wait(), Ok(None))
    }

    /// Waits up to `deadline` for fio to end: its exit status and report,
    /// or `None` if it did not end in time (it is killed then).
    pub fn finish(mut self, deadline: Duration) -> Option<(ExitStatus, String)> {
        let status = wait_until(deadline, || self.0.try_wait().ok().flatten());
        let Some(status) = status else {
            let _ = self.0.kill();
            let _ = self.0.wait();
            return None;
        };
        let mut report = String::new();
        if let Some(mut o) = self.0.stdout.take() {
            let _ = o.read_to_string(&mut report);
        }
        Some((status, report))
    }

    /// Waits up to `deadline` for fio to end, and checks that it passed:
    /// exited successfully, its (first) job reporting neither an I/O error
    /// nor a verification failure. `Err` says what went wrong, with the
    /// report.
    pub fn finish_clean(self, deadline: Duration) -> Result<(), String> {
        let Some((status, report)) = self.finish(deadline) else {
            return Err(format!("fio did not finish within {deadline:?}"));
        };
        let job = terse_jobs(&report).first().copied().unwrap_or("");
        if status.success() && terse_error(job) == Some("0") {
            Ok(())
        } else {
            Err(format!(
                "fio failed ({status}; verification or I/O error):\n{report}"
            ))
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
