#!/usr/bin/env bash
# The twinvol demo: a site loss on a real two-site Kubernetes cluster on this
# machine (e2e/cluster.sh's bed: real kubelets on containerd, the control
# plane as the third location), with the Helm chart installed.
#
#   bash e2e/demo.sh           build what is missing, run the story, clean up
#   bash e2e/demo.sh --keep    the same, but leave the cluster, the chart and
#                              the StatefulSet running (prints KUBECONFIG)
#   bash e2e/demo.sh --down    tear a kept demo (or any e2e/cluster.sh cluster) down
#   bash e2e/demo.sh --engine  the engine-only demo (no Kubernetes, ~2 min)
#   bash e2e/demo.sh --help
#
# The story: a StatefulSet on the twinvol StorageClass runs on site A and
# appends checksummed, fsynced records; site A loses power (its nodes die,
# its links go dark); the volume drops site A's replica from its in-sync set
# through the API, the operator fences the site and moves the pod, and the
# pod runs again on site B with every acknowledged record; 96 MiB are written
# there while A is dark; site A's power returns, B resyncs exactly what A
# missed (throttled by the StorageClass's resyncRateLimit so the progress
# shows), both replicas are in sync again and the pod returns home to A
# (failback Automatic). Every figure printed is measured on this run.
#
# Needs root. Installs what is missing (Debian packages, the pinned upstream
# components built from Go into $TWINVOL_CACHE, the release build of
# twinvol-csi and twinvol-operator); the first run on a fresh machine takes
# 15 to 35 minutes for those builds, later runs a few minutes (README).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
export TWINVOL_CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TWINVOL_CACHE/cargo-target}
export TWINVOL_UPSTREAM_BIN=${TWINVOL_UPSTREAM_BIN:-$TWINVOL_CACHE/upstream/bin}

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }
mode=run
keep=0
if [ $# -gt 1 ]; then
  echo "demo: one option at most (got: $*); see bash e2e/demo.sh --help" >&2
  exit 2
fi
case "${1:-}" in
  "") ;;
  --keep) keep=1 ;;
  --down) mode=down ;;
  --engine) exec bash "$here/demo-engine.sh" ;;
  -h|--help) usage; exit 0 ;;
  *) echo "demo: unknown option '$1'; see bash e2e/demo.sh --help" >&2; exit 2 ;;
esac
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (network namespaces, cgroups, mounts, containerd)" >&2; exit 2; }

if [ "$mode" = down ]; then
  exec bash "$here/cluster.sh" down
fi

# ---------------------------------------------------------------------------
t_start=$(date +%s.%N)
since() { printf '%.1f' "$(echo "$(date +%s.%N) - $1" | bc)"; }
step() { printf '\n[%6.1fs] == %s\n' "$(since "$t_start")" "$*"; }
say() { printf '           %s\n' "$*"; }
indent() { sed 's/^/           /'; }
fail() { echo "demo: $*" >&2; exit 1; }
# Records acknowledged so far (the check's first figure), to wait for more.
acked_now() { "$cluster" records --app "$app" | sed -n 's/^\([0-9]*\) records acknowledged.*/\1/p'; }

release=twinvol
ns=twinvol-system
app=writer
pod=writer-0
node_a=node-a1
node_b=node-b1
blob_mib=96
rate=8Mi
cluster="$CARGO_TARGET_DIR/debug/twinvol-cluster"
kubectl="$TWINVOL_UPSTREAM_BIN/kubectl"
helm="$TWINVOL_UPSTREAM_BIN/helm"
cli_state=/run/twinvol-cluster/cli/state.json

step "installing what the demo needs (idempotent; the first run builds for a long while)"
# bc and jq are this script's own tools; install-deps.sh brings them.
bash "$here/tools/install-deps.sh" >/dev/null
if [ -s "$cli_state" ] && kill -0 "$(jq -r '.pid // 0' "$cli_state")" 2>/dev/null; then
  echo "demo: a cluster is already up (a kept demo, or bash e2e/cluster.sh up): take it down first" >&2
  echo "      with: bash e2e/demo.sh --down" >&2
  exit 2
