//! Running the host tools the cluster is made with (`ip`, `nft`, `ctr`,
//! `losetup`, `ping`): one place that turns a non-zero exit into an error
//! carrying the command line and its stderr.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
};

use crate::HarnessError;

/// The command line as a user would type it, for error messages.
fn display(program: &str, args: &[&str]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(arg);
    }
    line
}

/// Runs `program args…` and returns its output, whatever the exit status.
pub fn output(program: &str, args: &[&str]) -> Result<Output, HarnessError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| HarnessError::Spawn {
            component: display(program, args),
            path: Path::new(program).to_owned(),
            source,
        })
}

/// Runs `program args…`; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String, HarnessError> {
    let out = output(program, args)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::CommandFailed {
            command: display(program, args),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Runs `program args…` in the network namespace `netns` only (the mount
/// namespace stays the host's: `ip netns exec` would make mounts private).
pub fn run_in(netns: &str, program: &str, args: &[&str]) -> Result<String, HarnessError> {
    let net = format!("--net=/run/netns/{netns}");
    let mut full = vec![net.as_str(), "--", program];
    full.extend_from_slice(args);
    run("nsenter", &full)
}

/// Like [`run_in`], feeding `input` on stdin (for `nft -f -`).
pub fn run_in_with_stdin(
    netns: &str,
    program: &str,
    args: &[&str],
    input: &str,
) -> Result<String, HarnessError> {
    use std::io::Write;
    let net = format!("--net=/run/netns/{netns}");
    let mut full = vec![net.as_str(), "--", program];
    full.extend_from_slice(args);
    let line = display("nsenter", &full);
    let spawn_error = |source| HarnessError::Spawn {
        component: line.clone(),
        path: Path::new("nsenter").to_owned(),
        source,
    };
    let mut child = Command::new("nsenter")
        .args(&full)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(input.as_bytes()).map_err(spawn_error)?;
    }
    let out = child.wait_with_output().map_err(spawn_error)?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(HarnessError::CommandFailed {
            command: line,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// Whether one ping from `netns` to `addr` is answered within `wait_secs`.
pub fn ping_from(netns: &str, addr: &str, wait_secs: u32) -> bool {
    let wait = wait_secs.to_string();
    run_in(netns, "ping", &["-c", "1", "-W", &wait, "-q", addr]).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_command_reports_its_stderr() {
        let err = run("sh", &["-c", "echo nope >&2; exit 4"]).expect_err("fails");
        let message = err.to_string();
        assert!(message.contains("sh -c"), "{message}");
        assert!(message.contains("nope"), "{message}");
    }

    #[test]
    fn stdout_of_a_successful_command() {
        assert_eq!(run("echo", &["hi"]).expect("runs"), "hi\n");
    }
}
