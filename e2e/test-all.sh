#!/usr/bin/env bash
# Runs every test of twinvol on this machine, from a fresh clone.
#
# Stages: Debian packages the tests need, the pinned upstream Kubernetes
# components (built from their Go modules, cached outside the repo) beside the
# format and lint checks and the Rust builds (they share nothing; each leaves
# cores idle while it links or waits for downloads), then every Rust test
# (unit, property, and the integration tests that start real processes:
# replicas, frontends, a real API server, the cluster bed).
# Ends with a timing summary. Needs root (namespaces, FUSE, loop devices).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cd "$top"

export TWINVOL_CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
# The Rust build cache lives outside the clone too, so that a second run on the
# same machine (a fresh clone in CI) does not rebuild every dependency.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TWINVOL_CACHE/cargo-target}
export TWINVOL_UPSTREAM_BIN=${TWINVOL_UPSTREAM_BIN:-$TWINVOL_CACHE/upstream/bin}

stages=()
times=()
peak=()
run_stage() {
  local name=$1; shift
  echo "=== stage: $name"
  bg_progress
  local t0 rc=0
  t0=$(date +%s.%N)
  /usr/bin/time -f '%M' -o "$TWINVOL_CACHE/.stage-rss" "$@" || rc=$?
  local t1
  t1=$(date +%s.%N)
  stages+=("$name")
  times+=("$(printf '%.1f' "$(echo "$t1 - $t0" | bc)")")
  peak+=("$(( $(tail -n1 "$TWINVOL_CACHE/.stage-rss" 2>/dev/null | grep -E "^[0-9]+$" || echo 0) / 1024 ))")
  if [ "$rc" -ne 0 ]; then
    summary
    echo "FAILED at stage: $name (exit $rc)"
    exit "$rc"
  fi
}
summary() {
  echo
  echo "=== timing summary"
  printf '%-28s %10s %14s\n' stage seconds "peak RSS MiB"
  local i
  for i in "${!stages[@]}"; do
    printf '%-28s %10s %14s\n' "${stages[$i]}" "${times[$i]}" "${peak[$i]}"
  done
  printf '%-28s %10s\n' "total (wall clock)" "$(printf '%.1f' "$(echo "$(date +%s.%N) - $started" | bc)")"
  echo "(the upstream components are built beside the stages after them up to the"
  echo " Rust builds; the lanes run at once: neither adds up)"
}
started=$(date +%s.%N)

# A stage in the background: its output goes to a log (printed, prefixed,
# when it ends), its exit code and seconds to $TWINVOL_CACHE/.bg-result.
bg_pid=
bg_name=
bg_log=
bg_start() {
  local name=$1; shift
  bg_log=$TWINVOL_CACHE/${name// /-}.log
  echo "=== stage (in the background): $name, log $bg_log"
  rm -f "$TWINVOL_CACHE/.bg-result"
  # In a process group of its own, so that a failure elsewhere stops all of it.
  setsid -w bash -c 't0=$(date +%s.%N); rc=0
    /usr/bin/time -f "%M" -o "$0/.bg-rss" "${@:2}" >"$1" 2>&1 || rc=$?
    echo "$rc $(printf "%.1f" "$(echo "$(date +%s.%N) - $t0" | bc)")" >"$0/.bg-result"' \
    "$TWINVOL_CACHE" "$bg_log" "$@" &
  bg_pid=$!
  bg_name=$name
}
bg_progress() {
  [ -n "$bg_pid" ] || return 0
  echo "    ($bg_name, in the background: $(grep -E '^\[build-upstream\] [a-z]' "$bg_log" 2>/dev/null | tail -n1))"
}
bg_wait() {
  local name=$1 rc secs
  echo "=== waiting for the background stage: $name"
  wait "$bg_pid" || true
  bg_pid=
  sed "s/^/[$name] /" "$bg_log"
  read -r rc secs <"$TWINVOL_CACHE/.bg-result" || { rc=1; secs=0; }
  stages+=("$name")
  times+=("$secs")
  peak+=("$(( $(tail -n1 "$TWINVOL_CACHE/.bg-rss" 2>/dev/null | grep -E "^[0-9]+$" || echo 0) / 1024 ))")
  if [ "$rc" -ne 0 ]; then
    summary
    echo "FAILED at stage: $name (exit $rc)"
    exit "$rc"
  fi
}
# A failed foreground stage exits: stop the background one with it.
trap '[ -n "$bg_pid" ] && kill -- -"$bg_pid" 2>/dev/null; true' EXIT

mkdir -p "$TWINVOL_CACHE"
# `time` and `bc` are needed by this script itself.
if ! command -v bc >/dev/null || [ ! -x /usr/bin/time ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc time >/dev/null
fi

run_stage "debian packages" bash "$here/tools/install-deps.sh"
bg_start "upstream components" bash "$here/tools/build-upstream.sh"
run_stage "cargo fmt --check" cargo fmt --all -- --check
run_stage "cargo clippy" cargo clippy --workspace --all-targets -- -D warnings
# Test targets build the engine with its fault hooks (the `failpoints`
# feature, through its dev-dependency on itself); the code as released, without
# them, is checked here.
run_stage "cargo clippy (release code)" cargo clippy --workspace -- -D warnings
run_stage "cargo build" cargo build --workspace --all-targets
# The release binaries that go into the cluster bed's images (chart and
# site-loss tests read them from TWINVOL_BIN_DIR instead of building them
# inside a test, so that this cost shows as its own stage).
run_stage "cargo build --release" cargo build --release --bin twinvol-csi --bin twinvol-operator --bin twinvol-engine
export TWINVOL_BIN_DIR=${TWINVOL_BIN_DIR:-$CARGO_TARGET_DIR/release}
bg_wait "upstream components"
run_stage "cargo test (five lanes)" bash "$here/tools/test-lanes.sh"
for lane in engine harness platform bed quiet; do
  if read -r _ secs <"$TWINVOL_CACHE/test-lanes/$lane.result"; then
    stages+=("  lane $lane"); times+=("$secs"); peak+=("-")
  fi
done
summary
