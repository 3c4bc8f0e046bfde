#!/usr/bin/env bash
# The two-site test cluster for people:
#
#   e2e/cluster.sh up [--nodes-per-site N]   start it; prints `export KUBECONFIG=…`
#   e2e/cluster.sh status                    nodes, links, kubectl get nodes
#   e2e/cluster.sh kubeconfig                the admin kubeconfig's path
#   e2e/cluster.sh fault VERB [NODE|SITE]    kill-node a1, start-node a1, power-off a,
#                                            power-on a, cut-intersite, restore-intersite,
#                                            partition a, heal a, cut-node-link b1, restore-node-link b1
#   e2e/cluster.sh down                      tear it down; also removes leftovers of crashed runs
#
# Running twinvol on it (what e2e/demo.sh does; see docs/cluster.md):
#   e2e/cluster.sh images --bin-dir DIR [--tag T]   build twinvol's and the sidecars' images, import them
#   e2e/cluster.sh values [--tag T]                 the chart's values for this bed (helm install -f)
#   e2e/cluster.sh workload [--name writer] [--site a] | kubectl apply -f -
#                                            a StatefulSet appending checksummed, fsynced records
#   e2e/cluster.sh records [--app writer]    is every acknowledged record in its volume?
#   e2e/cluster.sh follow --until ready-on=node-b1 [--until in-sync] [--since T | --fault "power-off a"]
#                                            print what happens to the workload until the goals hold
#
# Needs root, the Debian packages of e2e/tools/install-deps.sh and the upstream
# binaries of e2e/tools/build-upstream.sh (both are run here when missing).
# docs/cluster.md describes the layout and every fault.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
export TWINVOL_CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TWINVOL_CACHE/cargo-target}
export TWINVOL_UPSTREAM_BIN=${TWINVOL_UPSTREAM_BIN:-$TWINVOL_CACHE/upstream/bin}

case "${1:-}" in
  ""|-h|--help) sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
esac

if [[ $1 == up ]]; then
  bash "$here/tools/install-deps.sh" >&2
  bash "$here/tools/build-upstream.sh" etcd kube-apiserver kubectl kube-controller-manager \
    kube-scheduler kubelet kube-proxy containerd >&2
fi
(cd "$top" && cargo build -q -p twinvol-e2e --bin twinvol-cluster) >&2
exec "$CARGO_TARGET_DIR/debug/twinvol-cluster" "$@"
