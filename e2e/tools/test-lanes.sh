#!/usr/bin/env bash
# Runs every test of the workspace in two lanes at once: the engine's tests in
# one, every other crate's in the other. Most integration tests spend their
# time waiting (leases, timeouts, the network, a cluster's kubelets), so two
# test binaries at a time use a two-core machine better than one. Each lane is
# a plain `cargo test --no-fail-fast`; together they are `cargo test
# --workspace`. Output streams with a lane prefix and is kept in
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
wait

rc=0
for name in engine others; do
  read -r lrc secs <"$dir/$name.result" || { lrc=1; secs=?; }
  echo "lane $name: exit $lrc after ${secs} s (log: $dir/$name.log)"
  if [ "$lrc" -ne 0 ]; then
    rc=$lrc
    grep -E '^(failures:|    [a-z_:]+$|error: )|panicked at' "$dir/$name.log" | sed "s/^/[$name] /"
  fi
done
exit "$rc"
