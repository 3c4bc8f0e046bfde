//! An arbiter update whose answer is lost, with real processes: the
//! frontend runs with `--arbiter-stall return-to-in-sync#1=8s`, so the file
//! arbiter commits the first return of a replica to the in-sync set and
//! answers only after the frontend's deadline (3 s) passed. While that
//! answer is outstanding the returning replica dies, and a write follows.
//!
//! Whatever the frontend concludes, no write may be acknowledged on one
//! replica while the arbiter's record lists both in sync (design
//! invariant 2): the record is the truth a successor frontend trusts.
//!
//! Needs qemu-io.

mod common;

use std::time::Duration;

use common::{MIB, Stack, StackOptions, qemu_io, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
const SLOT: u64 = 64 * 1024;

fn frontend_log(stack: &Stack) -> String {
    let mut out = String::new();
    for i in 1..=4 {
        if let Ok(s) = std::fs::read_to_string(stack.dir().join(format!("frontend-{i}.log"))) {
            out.push_str(&s);
        }
    }
    out
}

/// Writes one 64 KiB slot with `byte` (and flushes); asserts it was
/// acknowledged.
fn write_slot(stack: &Stack, slot: u64, byte: u8) {
    let out = qemu_io::command(
        &stack.nbd_uri(),
        &[
            format!("write -P {byte} {} {SLOT}", slot * SLOT),
            "flush".to_owned(),
        ],
    )
    .output()
    .expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("wrote ") && !stdout.contains("failed"),
        "write of slot {slot} failed: {stdout}\n{}",
        stack.log_tails(30)
    );
}

fn holds(path: &std::path::Path, slot: u64, byte: u8) -> bool {
    let data = std::fs::read(path).expect("data file");
    let at = (slot * SLOT) as usize;
    data[at..at + SLOT as usize].iter().all(|&b| b == byte)
}

#[test]
fn a_return_that_landed_while_its_caller_timed_out_never_lets_one_replica_ack_alone() {
    let mut stack = Stack::start(StackOptions {
        size: 32 * MIB,
        arbiter: true,
        frontend: false,
        ..StackOptions::default()
    });
    stack.start_frontend_with(&["--arbiter-stall", "return-to-in-sync#1=8s"]);
    write_slot(&stack, 0, 0x11);
    // Replica a leaves (killed; a write makes the frontend notice).
    stack.kill_replica(0);
    write_slot(&stack, 1, 0x22);
    let out = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("out_of_sync: a\n")
            .then_some(())
    });
    assert!(out.is_some(), "a never left:\n{}", stack.log_tails(30));
    // It returns, catches up, and the frontend returns it to the in-sync
    // set: the swap lands, its answer stalls.
    stack.start_replica(0);
    let stalled = wait_until(DEADLINE, || {
        frontend_log(&stack)
            .contains("arbiter commit stalled")
            .then_some(())
    });
    assert!(
        stalled.is_some(),
        "the return never reached the arbiter:\n{}",
        stack.log_tails(30)
    );
    assert!(stack.arbiter_show().contains("in_sync: a,b\n"));
    // The arbiter becomes unreachable too (as an API server that did not
    // answer in time often stays so for a while): its record moves away.
    let record = stack.arbiter_path();
    let away = record.with_extension("away");
    std::fs::rename(&record, &away).expect("move the record away");
    // Replica a dies while the frontend does not know the outcome, and a
    // write comes.
    stack.kill_replica(0);
    let mut w = qemu_io::spawn(
        &stack.nbd_uri(),
        &[
            format!("write -P 51 {} {SLOT}", 2 * SLOT),
            "flush".to_owned(),
        ],
    );
    let a = stack.replica_data_paths()[0].clone();
    let show = |path: &std::path::Path| {
        let out = std::process::Command::new(common::engine_bin())
            .args(["arbiter", "show", "--path"])
            .arg(path)
            .output()
            .expect("arbiter show");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let check = |when: &str, record: &std::path::Path| {
        let show = show(record);
        let both = show.contains("in_sync: a,b\n");
        let on_a = holds(&a, 2, 51);
        eprintln!("{when}: arbiter lists a,b in sync: {both}; the write is on a: {on_a}");
        assert!(
            !both || on_a,
            "a write was acknowledged on b alone while the arbiter lists a and b in sync:\n{show}\n{}",
            stack.log_tails(40)
        );
    };
    // For 6 s the arbiter is away: a write acknowledged meanwhile was
    // acknowledged without a compare-and-swap.
    let during = wait_until(Duration::from_secs(6), || w.try_wait().ok().flatten());
    if during.is_some() {
        check("acknowledged while the arbiter was unreachable", &away);
    } else {
        eprintln!("the write is held while the arbiter is unreachable");
    }
    std::fs::rename(&away, &record).expect("move the record back");
    let out = w.wait_with_output().expect("qemu-io");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("wrote "), "the write failed: {stdout}");
    check("acknowledged", &record);
    let answered = wait_until(DEADLINE, || {
        frontend_log(&stack)
            .contains("stalled arbiter commit answered")
            .then_some(())
    });
    assert!(answered.is_some(), "{}", stack.log_tails(30));
    check("after the stalled answer", &record);
    // a returns for good: it rejoins with everything.
    stack.start_replica(0);
    let rejoined = wait_until(DEADLINE, || {
        stack
            .arbiter_show()
            .contains("in_sync: a,b\n")
            .then_some(())
    });
    assert!(rejoined.is_some(), "{}", stack.log_tails(30));
    write_slot(&stack, 3, 0x44);
    for (slot, byte) in [(0, 0x11), (1, 0x22), (2, 0x33), (3, 0x44)] {
        assert!(holds(&a, slot, byte), "a lacks slot {slot}");
    }
    let same = std::process::Command::new("cmp")
        .arg("-s")
        .args(stack.replica_data_paths())
        .status()
        .expect("cmp");
    assert!(same.success(), "replicas differ");
}
