#!/usr/bin/env bash
# Soak (not part of the test command): the randomized fault harness
# (engine/tests/fault_harness.rs) with 500 faults instead of the test
# command's 30, of every kind — replica kill -9, site link cuts (short, and
# 30-60 s ones with a deep queue of 4 MiB writes: one per 40 faults), power
# loss of a replica, frontend kill -9 and SIGTERM with writes in flight, NBD
# client kill -9 with writes in flight, arbiter stalls at commit points,
# trims of 2 GiB and more, surviving replica kill -9 mid-resync — every
# acknowledged write checked after every fault, the two replica files
# compared whole whenever the arbiter has both in sync. Prints one line per
# fault and the summary (`faults survived N (per kind), writes checked M,
# writes lost 0, divergent comparisons 0 of C, seed S`).
#
# Debug build by default (overflow checks and debug assertions on; the run
# is dominated by lease expiries and replica timeouts, not CPU); PROFILE=release
# for a release build. A failure prints the seed: rerun with
# TWINVOL_FAULT_SEED=S to replay its choices and writes.
#
# Needs root (network namespaces), qemu-io, qemu-img, nbdcopy.
#
# Usage: benches/fault-soak.sh
#   env: TWINVOL_FAULTS (500), TWINVOL_FAULT_SEED (random), PROFILE (debug|release),
#        TWINVOL_FAULT_KINDS (e.g. link-cut,frontend-kill; default all kinds),
#        TWINVOL_FAULT_LONG_CUTS (default one per 40 faults),
#        TWINVOL_FAULT_MINUTES (stop injecting after that long; default none),
#        TWINVOL_FAULT_HELD_IO=0 (pause the writer while the only in-sync
#        replica is away), TWINVOL_FAULT_KEEP=1 (keep the run's directory and logs),
#        SOAK_LOG (full output; default /var/tmp/twinvol-fault-soak-SEED.log)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" -eq 0 ] || { echo "fault-soak: run as root (network namespaces)" >&2; exit 2; }
for tool in qemu-io qemu-img nbdcopy; do
  command -v "$tool" >/dev/null || { echo "fault-soak: $tool missing (bash e2e/tools/install-deps.sh)" >&2; exit 2; }
done

export TWINVOL_FAULTS=${TWINVOL_FAULTS:-500}
export TWINVOL_FAULT_SEED=${TWINVOL_FAULT_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
PROFILE=${PROFILE:-debug}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${TWINVOL_CACHE:-/var/cache/twinvol}/cargo-target}
log=${SOAK_LOG:-/var/tmp/twinvol-fault-soak-$TWINVOL_FAULT_SEED.log}
case "$PROFILE" in
  debug) profile_flag=() ;;
  release) profile_flag=(--release) ;;
  *) echo "fault-soak: PROFILE is debug or release" >&2; exit 2 ;;
esac

echo "fault soak: $TWINVOL_FAULTS faults, seed $TWINVOL_FAULT_SEED, $PROFILE build, $(nproc) CPUs; full output: $log"
(cd "$top" && cargo test -q --no-run "${profile_flag[@]}" -p twinvol-engine --test fault_harness)
t0=$(date +%s)
set +e
(cd "$top" && cargo test -q "${profile_flag[@]}" -p twinvol-engine --test fault_harness -- --nocapture) 2>&1 \
  | tee "$log" \
  | grep --line-buffered -E '^(\[ *[0-9.]+s\] |note: |fault harness: |faults survived |writes acknowledged )'
rc=${PIPESTATUS[0]}
set -e
secs=$(( $(date +%s) - t0 ))
if [ "$rc" -ne 0 ]; then
  echo
  grep -A30 -m1 'panicked at' "$log" | grep -v '^stack backtrace' || true
  echo "fault soak FAILED after ${secs} s (seed $TWINVOL_FAULT_SEED, $PROFILE build); full output: $log"
  exit "$rc"
fi
echo "fault soak passed in ${secs} s ($PROFILE build): $(grep -m1 '^faults survived' "$log")"
