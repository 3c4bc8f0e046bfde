#!/usr/bin/env bash
# Benchmark (not a test): issue 13's site power cut on the cluster bed,
# RUNS times (default 10), and issue 11's "PVC created to pod Running".
#
# Each run is one run of the scenario test e2e/tests/site_loss.rs (a fresh
# cluster bed, the chart installed, a StatefulSet writing checksummed
# records on site A, site A powered off, the pod Ready on site B, site A
# powered on, resync, the pod home). The test prints its figures on lines
# starting with "STEP"; this script collects them from every run and prints
# the median and the worst (p99 of 10 is the worst) of:
#   - claim Bound / pod Running / pod Ready after the StatefulSet applied;
#   - power cut -> pod Ready on site B, by the site the operator's leader
#     ran on (a leader on the lost site adds its leader Lease to the wait)
#     and by the site the external-attacher's leader ran on (taken over by
#     the operator when its site is lost);
#   - the resync after the return: MiB dirty when its first attempt began
#     copying, MiB copied over its attempts and their ratio (the writer goes
#     on meanwhile: a region it writes while its copy runs is copied again),
#     regions recopied, attempts;
#   - acknowledged records and records missing (must be 0 in every run).
# Output: a table on stdout; each run's log in $OUT (default
# /tmp/twinvol-site-loss-bench).
#
# Needs root, jq, and what e2e/tests/site_loss.rs needs
# (the upstream binaries, release builds of twinvol-csi/twinvol-operator:
# TWINVOL_BIN_DIR or $CARGO_TARGET_DIR/release); builds the workspace's tests.
set -euo pipefail

RUNS=${RUNS:-10}
OUT=${OUT:-/tmp/twinvol-site-loss-bench}
cd "$(dirname "$0")/.."
mkdir -p "$OUT"

# The test executable of the workspace build (e2e/tools/test-exe.sh).
exe=$(bash e2e/tools/test-exe.sh e2e site_loss)

for i in $(seq 1 "$RUNS"); do
	log="$OUT/run-$i.log"
	if ! (cd e2e && CARGO_MANIFEST_DIR=$PWD "$exe" --nocapture) >"$log" 2>&1; then
		echo "run $i FAILED (see $log)" >&2
		grep -E "panicked|^STEP" -A2 "$log" >&2 || true
		exit 1
	fi
	grep -E "^STEP" "$log" | sed "s/^/run $i: /"
done

# Pull figures out of the logs.
figure() { # $1 = sed expression printing one number per log
	for i in $(seq 1 "$RUNS"); do
		sed -nE "$1" "$OUT/run-$i.log" | head -1
	done
}
stats() { # name [unit [decimals]], numbers on stdin
	sort -g | awk -v name="$1" -v unit="${2:-s}" -v d="${3:-1}" '{ v[NR] = $1 } END {
		if (NR == 0) { printf "%-44s no data\n", name; exit }
		m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
		p = v[int(0.99 * NR + 0.999)]
		f = "%-44s p50 %6." d "f " unit "   p99 %6." d "f " unit "   (n=%d, min %." d "f)\n"
		printf f, name, m, p, NR, v[1]
	}'
}
echo
figure 's/^STEP 1: claim Bound ([0-9.]+) s.*/\1/p' | stats "claim Bound after apply"
figure 's/^STEP 1: .*pod Running on [^ ]+ after ([0-9.]+) s.*/\1/p' | stats "pod Running (volume mounted) after apply"
figure 's/^STEP 2: power cut.*-> pod Ready on [^:]+: ([0-9.]+) s.*/\1/p' | stats "power cut -> pod Ready on site B"
for site in a b; do
	figure "s/^STEP 2: power cut.*operator's leader ran on node-$site[0-9]+,.* -> pod Ready on [^:]+: ([0-9.]+) s.*/\\1/p" |
		stats "  ... with the operator's leader on site $site"
done
for site in a b; do
	figure "s/^STEP 2: power cut.*the attacher's on node-$site[0-9]+\\) -> pod Ready on [^:]+: ([0-9.]+) s.*/\\1/p" |
		stats "  ... with the attacher's leader on site $site"
done
figure 's/^ +attached \(VolumeAttachment\) +at ([0-9.]+) s.*/\1/p' | stats "power cut -> attached on site B"
figure 's/^STEP 3: site A powered on.*in sync ([0-9.]+) s.*/\1/p' | stats "power on -> in sync"
figure 's/^STEP 3: resync of .* ([0-9.]+) MiB dirty at its start.*/\1/p' | stats "resync: dirty at its start" MiB 2
figure 's/^STEP 3: resync of .* ([0-9.]+) MiB copied \(.*/\1/p' | stats "resync: copied" MiB 2
figure 's/^STEP 3: resync of .* MiB copied \(([0-9.]+) of dirty\).*/\1/p' | stats "resync: copied / dirty at its start" "x" 3
figure 's/^STEP 3: resync of .* ([0-9]+) regions recopied.*/\1/p' | stats "resync: regions recopied (a write overlapped)" "" 0
figure 's/^STEP 3: resync of .* ([0-9]+) attempt\(s\).*/\1/p' | stats "resync: attempts" "" 0
echo "records missing per run (must be 0):" \
	"$(figure 's/^STEP 2: .* ([0-9]+) missing;.*/\1/p' | tr '\n' ' ')"
