#!/usr/bin/env bash
# Benchmark (not a test): twinvol's mirrored export against single-copy peers,
# in one run, on one disk.
#
#   NBD:  fio's nbd engine against the twinvol frontend (two replicas over
#         loopback, release build) and against qemu-nbd serving one raw file
#         with cache=none: 4k randwrite QD1 (mean, p99 latency), 4k randread
#         QD32 (IOPS), 1M sequential write QD8 (MB/s).
#   FUSE: the FUSE file + loop device (direct I/O) against a loop device on a
#         plain file: 1M sequential write QD8 (MB/s), 4k randwrite QD1 (IOPS).
#   RSS:  the frontend's peak RSS at QD 128 (4k random I/O, 1M writes and
#         reads; over NBD and through the FUSE loop device).
#
# Every figure is the median of $RUNS runs; ratios are twinvol / peer. Prints
# a Markdown table for docs/benchmarks.md. Needs root, fio, qemu-nbd, jq, bc.
#
# Usage: benches/engine-vs-qemu-nbd.sh
#   env: BENCH_DIR (on the disk to measure), SIZE_MIB, RUNTIME (s), RUNS,
#        ENGINE_BIN (a prebuilt release binary; default: build one)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/twinvol-bench}
SIZE_MIB=${SIZE_MIB:-1024}
RUNTIME=${RUNTIME:-5}
RUNS=${RUNS:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/twinvol-bench-target}

pids=()
loops=()
mounts=()
cleanup() {
  local m l p
  for m in "${mounts[@]}"; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
  for l in "${loops[@]}"; do losetup -d "$l" 2>/dev/null || true; done
  # One at a time, frontend first: it flushes to the replicas on its way out.
  for p in "${pids[@]}"; do
    kill "$p" 2>/dev/null || true
    wait "$p" 2>/dev/null || true
  done
  # The FUSE export unmounts when the frontend exits; make sure it did.
  umount -l "$BENCH_DIR/fuse" 2>/dev/null || true
  rm -rf "$BENCH_DIR"
}
trap cleanup EXIT

log() { echo "bench: $*" >&2; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local deadline=$((SECONDS + $1)) what=$2
  shift 2
  until "$@" 2>/dev/null; do
    if ((SECONDS >= deadline)); then
      echo "bench: timed out waiting for $what" >&2
      exit 1
    fi
    sleep 0.1
  done
}

median() { # median of the arguments
  printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'
}

ratio() { printf '%.2f' "$(echo "$1 / $2" | bc -l)"; }
num() { printf "%.${2:-0}f" "$1"; }

# fio_json FIO-ARGS...: prints fio's JSON report of one job.
fio_json() {
  # fio also prints notes on stdout: keep the JSON in a file of its own.
  local out=$BENCH_DIR/fio.json
  fio --output-format=json --output="$out" --name=bench --direct=1 --group_reporting \
    --randrepeat=0 --norandommap "$@" >&2
  cat "$out"
}

# One NBD figure: nbd_run URI KIND -> value
nbd_run() {
  local uri=$1 kind=$2
  case $kind in
    lat4k)
      fio_json --ioengine=nbd --uri="$uri" --rw=randwrite --bs=4k --iodepth=1 \
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time=1 \
        --lat_percentiles=1 |
        jq -r '.jobs[0].write.lat_ns | "\(.mean / 1000) \(.percentile["99.000000"] / 1000)"'
      ;;
    randread)
      fio_json --ioengine=nbd --uri="$uri" --rw=randread --bs=4k --iodepth=32 \
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time=1 |
        jq -r '.jobs[0].read.iops'
      ;;
    seqwrite)
      fio_json --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 \
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time=1 |
        jq -r '.jobs[0].write.bw_bytes / 1000000'
      ;;
  esac
}

# One block-device figure: dev_run DEVICE KIND -> value
dev_run() {
  local dev=$1 kind=$2
  case $kind in
    seqwrite)
      fio_json --ioengine=libaio --filename="$dev" --rw=write --bs=1m --iodepth=8 \
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time=1 |
        jq -r '.jobs[0].write.bw_bytes / 1000000'
      ;;
    randwrite4k)
      fio_json --ioengine=libaio --filename="$dev" --rw=randwrite --bs=4k --iodepth=1 \
        --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME" --ramp_time=1 |
        jq -r '.jobs[0].write.iops'
      ;;
  esac
}

# ---------------------------------------------------------------- set up
if [ -n "${ENGINE_BIN:-}" ]; then
  engine=$ENGINE_BIN
else
  log "building the release binary"
  cargo build --release -q -p twinvol-engine --manifest-path "$top/Cargo.toml"
  engine=$CARGO_TARGET_DIR/release/twinvol-engine
fi

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"/{pool-a,pool-b,fuse}
size=$((SIZE_MIB * 1024 * 1024))

