#!/usr/bin/env bash
# Benchmark (not a test): resync after a replica loss, issue 5 "Benchmark".
# Release build of twinvol-engine, two replicas and a frontend with a
# file-backed arbiter on loopback, NBD export on a unix socket, a 4 GiB volume.
#
# How replica a goes out (OUTAGE):
#   stop (default): SIGSTOP: a stops answering, as behind a cut link (the
#        frontend's --replica-timeout, 1 s, then the swap); it comes back
#        with SIGCONT, its process and activity log intact;
#   kill: kill -9, and it comes back by a restart on its pool and address.
#        Known today: when the writes before the loss touched 256 or more
#        4 MiB extents, the restarted replica recovers a full activity log,
#        keeps those extents pinned until a frontend reconciles them (not
#        built yet) and accepts no write to any other extent, so the resync
#        to it stops; the script then fails after STALL s without a copied
#        byte and says so.
#
# 1. Dirty resync, for each dirty fraction (0.1 %, 1 %, 10 % of the 64 KiB
#    regions), RUNS times on a fresh stack:
#      - fio writes 4k at random over the whole volume for PRE_RUNTIME s with
#        both replicas in sync (a volume in use: this fills the replicas'
#        activity logs, 256 extents of 4 MiB);
#      - replica a goes out; one 4k write through the frontend makes it swap
#        a out through the arbiter (b is told by PeerState, starts tracking);
#      - qemu-io writes one 4k block into each of N distinct random regions
#        (N = fraction x regions; the first of them was the fail-over write);
#        "dirtied" = N x 64 KiB, computed here from these offsets, not read
#        from the engine;
#      - replica a comes back; b resyncs to it by itself; the script waits
#        for b's <pool>/bench/resync-status.json to say state "done" and
#        reads copied_bytes and elapsed_ms (the engine's copy time, from the
#        first region to the last), and times the wall clock from a's return
#        (which includes b's retry backoff after failed attempts, up to 5 s);
#      - both data files are compared (cmp): they must be identical.
# 2. Full copy, RUNS times: the engine's full resync of a replaced replica.
#    After a's loss (as above, b tracks a), the frontend stops, a's volume is
#    deleted and created blank, and a new replica "c" serves it at a's
#    address (b runs with --peer c=ADDR); a new arbiter record {c, b}, a new
#    frontend, c goes out and one write: b is told that c left while its
#    bitmap tracks a, so it marks every region dirty ("a replaced replica")
#    and copies the whole volume to c when c is back. Timed as in 1.
# 3. Foreground latency, RUNS times, on the same full-copy setup: fio 4k
#    random writes QD 1 for LAT_RUNTIME s (p99 completion latency) with c
#    out and nothing copying ("idle": b alone, the same write path), then
#    again while the full resync to c runs (checked to run the whole time),
#    and, before c's loss, with both replicas in sync. Ratios against both
#    baselines: during the resync the frontend sends writes to b and c (the
#    catch-up), as when in sync; with c out, to b alone.
# 4. I/O pause at replica loss, PAUSE_REPS times on a fresh stack (always
#    kill -9): fio 4k random writes QD 1 with a per-I/O completion log;
#    kill -9 replica a PAUSE_KILL_AT s in; pause = the longest gap between
#    two consecutive completions (ms). The frontend's own "pause_ms" log
#    figure is shown next to it.
#
# Medians over the runs; prints a Markdown section for docs/benchmarks.md.
# Needs root, fio, qemu-io, jq, bc, awk (bash e2e/tools/install-deps.sh).
# Fails (non-zero) on any error; leaves no process or file behind.
#
# Usage: benches/resync.sh
#   env: BENCH_DIR (on the disk to measure; default /var/tmp/twinvol-resync-bench),
#        SIZE_MIB (4096), RUNS (3), FRACTIONS ("0.1 1 10", percent),
#        PRE_RUNTIME (4 s; 0: none), LAT_RUNTIME (8 s), PAUSE_REPS (15),
#        OUTAGE (stop | kill), STALL (90 s),
#        PARTS (any of "dirty full latency pause"; default all),
#        ENGINE_BIN (a prebuilt release twinvol-engine; default: build one),
#        KEEP=1 (on failure, keep BENCH_DIR with the logs)
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
BENCH_DIR=${BENCH_DIR:-/var/tmp/twinvol-resync-bench}
SIZE_MIB=${SIZE_MIB:-4096}
RUNS=${RUNS:-3}
FRACTIONS=${FRACTIONS:-"0.1 1 10"}
PRE_RUNTIME=${PRE_RUNTIME:-4}
LAT_RUNTIME=${LAT_RUNTIME:-8}
PAUSE_REPS=${PAUSE_REPS:-15}
PAUSE_RUNTIME=4
PAUSE_KILL_AT=1.5
OUTAGE=${OUTAGE:-stop}
PARTS=${PARTS:-"dirty full latency pause"}
STALL=${STALL:-90}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/twinvol-bench-target}

