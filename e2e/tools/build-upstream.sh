#!/usr/bin/env bash
# Build the pinned upstream pieces the e2e tests run (etcd, the Kubernetes
# control plane, kubelet, kube-proxy, kubectl, containerd, the CSI sidecars, csi-sanity,
# helm, and Kubernetes' e2e.test with its agnhost image binary and the ginkgo CLI) from
# their published Go modules, at the versions in versions.env.
#
#   build-upstream.sh                      build (or reuse) every component
#   build-upstream.sh etcd kube-apiserver  build only these components
#   build-upstream.sh --list               print component / version / module
#   build-upstream.sh --help
#
# Cache (outside the repo): ${TWINVOL_CACHE:-/var/cache/twinvol}
#   go/mod, go/build              GOMODCACHE and GOCACHE (an empty cache = a cold build)
#   wrappers/<name>-<version>/    generated wrapper modules (go.mod, go.sum, etcd's main.go)
#   upstream/<component>-<version>/  the binaries plus a stamp file
#   upstream/bin/<binary>         symlinks to the current pinned binaries
# Tests find the binaries via TWINVOL_UPSTREAM_BIN=$TWINVOL_CACHE/upstream/bin.
#
# Every component is built from a small wrapper module generated here: it
# requires the upstream module at the pinned version and repeats the upstream
# go.mod's replace and exclude directives, with the replaces that point into the
# upstream repository (k8s staging, etcd's sibling modules) turned into the
# published versions of those modules. The list is read from the release's own
# go.mod each time a wrapper is generated; nothing is hard-coded.
#
# A component whose stamp matches is reused without running go at all.
# Needs: go (at least the go directive of the pinned modules), jq, flock.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$HERE/versions.env"

# Bump when the way components are built changes: it invalidates every stamp.
RECIPE_REV=1

CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
UPSTREAM=$CACHE/upstream
BIN_DIR=$UPSTREAM/bin
WRAPPERS=$CACHE/wrappers

# ---------------------------------------------------------------------------
# Components. Order matters: etcd, kube-apiserver and kubectl come first.
COMPONENTS=(
  etcd kube-apiserver kubectl kube-controller-manager kube-scheduler kubelet
  kube-proxy containerd
  external-provisioner external-attacher external-resizer
  node-driver-registrar livenessprobe
  csi-sanity helm
  e2e.test agnhost ginkgo
)

