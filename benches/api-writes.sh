#!/usr/bin/env bash
# Benchmark (not a test): API writes per second in steady state, issue 11.
#
# A real API server (the e2e harness), the controller plugin and two node
# plugins as processes in network namespaces, with their production
# heartbeat settings; VOLUMES volumes (8 MiB each, raw block) created,
# published and staged alternately on the two nodes, no faults. After they
# settle (10 s), the API server's apiserver_request_total is read twice,
# SECONDS apart: every verb but GET, LIST and WATCH counts as a write. It
# prints the per-resource breakdown, the total (target: <= 2/s) and the
# resident memory of the frontends, replica servers and heartbeat renewers.
#
# It drives csi-driver/tests/api_writes.rs (which the test command runs
# small: 4 volumes, 20 s, asserting the same bound).
#
# knobs: VOLUMES (100), SECONDS (60), OUT (JSON report; default
#        /var/tmp/twinvol-api-writes.json). Needs root (netns, FUSE, loop)
#        and the upstream binaries (TWINVOL_UPSTREAM_BIN, from
#        e2e/tools/build-upstream.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
VOLUMES=${VOLUMES:-100}
SECONDS_=${SECONDS:-60}
OUT=${OUT:-/var/tmp/twinvol-api-writes.json}
echo "api-writes: $VOLUMES volumes, ${SECONDS_} s of steady state; $(nproc) CPUs, $(free -g | awk '/Mem:/{print $2}') GiB, kernel $(uname -r)"
TWINVOL_BENCH_VOLUMES=$VOLUMES TWINVOL_BENCH_SECONDS=$SECONDS_ TWINVOL_BENCH_OUT=$OUT \
  cargo test -p twinvol-csi-driver --test api_writes -- --nocapture 2>&1 |
  grep -v -E '^[IWE][0-9]{4} ' || true
if [[ -f $OUT ]]; then
  echo "report: $OUT"
  cat "$OUT"
else
  echo "no report written (the run failed before counting)" >&2
  exit 1
fi