# ready_value FILE KEY: a value from a process's ready file.
ready_value() { sed -n "s/^$2=//p" "$1"; }

log "starting two replicas and the frontend (loopback)"
printf 'twinvol-bench-secret-0123456789abcdef\n' >"$BENCH_DIR/secret"
replica_args=()
for r in a b; do
  "$engine" volume create --pool "$BENCH_DIR/pool-$r" --volume bench --size "$size" >/dev/null
  "$engine" replica --pool "$BENCH_DIR/pool-$r" --listen 127.0.0.1:0 \
    --secret-file "$BENCH_DIR/secret" --ready-file "$BENCH_DIR/replica-$r.ready" \
    2>"$BENCH_DIR/replica-$r.log" &
  pids+=($!)
  wait_for 30 "replica $r" test -s "$BENCH_DIR/replica-$r.ready"
  replica_args+=(--replica "$r=$(ready_value "$BENCH_DIR/replica-$r.ready" listen)")
done
"$engine" frontend --volume bench --local a --epoch 1 --secret-file "$BENCH_DIR/secret" \
  "${replica_args[@]}" --nbd-unix "$BENCH_DIR/tv.sock" \
  --fuse-dir "$BENCH_DIR/fuse" --fuse-file-name volume \
  --ready-file "$BENCH_DIR/frontend.ready" 2>"$BENCH_DIR/frontend.log" &
TV_FRONTEND_PID=$!
pids=("$TV_FRONTEND_PID" "${pids[@]}") # stopped first
wait_for 30 "the frontend" test -s "$BENCH_DIR/frontend.ready"
TV_NBD_URI="nbd+unix:///?socket=$BENCH_DIR/tv.sock"
TV_FUSE_FILE=$(ready_value "$BENCH_DIR/frontend.ready" fuse_file)

log "starting qemu-nbd on a raw file (cache=none)"
fallocate -l "$size" "$BENCH_DIR/qemu.img"
qemu-nbd -f raw --cache=none --aio=native --shared=8 --persistent \
  --socket="$BENCH_DIR/qemu.sock" "$BENCH_DIR/qemu.img" &
pids+=($!)
wait_for 20 "qemu-nbd's socket" test -S "$BENCH_DIR/qemu.sock"
QEMU_URI="nbd+unix:///?socket=$BENCH_DIR/qemu.sock"

# Both NBD targets hold data everywhere before anything is measured, so
# reads hit written blocks on both.
log "preconditioning both NBD targets (one full sequential write)"
for uri in "$TV_NBD_URI" "$QEMU_URI"; do
  fio_json --ioengine=nbd --uri="$uri" --rw=write --bs=1m --iodepth=8 --size="${SIZE_MIB}m" >/dev/null
done

# ---------------------------------------------------------------- NBD
declare -A fig
for kind in lat4k randread seqwrite; do
  for target in twinvol qemu; do
    uri=$TV_NBD_URI
    [ "$target" = qemu ] && uri=$QEMU_URI
    means=() p99s=() vals=()
    for _ in $(seq "$RUNS"); do
      out=$(nbd_run "$uri" "$kind")
      if [ "$kind" = lat4k ]; then
        means+=("${out% *}")
        p99s+=("${out#* }")
      else
        vals+=("$out")
      fi
    done
    if [ "$kind" = lat4k ]; then
      fig[$target.mean]=$(median "${means[@]}")
      fig[$target.p99]=$(median "${p99s[@]}")
    else
      fig[$target.$kind]=$(median "${vals[@]}")
    fi
    log "nbd $kind $target done"
  done
done

# ---------------------------------------------------------------- RSS
# peak_rss FIO-ARGS...: runs fio, prints the frontend's peak RSS (KiB) meanwhile.
peak_rss() {
  local peak=0 rss fio_pid
  fio_json "$@" >/dev/null &
  fio_pid=$!
  while kill -0 "$fio_pid" 2>/dev/null; do
    rss=$(awk '/VmRSS/ {print $2}' "/proc/$TV_FRONTEND_PID/status")
    ((rss > peak)) && peak=$rss
    sleep 0.2
  done
  wait "$fio_pid"
  echo "$peak"
}

