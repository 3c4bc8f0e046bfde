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
#        SHARDS (1: that many harness processes at once, the faults split
#        between them, seeds SEED, SEED+1, ...; the summaries added up),
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

SHARDS=${SHARDS:-1}
[[ "$SHARDS" =~ ^[1-9][0-9]*$ ]] || { echo "fault-soak: SHARDS is a positive number" >&2; exit 2; }
total=$TWINVOL_FAULTS
per_shard=$(( (total + SHARDS - 1) / SHARDS ))
echo "fault soak: $total faults in $SHARDS shard(s) of $per_shard, seed $TWINVOL_FAULT_SEED (shard i: seed + i × 0x9e3779b97f4a7c15), $PROFILE build, $(nproc) CPUs; full output: $log"
(cd "$top" && cargo test -q --no-run "${profile_flag[@]}" -p twinvol-engine --test fault_harness)
t0=$(date +%s)

# One harness process per shard, each with its own seed, sites and volume;
# they run at once (the run is mostly waiting on leases and timeouts, so
# shards cost little more wall time than one).
# Far apart: the harness's generator ignores a seed's lowest bit.
shard_seed() { python3 -c "print(($TWINVOL_FAULT_SEED + $1 * 0x9e3779b97f4a7c15) % 2**64)"; }
shard_log() { if [ "$SHARDS" -eq 1 ]; then echo "$log"; else echo "${log%.log}.shard$1.log"; fi; }
run_shard() {
  local i=$1 slog rc
  slog=$(shard_log "$i")
  set +e
  (cd "$top" && TWINVOL_FAULTS=$per_shard TWINVOL_FAULT_SEED=$(shard_seed "$i") \
    cargo test -q "${profile_flag[@]}" -p twinvol-engine --test fault_harness -- --nocapture) 2>&1 \
    | tee "$slog" \
    | grep --line-buffered -E '^(\[ *[0-9.]+s\] |note: |fault harness: |faults survived |writes acknowledged )' \
    | if [ "$SHARDS" -eq 1 ]; then cat; else sed -u "s/^/[shard $i] /"; fi
  rc=${PIPESTATUS[0]}
  echo "$rc" >"$slog.rc"
}
for (( i = 0; i < SHARDS; i++ )); do run_shard "$i" & done
wait
secs=$(( $(date +%s) - t0 ))
rc=0
for (( i = 0; i < SHARDS; i++ )); do
  slog=$(shard_log "$i")
  src=$(cat "$slog.rc" 2>/dev/null || echo 1)
  rm -f "$slog.rc"
  if [ "$src" -ne 0 ]; then
    rc=$src
    echo
    grep -A30 -m1 'panicked at' "$slog" | grep -v '^stack backtrace' || true
    echo "fault soak shard $i FAILED (seed $(shard_seed "$i"), $PROFILE build); full output: $slog"
  fi
done
[ "$rc" -eq 0 ] || { echo "fault soak FAILED after ${secs} s"; exit "$rc"; }
if [ "$SHARDS" -eq 1 ]; then
  echo "fault soak passed in ${secs} s ($PROFILE build): $(grep -m1 '^faults survived' "$log")"
  exit 0
fi
# The shards' summaries added up (per kind too).
for (( i = 0; i < SHARDS; i++ )); do grep -m1 '^faults survived' "$(shard_log "$i")"; done | python3 -c '
import re, sys
kinds, tot = {}, [0, 0, 0, 0, 0]
for line in sys.stdin:
    m = re.match(r"faults survived (\d+) \((.*)\), writes checked (\d+), writes lost (\d+), divergent comparisons (\d+) of (\d+)", line)
    if not m:
        sys.exit("unparsed summary: " + line)
    for part in filter(None, m.group(2).split(", ")):
        k, n = part.rsplit(" ", 1)
        kinds[k] = kinds.get(k, 0) + int(n)
    for j, g in enumerate((1, 3, 4, 5, 6)):
        tot[j] += int(m.group(g))
    print("  " + line.strip())
print("faults survived %d (%s), writes checked %d, writes lost %d, divergent comparisons %d of %d" % (
    tot[0], ", ".join("%s %d" % kv for kv in sorted(kinds.items())), tot[1], tot[2], tot[3], tot[4]))
' | sed "1i fault soak passed in ${secs} s ($PROFILE build, $SHARDS shards):"
