//! qemu-io against an NBD export: one process running a list of its
//! commands (`write -P 0x5a 0 4096`, `read -P …`, `flush`, `aio_write …`)
//! on a raw image at a URI (`nbd+unix:///?socket=…`, `nbd://host:port/`).
//! qemu-io prints `wrote …`/`read …` for each command that completed and
//! reports failures (I/O errors, `Pattern verification failed`) on stdout,
//! so tests read its output as well as its exit status.

use std::process::{Child, Command, Stdio};

/// `qemu-io -f raw URI -c CMD…`, not started.
pub fn command<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Command {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw", uri]);
    for cmd in cmds {
        c.args(["-c", cmd.as_ref()]);
    }
    c
}

/// Starts [`command`] in the background with stdout and stderr piped, for
/// a test that checks whether its writes are held.
pub fn spawn<S: AsRef<str>>(uri: &str, cmds: &[S]) -> Child {
    command(uri, cmds)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start qemu-io")
}