log "frontend RSS at QD 128 over NBD (4k random read/write, 1M writes, 1M reads)"
rss_peak=0
for job in randrw:4k write:1m randread:1m; do
  rss=$(peak_rss --ioengine=nbd --uri="$TV_NBD_URI" --rw="${job%:*}" --bs="${job#*:}" \
    --iodepth=128 --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME")
  ((rss > rss_peak)) && rss_peak=$rss
done
fig[rss_mib]=$(echo "scale=1; $rss_peak / 1024" | bc)

# ---------------------------------------------------------------- FUSE + loop
log "FUSE + loop device against loop on a plain file"
fallocate -l "$size" "$BENCH_DIR/plain.img"
plain_dev=$(losetup --find --show --direct-io=on "$BENCH_DIR/plain.img")
loops+=("$plain_dev")
fuse_dev=$(losetup --find --show --direct-io=on "$TV_FUSE_FILE")
loops+=("$fuse_dev")
for dev in "$plain_dev" "$fuse_dev"; do
  fio_json --ioengine=libaio --filename="$dev" --rw=write --bs=1m --iodepth=8 --size="${SIZE_MIB}m" >/dev/null
done
for kind in seqwrite randwrite4k; do
  for target in fuse plain; do
    dev=$fuse_dev
    [ "$target" = plain ] && dev=$plain_dev
    vals=()
    for _ in $(seq "$RUNS"); do vals+=("$(dev_run "$dev" "$kind")"); done
    fig[$target.$kind]=$(median "${vals[@]}")
    log "loop $kind $target done"
  done
done

log "frontend RSS at QD 128 through the FUSE loop device (1M writes, 1M reads)"
rss_peak=0
for rw in write randread; do
  rss=$(peak_rss --ioengine=libaio --filename="$fuse_dev" --rw="$rw" --bs=1m \
    --iodepth=128 --size="${SIZE_MIB}m" --time_based --runtime="$RUNTIME")
  ((rss > rss_peak)) && rss_peak=$rss
done
fig[fuse_rss_mib]=$(echo "scale=1; $rss_peak / 1024" | bc)

# ---------------------------------------------------------------- report
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
disk=$(df --output=source "$BENCH_DIR" | tail -1)
rota=$(lsblk -ndo ROTA "$disk" 2>/dev/null | tr -d ' ' || echo "?")
cat <<EOF
### $(date -u +%Y-%m-%d\ %H:%M) UTC — $(nproc) CPUs, $mem, kernel $(uname -r), disk $disk (rotational=$rota)

Medians of $RUNS runs of ${RUNTIME}s over a ${SIZE_MIB} MiB volume.

| figure | twinvol | peer | ratio | target | met |
|---|---|---|---|---|---|
EOF
row() { # row NAME TV PEER RATIO TARGET-EXPR(ratio) TARGET-TEXT
  local met=no
  if [ "$(echo "$4 $5" | bc -l)" = 1 ]; then met=yes; fi
  echo "| $1 | $2 | $3 | $4 | $6 | $met |"
}
r=$(ratio "${fig[twinvol.mean]}" "${fig[qemu.mean]}")
row "4k randwrite QD1 mean latency (µs)" "$(num "${fig[twinvol.mean]}")" "$(num "${fig[qemu.mean]}")" "$r" "<= 1.3" "≤ 1.3× qemu-nbd"
r=$(ratio "${fig[twinvol.p99]}" "${fig[qemu.p99]}")
echo "| 4k randwrite QD1 p99 latency (µs) | $(num "${fig[twinvol.p99]}") | $(num "${fig[qemu.p99]}") | $r | (reported) | — |"
r=$(ratio "${fig[twinvol.randread]}" "${fig[qemu.randread]}")
row "4k randread QD32 (IOPS)" "$(num "${fig[twinvol.randread]}")" "$(num "${fig[qemu.randread]}")" "$r" ">= 0.9" "≥ 0.9× qemu-nbd"
r=$(ratio "${fig[twinvol.seqwrite]}" "${fig[qemu.seqwrite]}")
row "1M seq write QD8 (MB/s)" "$(num "${fig[twinvol.seqwrite]}")" "$(num "${fig[qemu.seqwrite]}")" "$r" ">= 0.45" "≥ 0.45× qemu-nbd"
r=$(ratio "${fig[fuse.seqwrite]}" "${fig[plain.seqwrite]}")
row "FUSE+loop 1M seq write QD8 (MB/s) vs plain loop" "$(num "${fig[fuse.seqwrite]}")" "$(num "${fig[plain.seqwrite]}")" "$r" ">= 0.5" "≥ 0.5× plain loop"
r=$(ratio "${fig[fuse.randwrite4k]}" "${fig[plain.randwrite4k]}")
row "FUSE+loop 4k randwrite QD1 (IOPS) vs plain loop" "$(num "${fig[fuse.randwrite4k]}")" "$(num "${fig[plain.randwrite4k]}")" "$r" ">= 0.8" "≥ 0.8× plain loop"
met=no
[ "$(echo "${fig[rss_mib]} <= 64" | bc -l)" = 1 ] && met=yes
echo "| frontend peak RSS at QD128 over NBD (MiB) | ${fig[rss_mib]} | | | ≤ 64 MiB | $met |"
met=no
[ "$(echo "${fig[fuse_rss_mib]} <= 64" | bc -l)" = 1 ] && met=yes
echo "| frontend peak RSS at QD128 via FUSE+loop (MiB) | ${fig[fuse_rss_mib]} | | | ≤ 64 MiB | $met |"