fi
# The Rust builds run beside the Go builds (they share nothing, and each
# leaves a core idle while it links or downloads).
say "cargo build --release: twinvol-csi, twinvol-operator, and cargo build: twinvol-cluster (the bed's supervisor and this demo's helper), in the background (in $CARGO_TARGET_DIR; log $TWINVOL_CACHE/demo-cargo.log)"
mkdir -p "$TWINVOL_CACHE"
(cd "$top" && cargo build --release --bin twinvol-csi --bin twinvol-operator &&
  cargo build -p twinvol-e2e --bin twinvol-cluster) >"$TWINVOL_CACHE/demo-cargo.log" 2>&1 &
cargo_pid=$!
say "upstream components (Go builds, cached in $TWINVOL_CACHE/upstream; on a fresh machine about 25 min)"
# Its progress lines only (stderr); a component already built says nothing.
bash "$here/tools/build-upstream.sh" etcd kube-apiserver kubectl kube-controller-manager \
  kube-scheduler kubelet kube-proxy containerd external-provisioner external-attacher \
  external-resizer helm 2>&1 >/dev/null \
  | { grep --line-buffered -E 'go build|: built in|FAILED|cannot|missing|waiting' || true; } | indent
[ -x "$helm" ] && [ -x "$kubectl" ] || fail "the upstream build left no helm/kubectl in $TWINVOL_UPSTREAM_BIN"
say "waiting for the Rust builds"
if ! wait "$cargo_pid"; then
  tail -n 40 "$TWINVOL_CACHE/demo-cargo.log" | indent
  fail "the Rust build failed (log: $TWINVOL_CACHE/demo-cargo.log)"
fi
t_built=$(since "$t_start")