# comp_def COMPONENT sets:
#   C_MODULE   upstream Go module
#   C_VERSION  pinned version (may be empty: not pinned)
#   C_WRAPPER  wrapper module name (components of one release share one)
#   C_KIND     "tool" (build packages of the module), "etcdmain" (generated main)
#              or "gotest" (go test -c of a test package)
#   C_BINS     entries "binary|package|CGO_ENABLED"
#   C_TAGS     build tags
#   C_LDKIND   which version variables to set (k8s, etcd, containerd, helm, mainversion, csisanity)
#   C_BUNDLE   set for the components of BUNDLE (one wrapper module for them all)
#
# The three CSI sidecars and helm are Kubernetes clients, each pinning its own
# patch of the client libraries (k8s.io/api, apimachinery, client-go: the
# provisioner 0.36.1, the attacher 0.37.0, the resizer and helm 0.37.1) and
# of grpc, protobuf, otel. Built from a wrapper each, every one compiles
# all of those again (cold: 196-235 s per sidecar, helm 164 s). They are built
# from one wrapper module instead, requiring all four at their pinned versions:
# Go's minimal version selection gives each shared dependency the highest
# version any of them requires (so each gets at least what it was released
# with), and the libraries are compiled once.
BUNDLE=(external-provisioner external-attacher external-resizer helm)
comp_def() {
  C_TAGS=""
  C_KIND=tool
  C_BUNDLE=""
  case "$1" in
    etcd)
      C_MODULE=go.etcd.io/etcd/server/v3; C_VERSION=$ETCD_VERSION
      C_KIND=etcdmain; C_BINS=("etcd|.|0"); C_LDKIND=etcd ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubectl|kubelet|kube-proxy)
      C_MODULE=k8s.io/kubernetes; C_VERSION=$KUBERNETES_VERSION
      C_TAGS="selinux,notest"; C_LDKIND=k8s
      # Static like upstream's control plane and kubectl. Upstream links kubelet
      # with cgo; we do not: it needs nothing from libc here, and a cgo build
      # recompiles every dependency again (measured: 481 s of a cold build).
      C_BINS=("$1|k8s.io/kubernetes/cmd/$1|0") ;;
    e2e.test)
      # Kubernetes' end-to-end suite (the storage conformance tests run it
      # with a test-driver file): `go test -c` of the release's test/e2e, in
      # a wrapper of its own, since the test's dependencies are not in the
      # component wrapper's tidy module graph (-mod=mod adds them). The
      # components' tags, so that the Go build cache's packages are theirs:
      # apimachinery's meta/v1 has a `!notest` file, and everything imports
      # it (without the tags: 545 s cold, every package compiled again).
      C_MODULE=k8s.io/kubernetes; C_VERSION=$KUBERNETES_VERSION
      C_TAGS="selinux,notest"; C_KIND=gotest; C_LDKIND=k8s
      C_BINS=("e2e.test|k8s.io/kubernetes/test/e2e|0") ;;
    agnhost)
      # the e2e suite's test image, from the same release (the components'
      # tags too, for the same cache)
      C_MODULE=k8s.io/kubernetes; C_VERSION=$KUBERNETES_VERSION
      C_TAGS="selinux,notest"; C_LDKIND=k8s; C_BINS=("agnhost|k8s.io/kubernetes/test/images/agnhost|0") ;;
    ginkgo)
      # the ginkgo CLI that runs e2e.test in parallel processes, at the
      # version the release's go.mod requires (resolved in its wrapper)
      C_MODULE=k8s.io/kubernetes; C_VERSION=$KUBERNETES_VERSION
      C_LDKIND=plain; C_BINS=("ginkgo|github.com/onsi/ginkgo/v2/ginkgo|0") ;;
    containerd)
      C_MODULE=github.com/containerd/containerd/v2; C_VERSION=$CONTAINERD_VERSION
      C_TAGS="no_btrfs"; C_LDKIND=containerd
      # all static (upstream uses cgo for containerd and ctr; nothing here needs it)
      C_BINS=("containerd|$C_MODULE/cmd/containerd|0"
              "containerd-shim-runc-v2|$C_MODULE/cmd/containerd-shim-runc-v2|0"
              "ctr|$C_MODULE/cmd/ctr|0") ;;
    external-provisioner)
      C_MODULE=github.com/kubernetes-csi/external-provisioner/v6; C_VERSION=$EXTERNAL_PROVISIONER_VERSION
      C_LDKIND=mainversion; C_BINS=("csi-provisioner|$C_MODULE/cmd/csi-provisioner|0") ;;
    external-attacher)
      C_MODULE=github.com/kubernetes-csi/external-attacher/v4; C_VERSION=$EXTERNAL_ATTACHER_VERSION
      C_LDKIND=mainversion; C_BINS=("csi-attacher|$C_MODULE/cmd/csi-attacher|0") ;;
    external-resizer)
      C_MODULE=github.com/kubernetes-csi/external-resizer/v2; C_VERSION=$EXTERNAL_RESIZER_VERSION
      C_LDKIND=mainversion; C_BINS=("csi-resizer|$C_MODULE/cmd/csi-resizer|0") ;;
    node-driver-registrar)
      C_MODULE=github.com/kubernetes-csi/node-driver-registrar; C_VERSION=$NODE_DRIVER_REGISTRAR_VERSION
      C_LDKIND=mainversion; C_BINS=("csi-node-driver-registrar|$C_MODULE/cmd/csi-node-driver-registrar|0") ;;
    livenessprobe)
      C_MODULE=github.com/kubernetes-csi/livenessprobe; C_VERSION=$LIVENESSPROBE_VERSION
      C_LDKIND=mainversion; C_BINS=("livenessprobe|$C_MODULE/cmd/livenessprobe|0") ;;
    csi-sanity)
      C_MODULE=github.com/kubernetes-csi/csi-test/v5; C_VERSION=$CSI_SANITY_VERSION
      C_LDKIND=csisanity; C_BINS=("csi-sanity|$C_MODULE/cmd/csi-sanity|0") ;;
    helm)
      C_MODULE=${HELM_MODULE:-helm.sh/helm/${HELM_VERSION%%.*}}; C_VERSION=$HELM_VERSION
      C_LDKIND=helm; C_BINS=("helm|$C_MODULE/cmd/helm|0") ;;
    *) return 1 ;;
  esac
  # one wrapper per module and version (all Kubernetes components share one)
  C_WRAPPER="${C_MODULE//\//_}@$C_VERSION"
  local b
  for b in "${BUNDLE[@]}"; do
    if [[ $b == "$1" && -n $C_VERSION && -z ${IN_BUNDLE_LIST:-} ]]; then
      C_BUNDLE=1
      # named by its members' versions: a bump of one is a new wrapper
      C_WRAPPER="k8s-clients@$(bundle_members | sha256sum | cut -c1-12)"
    fi
  done
  [[ $C_KIND == etcdmain ]] && C_WRAPPER="etcd-main@$C_VERSION"
  [[ $C_KIND == gotest ]] && C_WRAPPER="${C_WRAPPER}-e2e"
  return 0
}

