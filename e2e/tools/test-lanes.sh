#!/usr/bin/env bash
# Runs every test of the workspace in lanes at once. Most integration tests
# spend their time waiting (leases, timeouts, link cuts, the network, a
# cluster's kubelets), so several test executables at a time use a two-core
# machine better than one:
#   engine    the engine's tests, but its fault harness;
#   harness   the engine's randomized fault harness (engine/tests/fault_harness.rs)
#             in two shards at once, 15 faults each, seeds apart (the harness
#             is mostly link cuts and leases running out: 18 minutes alone
#             for 30 faults on a loaded machine);
#   platform  crds, csi-driver and operator (real API servers, node plugins
#             in network namespaces), then the doc tests;
#   bed       e2e: the control plane, the two-site cluster bed, the chart, the
#             site-loss scenarios, the storage conformance subset;
#   quiet     the one test `cargo test` ignores for its length:
#             e2e/tests/no_false_alarm.rs, ten minutes of a volume under fio
#             with no fault injected, which must see no fail-over while the
#             other lanes load the machine (TWINVOL_QUIET_MINUTES shortens it).
#
# The lanes run the test executables of `cargo test --workspace` (listed by
# `cargo test --workspace --no-run`, which builds nothing after the test
# command's `cargo build --workspace --all-targets`), each the way cargo runs
# it (in its package's directory, CARGO_MANIFEST_DIR set), one after another
# in its lane, going on past a failure (--no-fail-fast). Not `cargo test -p
# <package>` per lane: cargo resolves the dependencies' features for the
# packages selected, so a lane of one package compiles dozens of crates again
# with other features (measured on a cold machine: k8s-openapi and kube among
# 51 crates for the quiet lane, the workspace's crates for every lane).
#
# Output streams with a lane prefix and is kept in
# $TWINVOL_CACHE/test-lanes/<lane>.log; each lane's exit code and seconds go to
# <lane>.result for the caller's timing summary, and each test executable's
# seconds to <lane>.times. TWINVOL_FAULT_SEED=S gives the harness shards the
# seeds S and S + 0x9e3779b97f4a7c15 (as benches/fault-soak.sh does).
set -uo pipefail

top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
dir=${TWINVOL_CACHE:-/var/cache/twinvol}/test-lanes
mkdir -p "$dir"
rm -f "$dir"/*.log "$dir"/*.result "$dir"/*.times "$dir"/*.list "$dir"/no-run.err

# Every test executable of the workspace, one per line (e2e/tools/test-exe.sh).
if ! bash "$top/e2e/tools/test-exe.sh" --list >"$dir/all.list"; then
  echo "test-lanes: listing the test executables failed" >&2
  exit 1
fi
if [ ! -s "$dir/all.list" ]; then
  echo "test-lanes: no test executable listed" >&2
  exit 1
fi
lanes=(engine harness platform bed quiet)
awk -F'\t' -v top="$top" '$2 == top "/engine" && $3 != "test fault_harness"' "$dir/all.list" >"$dir/engine.list"
awk -F'\t' -v top="$top" '$3 == "test fault_harness"' "$dir/all.list" >"$dir/harness.list"
awk -F'\t' -v top="$top" '$2 != top "/engine" && $2 != top "/e2e"' "$dir/all.list" >"$dir/platform.list"
awk -F'\t' -v top="$top" '$2 == top "/e2e" && $3 != "test no_false_alarm"' "$dir/all.list" >"$dir/bed.list"
awk -F'\t' -v top="$top" '$3 == "test no_false_alarm"' "$dir/all.list" >"$dir/quiet.list"
# Every executable in exactly one lane.
listed=0
for name in "${lanes[@]}"; do listed=$((listed + $(wc -l <"$dir/$name.list"))); done
if [ "$listed" -ne "$(wc -l <"$dir/all.list")" ]; then
  echo "test-lanes: $listed executables in lanes, $(wc -l <"$dir/all.list") listed" >&2
  exit 1
fi
for name in harness quiet; do
  [ -s "$dir/$name.list" ] || { echo "test-lanes: no executable for lane $name" >&2; exit 1; }
done

# Runs the executables of list $1, each with the arguments after it.
run_list() {
  local list=$1; shift
  local rc=0 pkg mdir target exe t0 erc
  while IFS=$'\t' read -r pkg mdir target exe; do
    echo "     Running ${target} of ${pkg} (${exe})"
    t0=$(date +%s.%N)
    (cd "$mdir" && CARGO_MANIFEST_DIR="$mdir" "$exe" "$@") </dev/null
    erc=$?
    echo "$(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") $erc $pkg $target" >>"$dir/$lane.times"
    [ "$erc" -eq 0 ] || { rc=$erc; echo "error: test failed: ${target} of ${pkg} (exit $erc)"; }
  done <"$list"
  return "$rc"
}

lane() {
  local lane=$1; shift
  local t0 rc
  t0=$(date +%s.%N)
  "$@" 2>&1 | tee "$dir/$lane.log" | sed -u "s/^/[$lane] /"
  rc=${PIPESTATUS[0]}
  echo "$rc $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")" >"$dir/$lane.result"
}

platform() {
  local rc=0
  run_list "$dir/platform.list" || rc=$?
  echo "   Doc-tests of the workspace"
  cargo test --workspace --doc --no-fail-fast || rc=$?
  return "$rc"
}

# Two shards of the fault harness at once, each with its own seed (and its
# own sites and volume, as every harness process has).
harness() {
  local base shard pids=() rc=0 golden=11400714819323198485
  base=${TWINVOL_FAULT_SEED:-$(od -An -N8 -tu8 /dev/urandom | tr -d ' ')}
  for shard in 0 1; do
    (
      lane=harness.$shard
      export TWINVOL_FAULTS=15
      TWINVOL_FAULT_SEED=$(echo "($base + $shard * $golden) % 2^64" | bc)
      export TWINVOL_FAULT_SEED
      echo "fault harness shard $shard: $TWINVOL_FAULTS faults, TWINVOL_FAULT_SEED=$TWINVOL_FAULT_SEED"
      run_list "$dir/harness.list" 2>&1 | sed -u "s/^/[shard $shard] /"
      exit "${PIPESTATUS[0]}"
    ) &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  cat "$dir"/harness.?.times >"$dir/harness.times" 2>/dev/null
  return "$rc"
}

lane engine run_list "$dir/engine.list" &
lane harness harness &
lane platform platform &
lane bed run_list "$dir/bed.list" &
lane quiet run_list "$dir/quiet.list" --ignored --nocapture &
wait

rc=0
for name in "${lanes[@]}"; do
  read -r lrc secs <"$dir/$name.result" || { lrc=1; secs=?; }
  echo "lane $name: exit $lrc after ${secs} s (log: $dir/$name.log)"
  if [ -s "$dir/$name.times" ]; then
    sort -rn "$dir/$name.times" | head -n 5 | awk '{ printf "    %7.1f s  %s %s %s%s\n", $1, $3, $4, $5, ($2 == 0 ? "" : "  FAILED") }'
  fi
  if [ "$lrc" -ne 0 ]; then
    rc=$lrc
    grep -E '^(\[shard [0-9]\] )?(failures:|    [a-z_:]+$|error: )|panicked at' "$dir/$name.log" | sed "s/^/[$name] /"
  fi
done
exit "$rc"