cluster_started=0
failed_at=""
cleanup() {
  local rc=$?
  set +e
  trap - EXIT INT TERM
  [ "$cluster_started" = 1 ] || exit "$rc"
  local what="FAILED (exit $rc)"
  [ "$rc" -ne 130 ] || what="interrupted"
  if [ "$rc" -ne 0 ] && [ -n "${KUBECONFIG:-}" ]; then
    echo
    echo "demo: $what during: ${failed_at:-?}; what the cluster shows:" >&2
    "$kubectl" get pods -A -o wide 2>&1 | indent >&2
    "$kubectl" get mv,tvsite 2>&1 | indent >&2
    "$kubectl" get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 25 | indent >&2
    echo "      the supervisor's log: /run/twinvol-cluster/cli/serve.log" >&2
  elif [ "$rc" -ne 0 ]; then
    echo "demo: $what during: ${failed_at:-?}; the supervisor's log ends:" >&2
    tail -n 30 /run/twinvol-cluster/cli/serve.log 2>&1 | indent >&2
  fi
  if [ "$keep" = 1 ]; then
    kept_info
  else
    step "cleaning up: the cluster goes down (every process, namespace, mount of it)"
    "$cluster" down 2>&1 | indent
    [ "$rc" -eq 0 ] || echo "demo: to look at a failed run, run it again with --keep" >&2
  fi
  exit "$rc"
}
kept_info() {
  step "kept: the cluster, the chart and the StatefulSet $app (still writing)"
  cat <<EOF | indent
export KUBECONFIG=${KUBECONFIG:-$("$cluster" kubeconfig 2>/dev/null)}
export PATH=$TWINVOL_UPSTREAM_BIN:\$PATH     # the pinned kubectl and helm
kubectl get nodes -L topology.kubernetes.io/zone
kubectl get pods -A -o wide
kubectl get mv,tvsite                        # MirroredVolumes and Sites
kubectl describe mv                          # replicas, epoch, conditions, Events
kubectl get pods -o wide -w                  # in another shell; then a site loss again:
bash $here/cluster.sh fault power-off a
bash $here/cluster.sh fault power-on a
bash $here/cluster.sh records               # every acknowledged record still there?
bash $here/demo.sh --down                   # tear it all down
EOF
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------
failed_at="starting the cluster"
step "starting the two-site cluster (site A: $node_a, site B: $node_b, the control plane as the third location)"
cluster_started=1
up_out=$("$cluster" up)
echo "$up_out" | grep -v '^export KUBECONFIG=' | indent
KUBECONFIG=$(echo "$up_out" | sed -n 's/^export KUBECONFIG=//p')
export KUBECONFIG
[ -s "$KUBECONFIG" ] || fail "the cluster came up without a kubeconfig ($up_out)"
root=$(echo "$up_out" | sed -n 's/^cluster slot [0-9]* in //p')
[ -d "$root" ] || fail "cannot tell the cluster's directory from: $up_out"
work="$root/demo"
mkdir -p "$work"
export HELM_CACHE_HOME="$work/helm/cache" HELM_CONFIG_HOME="$work/helm/config" HELM_DATA_HOME="$work/helm/data"
t_up=$(echo "$up_out" | sed -n 's/^up in \([0-9.]*\) s.*/\1/p')

failed_at="building and importing the images"
step "building twinvol's and the CSI sidecars' images, importing them into every node's containerd"
"$cluster" images --bin-dir "$CARGO_TARGET_DIR/release" --tag demo | indent

failed_at="installing the chart"
step "helm install: the chart with the bed's values (its Sites, pools, kubelet roots)"
"$cluster" values --tag demo >"$work/values.json"
say "sites: $(jq -c '[.sites[] | {name, pool}]' "$work/values.json")"
say "helm install $release charts/twinvol -n $ns --create-namespace -f values.json \\"
say "  --set storageClass.preferredSite=site-a --set storageClass.failback=Automatic \\"
say "  --set storageClass.resyncRateLimit=$rate"
t0=$(date +%s.%N)
"$helm" install "$release" "$top/charts/twinvol" --namespace "$ns" --create-namespace \
  -f "$work/values.json" \
  --set storageClass.preferredSite=site-a --set storageClass.failback=Automatic \
  --set storageClass.resyncRateLimit="$rate" >"$work/helm-install.txt"
say "waiting for every pod Ready and the node plugins registered with their kubelets"
for w in deployment/$release-operator deployment/$release-controller daemonset/$release-node; do
  "$kubectl" -n "$ns" rollout status "$w" --timeout=300s 2>&1 | tail -n 1 | indent
done
deadline=$(( $(date +%s) + 120 ))
for n in "$node_a" "$node_b"; do
  until "$kubectl" get csinode "$n" -o jsonpath='{.spec.drivers[*].name}' 2>/dev/null | grep -q csi.twinvol.io; do
    [ "$(date +%s)" -lt "$deadline" ] || fail "csi.twinvol.io not registered on $n within 120 s"
    sleep 0.5
  done
done
t_chart=$(since "$t0")
say "chart installed, every pod Ready, csi.twinvol.io on both nodes: $t_chart s after helm install"
"$kubectl" -n "$ns" get pods -o wide | indent
"$kubectl" get tvsite | indent

failed_at="running the StatefulSet on site A"
step "a StatefulSet on the twinvol StorageClass (prefers site A): appends a checksummed record, fsyncs, reports it"
t0=$(date +%s.%N)
"$cluster" workload --name "$app" --size 512Mi --site a | "$kubectl" apply -f - | indent
"$cluster" follow --app "$app" --since "$t0" --until "ready-on=$node_a" --timeout 240 | tee "$work/start.txt" | indent
t_pod=$(sed -n 's/^reached: .* at \([0-9.]*\) s$/\1/p' "$work/start.txt")
say "/data in $pod: $("$kubectl" exec "$pod" -- grep ' /data ' /proc/mounts | awk '{print $1, $3}')"
"$cluster" records --app "$app" --at-least 100 | indent
"$kubectl" get pvc,mv | indent

# ---------------------------------------------------------------------------
failed_at="the fail-over after site A's power cut"
step "SITE A LOSES POWER: its links go dark, every process of $node_a dies (page caches and all)"
say "what the cluster shows, sampled every 0.2 s, in seconds from the cut:"
"$cluster" follow --app "$app" --fault "power-off a" --until "ready-on=$node_b" --timeout 240 | tee "$work/failover.txt" | indent
t_failover=$(sed -n 's/^reached: .* at \([0-9.]*\) s$/\1/p' "$work/failover.txt")
"$cluster" records --app "$app" --at-least "$(( $(acked_now) + 20 ))" | tee "$work/records-b.txt" | indent
say "writing $blob_mib MiB to /data/blob on site B while site A is dark"
t0=$(date +%s.%N)
sum_b=$("$kubectl" exec "$pod" -- sh -c "dd if=/dev/urandom of=/data/blob bs=1M count=$blob_mib conv=fsync 2>/dev/null && sha256sum /data/blob" | cut -c1-64)
say "written and fsynced in $(since "$t0") s, sha256 ${sum_b:0:16}…"
"$kubectl" get mv,tvsite | indent

# ---------------------------------------------------------------------------
failed_at="site A's return: resync and fail-back"
step "SITE A'S POWER RETURNS: fresh processes on the old disk; B resyncs what A missed, then the pod goes home"
"$cluster" follow --app "$app" --fault "power-on a" --until in-sync --until "ready-on=$node_a" --timeout 400 | tee "$work/failback.txt" | indent
t_failback=$(sed -n 's/^reached: .* at \([0-9.]*\) s$/\1/p' "$work/failback.txt")
failed_at="checking the records on site A"
"$cluster" records --app "$app" --at-least "$(( $(acked_now) + 20 ))" | tee "$work/records-a.txt" | indent
sum_a=$("$kubectl" exec "$pod" -- sha256sum /data/blob | cut -c1-64)
[ "$sum_a" = "$sum_b" ] || fail "/data/blob on site A has sha256 $sum_a, written on B as $sum_b"
say "/data/blob read on site A: sha256 ${sum_a:0:16}…, as written on site B"
"$kubectl" get mv,tvsite | indent

# ---------------------------------------------------------------------------
failed_at="the summary"
resync_line=$(grep -o 'resync to site-a: .*' "$work/failback.txt" | tail -n 1 || true)
first_resync=$(grep 'resync to site-a: ' "$work/failback.txt" | head -n 1 | awk '{print $1}' || true)
in_sync_at=$(grep 'in-sync set .* -> {site-a, site-b}\|in-sync set .* -> {site-b, site-a}' "$work/failback.txt" | tail -n 1 | awk '{print $1}' || true)
step "summary (measured on this run)"
say "builds checked/done                      ${t_built} s after start"
say "cluster up                               ${t_up:-?} s"
say "chart installed, every pod Ready         ${t_chart} s after helm install"
say "StatefulSet applied -> pod Ready on A    ${t_pod:-?} s"
say "power cut of site A -> pod Ready on B    ${t_failover:-?} s"
say "power back on A -> in sync, pod home     ${t_failback:-?} s (resync progress first shown at ${first_resync:-never} s, in sync at ${in_sync_at:-?} s)"
say "last resync progress seen                ${resync_line:-none (it finished between two samples)}"
say "records, on B: $(cut -d';' -f1 "$work/records-b.txt")"
say "records, on A: $(cut -d';' -f1 "$work/records-a.txt")"
printf '\n[%6.1fs] demo finished: no acknowledged write lost, fail-over and fail-back with nobody at the keyboard.\n' "$(since "$t_start")"
failed_at=""
