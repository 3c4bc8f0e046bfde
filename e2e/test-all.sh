#!/usr/bin/env bash
# Runs every test of twinvol on this machine, from a fresh clone.
#
# Stages: Debian packages the tests need, the pinned upstream Kubernetes
# components (built from their Go modules, cached outside the repo), format and
# lint checks, then every Rust test (unit, property, and the integration tests
# that start real processes: replicas, frontends, a real API server).
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
  local total=0 i
  for i in "${!stages[@]}"; do
    printf '%-28s %10s %14s\n' "${stages[$i]}" "${times[$i]}" "${peak[$i]}"
    case ${stages[$i]} in "  lane "*) continue ;; esac
    total=$(echo "$total + ${times[$i]}" | bc)
  done
  printf '%-28s %10s\n' total "$total"
}

mkdir -p "$TWINVOL_CACHE"
# `time` and `bc` are needed by this script itself.
if ! command -v bc >/dev/null || [ ! -x /usr/bin/time ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bc time >/dev/null
fi

run_stage "debian packages" bash "$here/tools/install-deps.sh"
run_stage "upstream components" bash "$here/tools/build-upstream.sh"
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
run_stage "cargo test (three lanes)" bash "$here/tools/test-lanes.sh"
for lane in engine others quiet; do
  if read -r _ secs <"$TWINVOL_CACHE/test-lanes/$lane.result"; then
    stages+=("  lane $lane"); times+=("$secs"); peak+=("-")
  fi
done
summary