# The pinned members of BUNDLE, one per line: component module version.
bundle_members() {
  local b
  for b in "${BUNDLE[@]}"; do
    (IN_BUNDLE_LIST=1; comp_def "$b"
     [[ -z $C_VERSION ]] || printf '%s %s %s\n' "$b" "$C_MODULE" "$C_VERSION")
  done
}

usage() { sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ---------------------------------------------------------------------------
# Arguments
REQUESTED=()
for arg in "$@"; do
  case "$arg" in
    --list)
      printf '%-24s %-36s %s\n' COMPONENT VERSION MODULE
      for c in "${COMPONENTS[@]}"; do
        comp_def "$c"
        printf '%-24s %-36s %s\n' "$c" "${C_VERSION:-(not pinned)}" "$C_MODULE"
      done
      exit 0 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "build-upstream: unknown option $arg" >&2; usage >&2; exit 2 ;;
    *)
      if ! comp_def "$arg"; then
        echo "build-upstream: unknown component '$arg' (known: ${COMPONENTS[*]})" >&2
        exit 2
      fi
      REQUESTED+=("$arg") ;;
  esac
done
EXPLICIT=1
if [[ ${#REQUESTED[@]} -eq 0 ]]; then
  REQUESTED=("${COMPONENTS[@]}")
  EXPLICIT=0
fi

# ---------------------------------------------------------------------------
# Helpers
log() { printf '[build-upstream] %s\n' "$*" >&2; }
now_ms() { date +%s%3N; }
secs() { local ms=$1; printf '%d.%d' $((ms / 1000)) $((ms % 1000 / 100)); }

need_tools() {
  local missing=()
  for t in go jq flock sha256sum; do
    command -v "$t" >/dev/null 2>&1 || missing+=("$t")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "build-upstream: missing tools: ${missing[*]} (run e2e/tools/install-deps.sh; go must be installed separately)" >&2
    exit 1
  fi
}

go_env_setup() {
  export GOMODCACHE=$CACHE/go/mod
  export GOCACHE=$CACHE/go/build
  export GOFLAGS="-buildvcs=false -modcacherw"
  export GOTOOLCHAIN=${GOTOOLCHAIN:-local}
  export GOWORK=off
  unset GOBIN GO111MODULE
}

# Everything the stamp depends on, computed without running go.
stamp_text() {
  local b
  printf 'recipe=%s\ncomponent=%s\nmodule=%s\nversion=%s\ntags=%s\nldflags=%s\n' \
    "$RECIPE_REV" "$1" "$C_MODULE" "$C_VERSION" "$C_TAGS" "$C_LDKIND"
  for b in "${C_BINS[@]}"; do printf 'bin=%s\n' "$b"; done
  # a bundle's member is built against its wrapper's module graph
  [[ -z $C_BUNDLE ]] || printf 'wrapper=%s\n' "$C_WRAPPER"
}

link_bins() {  # link_bins INSTALL_DIR
  local e bin
  mkdir -p "$BIN_DIR"
  for e in "${C_BINS[@]}"; do
    bin=${e%%|*}
    ln -sfn "../$(basename "$1")/$bin" "$BIN_DIR/$bin"
  done
}

is_cached() {  # is_cached COMPONENT INSTALL_DIR
  local e
  [[ -f $2/.twinvol-stamp ]] || return 1
  [[ "$(cat "$2/.twinvol-stamp")" == "$(stamp_text "$1")" ]] || return 1
  for e in "${C_BINS[@]}"; do [[ -x $2/${e%%|*} ]] || return 1; done
  return 0
}

# Upstream metadata of MODULE@VERSION, fetched once per wrapper:
# sets UP_GOMOD (path of its go.mod), UP_COMMIT (may be empty), UP_TIME.
fetch_module_meta() {
  local json info
  json=$(go mod download -json "$1@$2") || {
    echo "$json" >&2
    echo "build-upstream: cannot download $1@$2 from the Go module proxy" >&2
    return 1
  }
  UP_GOMOD=$(jq -r '.GoMod // empty' <<<"$json")
  info=$(jq -r '.Info // empty' <<<"$json")
  [[ -n $UP_GOMOD && -f $UP_GOMOD ]] || { echo "build-upstream: no go.mod for $1@$2: $json" >&2; return 1; }
  UP_COMMIT=$(jq -r '.Origin.Hash // empty' "$info" 2>/dev/null || true)
  [[ -n $UP_COMMIT ]] || UP_COMMIT=$(jq -r '.Origin.Hash // empty' <<<"$json")
  UP_TIME=$(jq -r '.Time // empty' "$info")
}

# A wrapper generated before a component joined its module (kube-proxy joined
# the Kubernetes one later) lacks that component's tool directive: add it and
# tidy, instead of regenerating the wrapper (which would change nothing else).
ensure_wrapper_tools() {
  local e pkg tools missing=()
  tools=$(cd "$WRAP_DIR" && go mod edit -json | jq -r '.Tool[]?.Path')
  for e in "${C_BINS[@]}"; do
    IFS='|' read -r _ pkg _ <<<"$e"
    [[ $pkg == . || $C_KIND == gotest ]] && continue
    grep -qxF "$pkg" <<<"$tools" || missing+=("-tool=$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return 0
  log "  adding ${missing[*]#-tool=} to wrapper module $WRAP_DIR"
  (cd "$WRAP_DIR" && go mod edit "${missing[@]}" && go mod tidy)
}

# The go.mod of BUNDLE's wrapper module in directory $1: every member
# required at its pinned version; the members' replace directives merged (one
# that pins a module to a version, as every member pins Kubernetes' client
# libraries, becomes the highest version any member pins or requires, so
# each member gets at least what it was released with; one by another module
# must be the same in every member that has it), their excludes joined; the
# binaries of every member as tools.
bundle_wrapper() {
  local dir=$1 name module version json gomod upjson gover maxgo=1.22
  local old oldv new newv reqv key path v e pkg reqs="" edits=()
  local -A pin=() other=() excl=()
  printf 'module twinvol.invalid/upstream/%s\n\ngo 1.22\n' "${C_WRAPPER//[@]/-}" >"$dir/go.mod"
  while read -r name module version; do
    json=$(go mod download -json "$module@$version") || {
      echo "$json" >&2
      echo "build-upstream: cannot download $module@$version from the Go module proxy" >&2
      return 1
    }
    gomod=$(jq -r '.GoMod // empty' <<<"$json")
    [[ -n $gomod && -f $gomod ]] || { echo "build-upstream: no go.mod for $module@$version: $json" >&2; return 1; }
    upjson=$(go mod edit -json "$gomod")
    gover=$(jq -r '.Go // "1.22"' <<<"$upjson")
    maxgo=$(printf '%s\n%s\n' "$maxgo" "$gover" | sort -V | tail -n1)
    edits+=("-require=$module@$version")
    reqs+=$(jq -r '.Require[]? | "\(.Path) \(.Version)"' <<<"$upjson")$'\n'
    while IFS='|' read -r old oldv new newv; do
      [[ -n $old ]] || continue
      key=$old${oldv:+@$oldv}
      if [[ -z $newv ]]; then
        # a directory of the member's own repository: the published module
        reqv=$(jq -r --arg p "$old" '[.Require[]? | select(.Path == $p) | .Version][0] // empty' <<<"$upjson")
        if [[ -z $reqv || $reqv == v0.0.0 ]]; then
          echo "build-upstream: cannot map local replace $old => $new of $module@$version to a published version" >&2
          return 1
        fi
        new=$old; newv=$reqv
      fi
      if [[ $new == "$old" ]]; then
        pin[$key]+="$newv "
      elif [[ -n ${other[$key]:-} && ${other[$key]} != "$new@$newv" ]]; then
        echo "build-upstream: the members of the wrapper $C_WRAPPER replace $key by ${other[$key]} and by $new@$newv ($module)" >&2
        return 1
      else
        other[$key]=$new@$newv
      fi
    done < <(jq -r '.Replace[]? | [.Old.Path, (.Old.Version // ""), .New.Path, (.New.Version // "")] | join("|")' <<<"$upjson")
    while IFS='|' read -r old oldv; do
      [[ -n $old ]] && excl[$old@$oldv]=1
    done < <(jq -r '.Exclude[]? | [.Path, .Version] | join("|")' <<<"$upjson")
    while IFS='|' read -r _ pkg _; do
      edits+=("-tool=$pkg")
    done < <(comp_def "$name"; printf '%s\n' "${C_BINS[@]}")
  done < <(bundle_members)
  for key in "${!other[@]}"; do edits+=("-replace=$key=${other[$key]}"); done
  for key in "${!excl[@]}"; do edits+=("-exclude=$key"); done
  (cd "$dir" && go mod edit -go="$maxgo" "${edits[@]}")
  # The pins last, against the versions minimal version selection gives the
  # graph without them: a member's pin below what another member needs (the
  # provisioner pins k8s.io/component-helpers to 0.36.1, helm's kubectl 0.37.1
  # requires 0.37.1) is raised to it.
  local selected
  selected=$(cd "$dir" && go mod tidy && go list -m -f '{{.Path}} {{.Version}}' all) || {
    echo "build-upstream: go mod tidy failed for wrapper $C_WRAPPER" >&2
    return 1
  }
  edits=()
  for key in "${!pin[@]}"; do
    if [[ -n ${other[$key]:-} ]]; then
      echo "build-upstream: the members of the wrapper $C_WRAPPER replace $key by ${other[$key]} and by versions of itself" >&2
      return 1
    fi
    path=${key%%@*}
    # semantic order is sort -V's for release versions (vX.Y.Z)
    v=$( { tr ' ' '\n' <<<"${pin[$key]}"; awk -v p="$path" '$1 == p { print $2 }' <<<"$reqs$selected"; } |
      grep . | sort -V | tail -n1)
    edits+=("-replace=$key=$path@$v")
  done
  [[ ${#edits[@]} -eq 0 ]] || (cd "$dir" && go mod edit "${edits[@]}")
  log "    $(bundle_members | wc -l) modules, $(grep -c '=>' "$dir/go.mod" || true) replace(s), $(grep -c '^exclude' "$dir/go.mod" || true) exclude(s) merged"
}

# Generate (once) the wrapper module for the current component; sets WRAP_DIR.
ensure_wrapper() {
  WRAP_DIR=$WRAPPERS/$C_WRAPPER
  if [[ -f $WRAP_DIR/.ready && "$(cat "$WRAP_DIR/.ready")" == "recipe=$RECIPE_REV" ]]; then
    ensure_wrapper_tools
    return 0
  fi
  log "  generating wrapper module $WRAP_DIR"
  local tmp=$WRAP_DIR.tmp.$$
  rm -rf "$tmp"; mkdir -p "$tmp"
  if [[ -n $C_BUNDLE ]]; then
    bundle_wrapper "$tmp" || { rm -rf "$tmp"; return 1; }
    finish_wrapper "$tmp"
    return
  fi

  local json gomod upjson
  json=$(go mod download -json "$C_MODULE@$C_VERSION") || {
    echo "$json" >&2
    echo "build-upstream: cannot download $C_MODULE@$C_VERSION from the Go module proxy" >&2
    rm -rf "$tmp"; return 1
  }
  gomod=$(jq -r '.GoMod // empty' <<<"$json")
  [[ -n $gomod && -f $gomod ]] || { echo "build-upstream: no go.mod for $C_MODULE@$C_VERSION: $json" >&2; rm -rf "$tmp"; return 1; }
  upjson=$(go mod edit -json "$gomod")

  local gover
  gover=$(jq -r '.Go // "1.22"' <<<"$upjson")
  local modname="twinvol.invalid/upstream/${C_WRAPPER//[@]/-}"
  printf 'module %s\n\ngo %s\n\nrequire %s %s\n' "$modname" "$gover" "$C_MODULE" "$C_VERSION" >"$tmp/go.mod"

  # Replace and exclude directives of the upstream go.mod, carried over.
  local edits=() old oldv new newv reqv kminor
  # '|' separated: tab is IFS whitespace and would merge empty fields
  while IFS='|' read -r old oldv new newv; do
    [[ -n $old ]] || continue
    if [[ -z $newv ]]; then
      # A replace by a directory inside the upstream repository: use the
      # published module at the version the upstream go.mod requires.
      reqv=$(jq -r --arg p "$old" '[.Require[]? | select(.Path == $p) | .Version][0] // empty' <<<"$upjson")
      if [[ -z $reqv ]]; then
        log "    dropped replace $old => $new (not required by $C_MODULE)"
        continue
      fi
      if [[ $reqv == v0.0.0 && $C_MODULE == k8s.io/kubernetes && $old == k8s.io/* ]]; then
        # staging module v0.X.Y is published with release v1.X.Y
        kminor=${C_VERSION#v1.}
        reqv=v0.$kminor
      fi
      if [[ $reqv == v0.0.0 ]]; then
        echo "build-upstream: cannot map local replace $old => $new of $C_MODULE@$C_VERSION to a published version" >&2
        rm -rf "$tmp"; return 1
      fi
      edits+=("-replace=$old${oldv:+@$oldv}=$old@$reqv")
    else
      edits+=("-replace=$old${oldv:+@$oldv}=$new@$newv")
    fi
  done < <(jq -r '.Replace[]? | [.Old.Path, (.Old.Version // ""), .New.Path, (.New.Version // "")] | join("|")' <<<"$upjson")
  while IFS='|' read -r old oldv; do
    [[ -n $old ]] && edits+=("-exclude=$old@$oldv")
  done < <(jq -r '.Exclude[]? | [.Path, .Version] | join("|")' <<<"$upjson")

  local e
  if [[ $C_KIND == etcdmain ]]; then
    cat >"$tmp/main.go" <<EOF
// Code generated by twinvol's e2e/tools/build-upstream.sh. DO NOT EDIT.
// The etcd server binary: $C_MODULE's etcdmain entry point.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
EOF
  else
    # every binary any component builds from this module version (a test
    # package is built with go test -c, not as a tool)
    if [[ $C_KIND != gotest ]]; then
      for e in "${C_BINS[@]}"; do
        IFS='|' read -r _ pkg _ <<<"$e"
        edits+=("-tool=$pkg")
      done
    fi
    if [[ $C_MODULE == k8s.io/kubernetes ]]; then
      local k
      for k in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
        edits+=("-tool=k8s.io/kubernetes/cmd/$k")
      done
    fi
  fi
  if [[ ${#edits[@]} -gt 0 ]]; then
    (cd "$tmp" && go mod edit "${edits[@]}")
  fi
  log "    $(grep -c '=>' "$tmp/go.mod" || true) replace(s), $(grep -c '^exclude' "$tmp/go.mod" || true) exclude(s) carried over from $C_MODULE@$C_VERSION"
  finish_wrapper "$tmp"
}

finish_wrapper() {  # finish_wrapper TMP_DIR: tidy it and make it the wrapper
  local tmp=$1
  (cd "$tmp" && go mod tidy) || { echo "build-upstream: go mod tidy failed for wrapper $C_WRAPPER ($tmp kept)" >&2; return 1; }
  printf 'recipe=%s\n' "$RECIPE_REV" >"$tmp/.ready"
  rm -rf "$WRAP_DIR"
  mv "$tmp" "$WRAP_DIR"
}

ldflags_for() {  # prints -ldflags value for the current component
  local v=$C_VERSION commit=$UP_COMMIT date=$UP_TIME
  local tree=clean
  [[ -n $commit ]] || tree=archive   # like upstream builds from a source archive
  case "$C_LDKIND" in
    k8s)
      local major minor pkg out="-s -w"
      major=${v#v}; major=${major%%.*}
      minor=${v#v*.}; minor=${minor%%.*}
      for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
        out+=" -X $pkg.gitVersion=$v -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
        out+=" -X $pkg.gitCommit=$commit -X $pkg.gitTreeState=$tree -X $pkg.buildDate=$date"
      done
      printf '%s' "$out" ;;
    etcd)
      printf '%s' "-X go.etcd.io/etcd/api/v3/version.GitSHA=${commit:-module-$v}" ;;
    containerd)
      local pkg=$C_MODULE/version
      printf '%s' "-s -w -X $pkg.Version=$v -X $pkg.Revision=$commit -X $pkg.Package=$C_MODULE" ;;
    helm)
      local pkg=$C_MODULE/internal/version
      printf '%s' "-s -w -X $pkg.version=$v -X $pkg.metadata= -X $pkg.gitCommit=$commit -X $pkg.gitTreeState=$tree" ;;
    mainversion)
      printf '%s' "-s -w -X main.version=$v" ;;
    csisanity)
      printf '%s' "-s -w -X main.VERSION=$v" ;;
    plain)
      printf '%s' "-s -w" ;;
  esac
}

# ---------------------------------------------------------------------------
# Build one component. Sets R_STATUS.
build_component() {
  local c=$1
  comp_def "$c"
  local inst=$UPSTREAM/$c-$C_VERSION
  if [[ -z $C_VERSION ]]; then
    R_STATUS=unpinned
    return 0
  fi
  if is_cached "$c" "$inst"; then
    link_bins "$inst"
    R_STATUS=cached
    return 0
  fi
  if [[ $GO_SHOWN == 0 ]]; then log "  using $(go version)"; GO_SHOWN=1; fi
  ensure_wrapper || return 1
  fetch_module_meta "$C_MODULE" "$C_VERSION" || return 1
  local ldf stage e bin pkg cgo
  ldf=$(ldflags_for)
  stage=$inst.tmp.$$
  rm -rf "$stage"; mkdir -p "$stage"
  for e in "${C_BINS[@]}"; do
    IFS='|' read -r bin pkg cgo <<<"$e"
    if [[ $C_KIND == gotest ]]; then
      log "  go test -c $bin ($pkg, CGO_ENABLED=$cgo${C_TAGS:+, tags $C_TAGS})"
      (cd "$WRAP_DIR" && CGO_ENABLED=$cgo go test -c -mod=mod -trimpath ${C_TAGS:+-tags "$C_TAGS"} \
          -ldflags "$ldf" -o "$stage/$bin" "$pkg") || { rm -rf "$stage"; return 1; }
      continue
    fi
    log "  go build $bin ($pkg, CGO_ENABLED=$cgo${C_TAGS:+, tags $C_TAGS})"
    (cd "$WRAP_DIR" && CGO_ENABLED=$cgo go build -trimpath ${C_TAGS:+-tags "$C_TAGS"} \
        -ldflags "$ldf" -o "$stage/$bin" "$pkg") || { rm -rf "$stage"; return 1; }
  done
  stamp_text "$c" >"$stage/.twinvol-stamp"
  rm -rf "$inst"
  mv "$stage" "$inst"
  link_bins "$inst"
  R_STATUS=built
}

# ---------------------------------------------------------------------------
need_tools
go_env_setup
mkdir -p "$UPSTREAM" "$BIN_DIR" "$WRAPPERS" "$GOMODCACHE" "$GOCACHE"
exec 9>"$CACHE/.build-upstream.lock"
if ! flock -n 9; then
  log "waiting for another build-upstream.sh using $CACHE"
  flock 9
fi

log "cache $CACHE"
GO_SHOWN=0
TABLE=()
FAILED=()
TOTAL_START=$(now_ms)
for c in "${REQUESTED[@]}"; do
  comp_def "$c"
  log "$c ${C_VERSION:-(not pinned)} ($C_MODULE)"
  start=$(now_ms)
  R_STATUS=""
  if build_component "$c"; then
    :
  else
    R_STATUS=FAILED
    FAILED+=("$c")
  fi
  if [[ $R_STATUS == unpinned && $EXPLICIT == 1 ]]; then
    log "  $c has no version in versions.env"
    R_STATUS=FAILED
    FAILED+=("$c")
  fi
  el=$(secs $(( $(now_ms) - start )))
  log "  $c: $R_STATUS in ${el}s"
  TABLE+=("$(printf '%-24s %-36s %-52s %-8s %8s' "$c" "${C_VERSION:--}" "$C_MODULE" "$R_STATUS" "$el")")
done

printf '\n%-24s %-36s %-52s %-8s %8s\n' COMPONENT VERSION MODULE STATUS SECONDS
printf '%s\n' "${TABLE[@]}"
printf 'total %ss; binaries in %s (export TWINVOL_UPSTREAM_BIN=%s)\n' \
  "$(secs $(( $(now_ms) - TOTAL_START )))" "$BIN_DIR" "$BIN_DIR"
if [[ ${#FAILED[@]} -gt 0 ]]; then
  echo "build-upstream: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
