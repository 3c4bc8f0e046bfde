//! The process-level harness itself, end to end: a stack with every export
//! (NBD unix and TCP, FUSE file) and metrics; writes through one export are
//! read back through another, land byte for byte in both replicas' data
//! files, and show in the frontend's metrics; dropping the stack leaves no
//! process and no mount behind. Needs root (FUSE).

mod common;

use std::os::unix::fs::FileExt;
use std::time::Duration;

use common::{MIB, Stack, StackOptions, metrics, output_text, qemu_io, run_with_deadline};

fn is_mounted(dir: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(&*dir.display().to_string()))
}

#[test]
fn every_export_reaches_both_replicas_and_drop_leaves_nothing_behind() {
    let stack = Stack::start(StackOptions {
        size: 8 * MIB,
        fuse: true,
        nbd_tcp: true,
        metrics: true,
        ..StackOptions::default()
    });
    let mut image = vec![0u8; 8 * MIB as usize];

    // Write through the FUSE file (direct, like a loop device would).
    let fuse_file = stack.fuse_file().expect("fuse file");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fuse_file)
        .expect("open fuse file");
    assert_eq!(f.metadata().expect("stat").len(), 8 * MIB);
    let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
    f.write_all_at(&chunk, MIB).expect("write via fuse");
    f.sync_all().expect("fsync via fuse");
    image[MIB as usize..MIB as usize + chunk.len()].copy_from_slice(&chunk);
    drop(f);

    // Read it back and write more over NBD TCP.
    let tcp = stack.nbd_tcp_addr().expect("nbd tcp");
    let (host, port) = tcp.rsplit_once(':').expect("host:port");
    let uri = format!("nbd://{host}:{port}");
    let out = run_with_deadline(
        qemu_io::command(
            &uri,
            &["read -P 0x00 0 1M", "write -P 0xc3 3M 128k", "flush"],
        ),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over TCP: {}",
        output_text(&out)
    );
    image[3 * MIB as usize..3 * MIB as usize + 128 * 1024].fill(0xc3);

    // And over the unix socket, check what FUSE wrote.
    let out = run_with_deadline(
        qemu_io::command(&stack.nbd_uri(), &["read -P 0xc3 3M 128k"]),
        Duration::from_secs(60),
    );
    assert!(
        out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
        "qemu-io over unix: {}",
        String::from_utf8_lossy(&out.stdout)
    );

    for path in stack.replica_data_paths() {
        let data = std::fs::read(&path).expect("read replica data");
        assert!(
            data == image,
            "{} differs from the expected image",
            path.display()
        );
    }

    let metrics = metrics::scrape(&stack.frontend_metrics_addr().expect("metrics addr"));
    for replica in ["a", "b"] {
        let line = format!(
            "twinvol_frontend_io_latency_seconds_count{{volume=\"v1\",replica=\"{replica}\",op=\"Write\"}}"
        );
        assert!(metrics.contains(&line), "missing {line} in:\n{metrics}");
    }
    assert!(metrics.contains(
        "twinvol_frontend_replica_state{volume=\"v1\",replica=\"a\",state=\"in_sync\"} 1"
    ));

    let pids: Vec<i32> = stack
        .replicas
        .iter()
        .filter_map(|r| r.proc.as_ref().map(|p| p.pid()))
        .chain(stack.frontend.as_ref().map(|p| p.pid()))
        .collect();
    let fuse_dir = stack.fuse_dir();
    let root = stack.dir().to_owned();
    drop(stack);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} survived the stack"
        );
    }
    assert!(!is_mounted(&fuse_dir), "FUSE mount survived the stack");
    assert!(!root.exists(), "stack directory survived");
}