REGION=65536
SIZE=$((SIZE_MIB * 1024 * 1024))
NREGIONS=$((SIZE / REGION))
VOL=bench
URI="nbd+unix:///?socket=$BENCH_DIR/nbd.sock"
STATUS=$BENCH_DIR/pool-b/$VOL/resync-status.json

case $OUTAGE in stop | kill) ;; *) echo "resync bench: OUTAGE is stop or kill" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "resync bench: run as root" >&2; exit 2; }
for tool in fio qemu-io jq bc awk cmp; do
  command -v "$tool" >/dev/null || { echo "resync bench: $tool missing (bash e2e/tools/install-deps.sh)" >&2; exit 2; }
done

declare -A procs=() # name -> pid of what runs now
frontend_n=0

stop_proc() { # stop_proc NAME SIGNAL: signal it, reap it (SIGKILL after 20 s)
  local pid=${procs[$1]:-} i
  [ -n "$pid" ] || return 0
  # (stderr closed: bash's "Killed" job notice is no news here)
  {
    kill "-$2" "$pid" || true
    for i in $(seq 200); do
      kill -0 "$pid" || break
      [ "$i" -lt 200 ] || kill -KILL "$pid" || true
      sleep 0.1
    done
    wait "$pid" || true
  } 2>/dev/null
  unset "procs[$1]"
}

