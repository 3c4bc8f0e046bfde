//! Running a system tool with its output captured, as a [`CsiError`] that
//! quotes the command line and its stderr when it fails.

use std::time::Duration;

use tokio::process::Command;

use crate::error::{CsiError, CsiResult};

/// No system tool the node plugin runs should take longer (mkfs of a large
/// volume over the network is the slowest).
const TIMEOUT: Duration = Duration::from_secs(300);

/// What a command printed and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

fn command_line(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `program args`, whatever its exit code.
pub async fn run_any(program: &str, args: &[&str]) -> CsiResult<Finished> {
    let line = command_line(program, args);
    tracing::debug!(command = %line, "running");
    let child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(TIMEOUT, child)
        .await
        .map_err(|_| CsiError::Timeout {
            what: line.clone(),
            waited: TIMEOUT,
            last: "still running".into(),
        })?
        .map_err(|e| CsiError::Command {
            command: line.clone(),
            status: "could not start".into(),
            stderr: e.to_string(),
        })?;
    Ok(Finished {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `program args` and returns its stdout; a non-zero exit is an error.
pub async fn run(program: &str, args: &[&str]) -> CsiResult<String> {
    let done = run_any(program, args).await?;
    if done.success() {
        Ok(done.stdout)
    } else {
        Err(CsiError::Command {
            command: command_line(program, args),
            status: done
                .code
                .map_or_else(|| "killed by a signal".to_owned(), |c| format!("exit {c}")),
            stderr: done.stderr.trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_failing_command_says_what_it_printed() {
        let err = run("sh", &["-c", "echo nope >&2; exit 3"])
            .await
            .expect_err("fails");
        let message = err.to_string();
        assert!(message.contains("sh -c"), "{message}");
        assert!(message.contains("exit 3"), "{message}");
        assert!(message.contains("nope"), "{message}");
        assert_eq!(run("echo", &["hi"]).await.expect("runs"), "hi\n");
    }
}
