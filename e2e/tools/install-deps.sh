#!/usr/bin/env bash
# Install the Debian packages twinvol's tests need, and check the toolchains.
#
#   install-deps.sh          install what is missing (apt is skipped when nothing is)
#   install-deps.sh --check  only report; exit 1 if anything is missing
#
# Idempotent: when every package is present it runs no apt command at all;
# otherwise it runs `apt-get update` once, then one `apt-get install`.
# Go and cargo are not installed here (they come with the machine): the script
# checks that they exist and that go is at least GO_MIN_VERSION (versions.env).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"

# What each group is for:
PACKAGES=(
  # block devices and I/O: qemu-img/qemu-io/qemu-nbd, nbdcopy/nbdinfo/nbdfuse, fio
  qemu-utils libnbd-bin fio
  # FUSE (fusermount3), filesystems, losetup/mount/nsenter/unshare/flock
  fuse3 e2fsprogs xfsprogs util-linux
  # node networking: ip/tc, nft, iptables, conntrack, socat, ethtool, modprobe (kubelet/kube-proxy call it)
  iproute2 nftables iptables conntrack socat ethtool kmod
  # container runtime: containerd itself is built by build-upstream.sh, runc comes from Debian
  runc
  # the stretched test cluster (e2e/src/cluster): pod networking (bridge, host-local,
  # loopback, portmap), the static busybox the workload image is made of, ping for the
  # fault checks from each namespace
  containernetworking-plugins busybox-static iputils-ping
  # test scripting: bc, /usr/bin/time, killall/fuser, ps/pgrep, jq (also used by build-upstream.sh), curl (the demo reads /metrics)
  bc time psmisc procps jq curl
  # protoc and the well-known .proto files (google/protobuf/*.proto, which csi.proto
  # imports) for the Rust CSI/gRPC code generation, TLS material for tests
  protobuf-compiler libprotobuf-dev openssl ca-certificates
  # cgo builds of kubelet and containerd in build-upstream.sh
  gcc libc6-dev
  # promtool (check rules / test rules) for the chart's PrometheusRule alerts (e2e/tests/chart.rs)
  prometheus
)

CHECK_ONLY=0
case "${1:-}" in
  --check) CHECK_ONLY=1 ;;
  "") ;;
  -h|--help) sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "install-deps: unknown argument $1" >&2; exit 2 ;;
esac

log() { printf '[install-deps] %s\n' "$*" >&2; }

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$'; then
      printf '%s\n' "$p"
    fi
  done
}

mapfile -t MISSING < <(missing_packages)
if [[ ${#MISSING[@]} -eq 0 ]]; then
  log "all ${#PACKAGES[@]} Debian packages present; apt not run"
elif [[ $CHECK_ONLY == 1 ]]; then
  log "missing Debian packages: ${MISSING[*]}"
else
  log "missing Debian packages: ${MISSING[*]}"
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=(sudo); else
      echo "install-deps: must run as root (or with sudo available) to install: ${MISSING[*]}" >&2
      exit 1
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -q
  "${SUDO[@]}" apt-get install -y -q --no-install-recommends "${MISSING[@]}"
  mapfile -t MISSING < <(missing_packages)
  if [[ ${#MISSING[@]} -gt 0 ]]; then
    echo "install-deps: still missing after apt-get install: ${MISSING[*]}" >&2
    exit 1
  fi
  log "installed; all ${#PACKAGES[@]} Debian packages present"
fi

# ---------------------------------------------------------------------------
# Toolchains
FAIL=0
version_ge() {  # version_ge HAVE NEED
  [[ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" == "$2" ]]
}

if ! command -v go >/dev/null 2>&1; then
  echo "install-deps: go not found in PATH; build-upstream.sh needs go >= $GO_MIN_VERSION" >&2
  FAIL=1
else
  GOV=$(GOTOOLCHAIN=${GOTOOLCHAIN:-local} go env GOVERSION 2>/dev/null || true)
  GOV=${GOV#go}
  if [[ -z $GOV ]] || ! version_ge "$GOV" "$GO_MIN_VERSION"; then
    echo "install-deps: go ${GOV:-(unknown)} is older than $GO_MIN_VERSION, the newest go directive among the modules pinned in versions.env" >&2
    FAIL=1
  else
    log "go $GOV (>= $GO_MIN_VERSION)"
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo not found in PATH (install Rust with rustup, or put ~/.cargo/bin on PATH)" >&2
  FAIL=1
else
  log "$(cargo --version)"
fi

if [[ ${#MISSING[@]} -gt 0 ]]; then FAIL=1; fi
exit "$FAIL"
