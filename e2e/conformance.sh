#!/usr/bin/env bash
# Kubernetes' storage conformance suite against csi.twinvol.io, in full:
# every "External Storage" test of e2e.test (k8s.io/kubernetes at the pinned
# release) that applies to the driver's capabilities
# (e2e/tests/conformance/test-driver.yaml), on the two-site cluster bed with
# the chart installed. The test command runs a subset of it; this is the
# whole, whose result goes into docs/conformance.md.
#
#   e2e/conformance.sh            full run, 3 ginkgo processes
#   PROCS=1 e2e/conformance.sh    one process (slower, easier to read)
#   FOCUS=subset e2e/conformance.sh   the test command's subset
#
# Builds what is missing (Debian packages, the pinned upstream components,
# our release binaries), runs e2e/tests/storage_conformance.rs, and leaves
# the summary and ginkgo's JSON report in $TWINVOL_CACHE/conformance/.
# Needs root (the cluster bed: network namespaces, kubelets).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
cd "$top"
export TWINVOL_CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TWINVOL_CACHE/cargo-target}
export TWINVOL_UPSTREAM_BIN=${TWINVOL_UPSTREAM_BIN:-$TWINVOL_CACHE/upstream/bin}
export TWINVOL_BIN_DIR=${TWINVOL_BIN_DIR:-$CARGO_TARGET_DIR/release}
mode=${FOCUS:-full}
case $mode in full|subset) ;; *) echo "conformance: FOCUS is full or subset, not '$mode'" >&2; exit 2 ;; esac
export TWINVOL_CONFORMANCE=$mode
export TWINVOL_CONFORMANCE_PROCS=${PROCS:-$([ "$mode" = full ] && echo 3 || echo 1)}

bash "$here/tools/install-deps.sh"
bash "$here/tools/build-upstream.sh"
cargo build --release --bin twinvol-csi --bin twinvol-operator
t0=$(date +%s)
rc=0
exe=$(bash "$here/tools/test-exe.sh" e2e storage_conformance)
(cd "$here" && CARGO_MANIFEST_DIR=$PWD "$exe" --nocapture) || rc=$?
echo
echo "conformance ($mode, $TWINVOL_CONFORMANCE_PROCS processes): exit $rc after $(( $(date +%s) - t0 )) s"
echo "summary: $TWINVOL_CACHE/conformance/$mode.txt, report: $TWINVOL_CACHE/conformance/$mode.json"
[ -f "$TWINVOL_CACHE/conformance/$mode.txt" ] && head -n 30 "$TWINVOL_CACHE/conformance/$mode.txt"
exit "$rc"