cleanup() {
  local rc=$?
  set +e
  # The frontend first (it flushes on its way out), then the replicas.
  stop_proc frontend TERM
  for n in "${!procs[@]}"; do stop_proc "$n" KILL; done
  if [ "$rc" -ne 0 ] && [ -d "$BENCH_DIR" ]; then
    echo "resync bench: FAILED (exit $rc); last lines of the logs:" >&2
    for f in "$BENCH_DIR"/*.log; do
      [ -f "$f" ] && { echo "----- $f" >&2; tail -n 15 "$f" >&2; }
    done
  fi
  if [ "$rc" -ne 0 ] && [ "${KEEP:-0}" = 1 ]; then
    echo "resync bench: KEEP=1: left $BENCH_DIR for a look (remove it yourself)" >&2
  else
    rm -rf "$BENCH_DIR"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log() { echo "resync bench: $*" >&2; }
die() { echo "resync bench: $*" >&2; exit 1; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2
  local deadline=$((SECONDS + secs))
  shift 2
  until "$@" 2>/dev/null; do
    ((SECONDS < deadline)) || die "timed out after $secs s waiting for $what"
    sleep 0.05
  done
}

median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
# Nearest-rank percentile P of the arguments.
percentile() {
  local p=$1
  shift
  printf '%s\n' "$@" | sort -g | awk -v p="$p" '{v[NR]=$1} END {i=int((p*NR+99)/100); if (i<1) i=1; print v[i]}'
}
calc() { echo "scale=6; $*" | bc -l; }
fmt() { printf "%.${2:-2}f" "$1"; }
now() { date +%s.%N; }
list2() { printf '%.2f, ' "$@" | sed 's/, $//'; } # "1.00, 2.00"

ready_value() { sed -n "s/^$2=//p" "$BENCH_DIR/$1.ready"; }
has_ready() { [ -s "$BENCH_DIR/$1.ready" ]; }
alive() { kill -0 "${procs[$1]}" 2>/dev/null; }

start_ready() { # start_ready NAME COMMAND...: runs it, waits for its ready file
  local name=$1
  shift
  rm -f "$BENCH_DIR/$name.ready"
  "$@" --ready-file "$BENCH_DIR/$name.ready" >>"$BENCH_DIR/$name.log" 2>&1 &
  procs[$name]=$!
  local deadline=$((SECONDS + 30))
  until has_ready "$name"; do
    alive "$name" || die "$name exited before it was ready"
    ((SECONDS < deadline)) || die "$name not ready within 30 s"
    sleep 0.05
  done
}

start_replica() { # start_replica NAME POOL LISTEN EXTRA...
  local name=$1 pool=$2 listen=$3
  shift 3
  start_ready "$name" "$engine" replica --pool "$pool" --listen "$listen" \
    --secret-file "$BENCH_DIR/secret" "$@"
}

start_frontend() { # start_frontend REPLICA-SPEC... (NAME=ADDR)
  local args=() r
  for r in "$@"; do args+=(--replica "$r"); done
  frontend_n=$((frontend_n + 1))
  rm -f "$BENCH_DIR/nbd.sock"
  start_ready frontend "$engine" frontend --volume "$VOL" --local b \
    --secret-file "$BENCH_DIR/secret" --arbiter "$BENCH_DIR/arbiter.json" \
    --frontend-id "bench-$frontend_n" "${args[@]}" --nbd-unix "$BENCH_DIR/nbd.sock"
}

new_arbiter() { # new_arbiter REPLICA REPLICA
  rm -f "$BENCH_DIR/arbiter.json"
  "$engine" arbiter create --path "$BENCH_DIR/arbiter.json" --replica "$1" --replica "$2" >/dev/null
}

out_of_sync() { # out_of_sync NAME: the arbiter has NAME out of the in-sync set
  "$engine" arbiter show --path "$BENCH_DIR/arbiter.json" | grep -qx "out_of_sync: $1"
}

new_volume() { # new_volume SITE: a blank volume in the site's pool
  rm -rf "$BENCH_DIR/pool-$1/$VOL"
  mkdir -p "$BENCH_DIR/pool-$1"
  "$engine" volume create --pool "$BENCH_DIR/pool-$1" --volume "$VOL" --size "$SIZE" >/dev/null
}

# stack_up PEER: fresh volumes, arbiter {a, b}, replica a, replica b (which
# resyncs to PEER at a's address), frontend. Sets ADDR_A, ADDR_B.
stack_up() {
  new_volume a
  new_volume b
  new_arbiter a b
  start_replica a "$BENCH_DIR/pool-a" 127.0.0.1:0
  ADDR_A=$(ready_value a listen)
  start_replica b "$BENCH_DIR/pool-b" 127.0.0.1:0 --peer "$1=$ADDR_A"
  ADDR_B=$(ready_value b listen)
  start_frontend "a=$ADDR_A" "b=$ADDR_B"
}

stack_down() {
  stop_proc frontend TERM
  local n
  for n in "${!procs[@]}"; do stop_proc "$n" KILL; done
  rm -rf "$BENCH_DIR/pool-a" "$BENCH_DIR/pool-b" "$BENCH_DIR"/*.log "$BENCH_DIR"/*.ready
}

# qemu_io_writes FILE: runs the qemu-io commands of FILE (one write a line)
# against the frontend; fails unless every write completed.
qemu_io_writes() {
  local want got out
  want=$(grep -c . "$1")
  out=$(qemu-io -f raw "$URI" <"$1") || die "qemu-io failed: $(grep -m1 failed <<<"$out")"
  got=$(grep -c 'wrote [0-9]' <<<"$out" || true)
  [ "$got" -eq "$want" ] || die "qemu-io: $got of $want writes completed"
}

# lose REPLICA OFFSET: takes REPLICA out (OUTAGE), then one 4k write at
# OFFSET; returns once the arbiter has REPLICA out of sync (the write was
# held until then).
lose() {
  case $OUTAGE in
    stop) kill -STOP "${procs[$1]}" ;;
    kill) stop_proc "$1" KILL ;;
  esac
  printf 'write -P 0x5a %d 4k\n' "$2" >"$BENCH_DIR/trigger.cmds"
  qemu_io_writes "$BENCH_DIR/trigger.cmds"
  wait_for 30 "the arbiter to take $1 out of sync" out_of_sync "$1"
}

fio_json() { # fio_json FIO-ARGS...: fio's JSON report of one job
  local out=$BENCH_DIR/fio.json
  fio --output-format=json --output="$out" --name=bench --direct=1 --group_reporting \
    --randrepeat=0 --norandommap --ioengine=nbd --uri="$URI" "$@" >&2
  cat "$out"
}

# p99_4k_write SECONDS: p99 completion latency (µs) of 4k random writes QD 1.
p99_4k_write() {
  fio_json --rw=randwrite --bs=4k --iodepth=1 --size="$SIZE" --time_based \
    --runtime="$1" --lat_percentiles=1 |
    jq -r '.jobs[0].write.lat_ns.percentile["99.000000"] / 1000'
}

status_field() { jq -r ".$1" "$STATUS"; }
# Done: a copy attempt ended with nothing dirty ("done"; the state moves on to
# "idle" once the frontend has returned the peer to the in-sync set).
resync_done() { [ -s "$STATUS" ] && jq -e '.completed >= 1 and .remaining_bytes == 0' "$STATUS" >/dev/null; }
resync_copying() { [ -s "$STATUS" ] && [ "$(jq -r .state "$STATUS")" = copying ]; }

# bring_back NAME: replica NAME (on pool-a at ADDR_A) answers again.
bring_back() {
  case $OUTAGE in
    stop) kill -CONT "${procs[$1]}" ;;
    kill) start_replica "$1" "$BENCH_DIR/pool-a" "$ADDR_A" ;;
  esac
}

# return_and_resync NAME: brings replica NAME back, waits for b's resync to
# be done (failing when no byte was copied for STALL s); sets WALL_MS.
return_and_resync() {
  local t0 copied last=-1 since=$SECONDS
  t0=$(now)
  bring_back "$1"
  until resync_done; do
    copied=$(jq -r .copied_bytes "$STATUS" 2>/dev/null || echo -1)
    if [ "$copied" != "$last" ]; then
      last=$copied
      since=$SECONDS
    fi
    ((SECONDS - since < STALL)) ||
      die "the resync to $1 copied nothing for $STALL s ($(jq -c '{state, copied_bytes, remaining_bytes}' "$STATUS" 2>/dev/null)); see b.log and $1.log"
    sleep 0.05
  done
  WALL_MS=$(fmt "$(calc "($(now) - $t0) * 1000")" 0)
}

check_identical() {
  cmp -s "$BENCH_DIR/pool-a/$VOL/data" "$BENCH_DIR/pool-b/$VOL/data" ||
    die "the replicas' data files differ after the resync"
}

# full_copy_setup: a stack where b must copy the whole volume to a replaced
# replica c (at a's address, down) once c starts. Leaves c down.
full_copy_setup() {
  stack_up c
  lose a 0
  stop_proc frontend TERM
  stop_proc a KILL
  new_volume a
  new_arbiter c b
  start_replica c "$BENCH_DIR/pool-a" "$ADDR_A"
  start_frontend "c=$ADDR_A" "b=$ADDR_B"
}

# ---------------------------------------------------------------- set up
if [ -n "${ENGINE_BIN:-}" ]; then
  engine=$ENGINE_BIN
else
  log "building the release binary"
  cargo build --release -q -p twinvol-engine --manifest-path "$top/Cargo.toml"
  engine=$CARGO_TARGET_DIR/release/twinvol-engine
fi
[ -x "$engine" ] || die "no engine binary at $engine"

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
printf 'twinvol-resync-bench-secret-0123456789abcdef\n' >"$BENCH_DIR/secret"
bench_start=$SECONDS

# ---------------------------------------------------------------- 1. dirty resync
part() { [[ " $PARTS " == *" $1 "* ]]; }
declare -A fig=()
part dirty || FRACTIONS=""
for frac in $FRACTIONS; do
  n=$(awk -v f="$frac" -v r="$NREGIONS" 'BEGIN {n=int(f*r/100+0.5); if (n<1) n=1; print n}')
  ratios=() times=() walls=() extras=() copies=()
  for run in $(seq "$RUNS"); do
    log "dirty $frac %: run $run/$RUNS ($n regions)"
    stack_up a
    if [ "$PRE_RUNTIME" != 0 ]; then
      fio_json --rw=randwrite --bs=4k --iodepth=1 --size="$SIZE" --time_based \
        --runtime="$PRE_RUNTIME" >/dev/null
    fi
    # N distinct regions (seeded: the same set for a fraction and a run),
    # one 4k write in each, at a varying 4k slot. (%.0f, not %d: awk's %d
    # stops at 2^31.)
    awk -v n="$n" -v max="$NREGIONS" -v seed="$run$n" -v region="$REGION" 'BEGIN {
      srand(seed); c = 0
      while (c < n) { r = int(rand() * max); if (!(r in s)) { s[r] = 1; printf "write -P %d %.0f 4k\n", c % 250 + 1, r * region + (c % 16) * 4096; c++ } }
    }' >"$BENCH_DIR/dirty.cmds"
    # Dirtied: the 64 KiB regions these writes touch, from their offsets.
    dirtied=$(awk -v region="$REGION" '{
      for (r = int($4 / region); r <= int(($4 + 4095) / region); r++) if (!(r in s)) { s[r] = 1; k++ }
    } END { printf "%.0f\n", k * region }' "$BENCH_DIR/dirty.cmds")
    first=$(awk 'NR == 1 {print $4}' "$BENCH_DIR/dirty.cmds")
    lose a "$first"
    tail -n +2 "$BENCH_DIR/dirty.cmds" >"$BENCH_DIR/rest.cmds"
    [ ! -s "$BENCH_DIR/rest.cmds" ] || qemu_io_writes "$BENCH_DIR/rest.cmds"
    return_and_resync a
    copied=$(status_field copied_bytes)
    [ -z "$(status_field 'full_copy // empty')" ] || die "unexpected full copy: $(status_field full_copy)"
    check_identical
    ratios+=("$(calc "$copied / $dirtied")")
    copies+=("$copied")
    extras+=("$((copied - dirtied))")
    times+=("$(status_field elapsed_ms)")
    walls+=("$WALL_MS")
    log "  dirtied $dirtied B, copied $copied B (at start: $(status_field dirty_bytes_at_start) B), copy $(status_field elapsed_ms) ms, wall $WALL_MS ms"
    stack_down
  done
  fig[$frac.n]=$n
  fig[$frac.dirtied]=$dirtied
  fig[$frac.copied]=$(median "${copies[@]}")
  fig[$frac.ratio]=$(median "${ratios[@]}")
  fig[$frac.ratios]=$(list2 "${ratios[@]}")
  fig[$frac.extra]=$(median "${extras[@]}")
  fig[$frac.ms]=$(median "${times[@]}")
  fig[$frac.wall]=$(median "${walls[@]}")
done

# ---------------------------------------------------------------- 2. full copy
full_ms=() full_wall=()
part full || full_ms=(0) full_wall=(0)
for run in $(part full && seq "$RUNS"); do
  log "full copy: run $run/$RUNS"
  full_copy_setup
  lose c 0
  return_and_resync c
  [ "$(status_field copied_bytes)" -eq "$SIZE" ] || die "full copy copied $(status_field copied_bytes) of $SIZE bytes"
  [ -n "$(status_field 'full_copy // empty')" ] || die "the status does not say it was a full copy"
  full_why=$(status_field full_copy)
  check_identical
  full_ms+=("$(status_field elapsed_ms)")
  full_wall+=("$WALL_MS")
  log "  full copy $(status_field elapsed_ms) ms, wall $WALL_MS ms ($full_why)"
  stack_down
done
fig[full.ms]=$(median "${full_ms[@]}")
fig[full.wall]=$(median "${full_wall[@]}")

# ---------------------------------------------------------------- 3. latency
lat_ratios=() lat_sync_ratios=() lat_idle=() lat_during=() lat_sync=()
part latency || lat_ratios=(0) lat_idle=(0) lat_during=(0) lat_sync=(0)
for run in $(part latency && seq "$RUNS"); do
  log "foreground latency: run $run/$RUNS"
  full_copy_setup
  lat_sync+=("$(p99_4k_write "$LAT_RUNTIME")")
  lose c 0
  idle=$(p99_4k_write "$LAT_RUNTIME")
  bring_back c
  wait_for 30 "the full resync to start copying" resync_copying
  during=$(p99_4k_write "$LAT_RUNTIME")
  # Still in the first pass (later passes copy what fio wrote meanwhile).
  [ "$(status_field completed)" = 0 ] || die "the full resync ended before the ${LAT_RUNTIME} s fio run did: lower LAT_RUNTIME"
  lat_idle+=("$idle")
  lat_during+=("$during")
  lat_ratios+=("$(calc "$during / $idle")")
  lat_sync_ratios+=("$(calc "$during / ${lat_sync[-1]}")")
  log "  p99 in sync ${lat_sync[-1]} µs, idle (b alone) $idle µs, during resync $during µs"
  stack_down
done
fig[lat.sync]=$(median "${lat_sync[@]}")
fig[lat.idle]=$(median "${lat_idle[@]}")
fig[lat.during]=$(median "${lat_during[@]}")
fig[lat.ratio]=$(median "${lat_ratios[@]}")
fig[lat.ratios]=$(list2 "${lat_ratios[@]}")
fig[lat.sratio]=$(median "${lat_sync_ratios[@]}")
fig[lat.sratios]=$(list2 "${lat_sync_ratios[@]}")

# ---------------------------------------------------------------- 4. pause
gaps=() fe_pauses=()
part pause || gaps=(0) fe_pauses=(0)
for rep in $(part pause && seq "$PAUSE_REPS"); do
  stack_up a
  rm -f "$BENCH_DIR"/pause_*.log
  fio --name=pause --direct=1 --randrepeat=0 --norandommap --ioengine=nbd --uri="$URI" \
    --rw=randwrite --bs=4k --iodepth=1 --size="$SIZE" --time_based --runtime="$PAUSE_RUNTIME" \
    --write_lat_log="$BENCH_DIR/pause" --log_avg_msec=0 --output=/dev/null &
  procs[fio]=$!
  sleep "$PAUSE_KILL_AT"
  stop_proc a KILL
  pid=${procs[fio]}
  unset "procs[fio]"
  wait "$pid" || die "fio failed across the replica loss"
  wait_for 10 "the arbiter to have a out of sync" out_of_sync a
  # Column 1: completion time (ms since the job started).
  gap=$(awk -F, 'NR > 1 && $1 - p > g {g = $1 - p} {p = $1} END {print g + 0}' "$BENCH_DIR"/pause_clat.1.log)
  fe=$(grep -o 'pause_ms=[0-9]*' "$BENCH_DIR/frontend.log" | head -1 | cut -d= -f2)
  [ -n "$fe" ] || die "the frontend logged no fail-over"
  gaps+=("$gap")
  fe_pauses+=("$fe")
  # How long the frontend took to suspect a after it saw the connection go.
  lost=$(grep -m1 'connection to replica lost' "$BENCH_DIR/frontend.log" | cut -d' ' -f1)
  suspect=$(grep -m1 'replica did not answer' "$BENCH_DIR/frontend.log" | cut -d' ' -f1)
  detect="?"
  if [ -n "$lost" ] && [ -n "$suspect" ]; then
    detect=$(fmt "$(calc "($(date -d "$suspect" +%s.%N) - $(date -d "$lost" +%s.%N)) * 1000")" 0)
  fi
  log "pause $rep/$PAUSE_REPS: longest gap $gap ms (frontend: $fe ms; connection loss seen -> replica suspected: $detect ms)"
  stack_down
done
fig[pause.p50]=$(percentile 50 "${gaps[@]}")
fig[pause.p99]=$(percentile 99 "${gaps[@]}")
fig[pause.fe50]=$(percentile 50 "${fe_pauses[@]}")
fig[pause.fe99]=$(percentile 99 "${fe_pauses[@]}")

# ---------------------------------------------------------------- report
met() { if [ "$(echo "$1" | bc -l)" = 1 ]; then echo met; else echo "NOT met"; fi; }
mib() { fmt "$(calc "$1 / 1048576")" 1; }
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)
disk=$(df --output=source "$BENCH_DIR" | tail -1)
rota=$(lsblk -ndo ROTA "$disk" 2>/dev/null | tr -d ' ' || echo "?")
cat <<EOF
### $(date -u '+%Y-%m-%d %H:%M') UTC — $(nproc) CPUs, $mem, kernel $(uname -r), disk $disk (rotational=$rota), commit $(git -C "$top" rev-parse --short HEAD 2>/dev/null || echo '?')

\`benches/resync.sh\` with SIZE_MIB=$SIZE_MIB RUNS=$RUNS OUTAGE=$OUTAGE PRE_RUNTIME=$PRE_RUNTIME LAT_RUNTIME=$LAT_RUNTIME PAUSE_REPS=$PAUSE_REPS PARTS="$PARTS": medians of $RUNS runs; took $((SECONDS - bench_start)) s.
EOF
if part dirty; then
  cat <<EOF

| dirty | regions written | dirtied (MiB) | copied (MiB) | copied − dirtied (MiB) | copied / dirtied (runs) | target ≤ 1.05 | resync copy (ms) | wall from return (ms) |
|---|---|---|---|---|---|---|---|---|
EOF
  for frac in $FRACTIONS; do
    echo "| $frac % | ${fig[$frac.n]} | $(mib "${fig[$frac.dirtied]}") | $(mib "${fig[$frac.copied]}") | $(mib "${fig[$frac.extra]}") | $(fmt "${fig[$frac.ratio]}") (${fig[$frac.ratios]}) | $(met "${fig[$frac.ratio]} <= 1.05") | ${fig[$frac.ms]} | ${fig[$frac.wall]} |"
  done
fi
printf '\n| figure | value | target | |\n|---|---|---|---|\n'
if part full; then
  echo "| full resync of a replaced replica (${SIZE_MIB} MiB): copy / wall from return (ms) | ${fig[full.ms]} / ${fig[full.wall]} | | |"
  for frac in $FRACTIONS; do
    r=$(calc "${fig[full.ms]} / ${fig[$frac.ms]}")
    t="" m=""
    if [ "$frac" = 1 ]; then t="≥ 50×"; m=$(met "$r >= 50"); fi
    echo "| full copy time / $frac % dirty resync time | $(fmt "$r" 1)× | $t | $m |"
  done
fi
if part latency; then
  cat <<EOF
| p99 4k write QD 1, both in sync (µs) | $(fmt "${fig[lat.sync]}" 0) | | |
| p99 4k write QD 1, replica out, no resync (µs) | $(fmt "${fig[lat.idle]}" 0) | | |
| p99 4k write QD 1, during the full resync (µs) | $(fmt "${fig[lat.during]}" 0) | | |
| p99 during resync / both in sync, no resync (runs: ${fig[lat.sratios]}) | $(fmt "${fig[lat.sratio]}")× | ≤ 1.5× | $(met "${fig[lat.sratio]} <= 1.5") |
| p99 during resync / replica out, no resync (runs: ${fig[lat.ratios]}) | $(fmt "${fig[lat.ratio]}")× | ≤ 1.5× | $(met "${fig[lat.ratio]} <= 1.5") |
EOF
fi
if part pause; then
  cat <<EOF
| I/O pause at replica loss (kill -9), longest completion gap, p50 / p99 of $PAUSE_REPS (ms) | ${fig[pause.p50]} / ${fig[pause.p99]} | < 2000 (issue 5 checks) | $(met "${fig[pause.p99]} < 2000") |
| the frontend's own pause_ms, p50 / p99 (ms) | ${fig[pause.fe50]} / ${fig[pause.fe99]} | | |
EOF
fi
