#!/usr/bin/env bash
# Runs every test of the workspace in lanes at once: the engine's tests in
# one, every other crate's in the other. Most integration tests spend their
# time waiting (leases, timeouts, the network, a cluster's kubelets), so two
# test binaries at a time use a two-core machine better than one. Each lane is
# a plain `cargo test --no-fail-fast`; together they are `cargo test
# --workspace`. A third lane, quiet, runs the one test `cargo test` ignores
# for its length: e2e/tests/no_false_alarm.rs, ten minutes of a volume under
# fio with no fault injected, which must see no fail-over while the other two
# lanes load the machine (TWINVOL_QUIET_MINUTES shortens it). Output streams with a lane prefix and is kept in
# $TWINVOL_CACHE/test-lanes/<lane>.log; each lane's exit code and seconds go to
# <lane>.result for the caller's timing summary.
set -uo pipefail

dir=${TWINVOL_CACHE:-/var/cache/twinvol}/test-lanes
mkdir -p "$dir"
rm -f "$dir"/*.log "$dir"/*.result

lane() {
  local name=$1; shift
  local t0 rc
  t0=$(date +%s.%N)
  cargo test --no-fail-fast "$@" 2>&1 | tee "$dir/$name.log" | sed -u "s/^/[$name] /"
  rc=${PIPESTATUS[0]}
  echo "$rc $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)")" >"$dir/$name.result"
}

lane engine -p twinvol-engine &
lane others --workspace --exclude twinvol-engine &
lane quiet -p twinvol-e2e --test no_false_alarm -- --ignored --nocapture &
wait

rc=0
for name in engine others quiet; do
  read -r lrc secs <"$dir/$name.result" || { lrc=1; secs=?; }
  echo "lane $name: exit $lrc after ${secs} s (log: $dir/$name.log)"
  if [ "$lrc" -ne 0 ]; then
    rc=$lrc
    grep -E '^(failures:|    [a-z_:]+$|error: )|panicked at' "$dir/$name.log" | sed "s/^/[$name] /"
  fi
done
exit "$rc"
