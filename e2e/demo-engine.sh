#!/usr/bin/env bash
# The twinvol demo, engine level (`bash e2e/demo.sh --engine`; e2e/demo.sh
# alone is the demo on a Kubernetes cluster): two "sites" as network
# namespaces, a replica server in each, a mirroring frontend on the host
# exporting the volume as a FUSE file, a loop device and an ext4 filesystem
# on it, a file-backed arbiter holding the in-sync set and
# the frontend's lease. It writes files, cuts site A's link and keeps writing
# (the frontend swaps A out through the arbiter and goes on with B alone),
# brings A back (B copies only the dirty regions to A, with progress), and
# ends by checking that both sites hold byte-identical copies and that site
# A's copy alone passes fsck with the same files.
#
# Needs root (network namespaces, FUSE, loop devices). Cleans up everything it
# created, also when interrupted.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/.." && pwd)
export TWINVOL_CACHE=${TWINVOL_CACHE:-/var/cache/twinvol}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$TWINVOL_CACHE/cargo-target}
SIZE=${TWINVOL_DEMO_SIZE:-4G}

t_start=$(date +%s.%N)
step() { printf '\n[%6.1fs] == %s\n' "$(echo "$(date +%s.%N) - $t_start" | bc)" "$*"; }
say() { printf '           %s\n' "$*"; }

[ "$(id -u)" -eq 0 ] || { echo "demo-engine: run as root (network namespaces, FUSE, loop devices)" >&2; exit 2; }

step "installing what the demo needs (idempotent)"
bash "$here/tools/install-deps.sh" >/dev/null
step "building twinvol-engine (release)"
(cd "$top" && cargo build --release -q -p twinvol-engine)
engine="$CARGO_TARGET_DIR/release/twinvol-engine"

work=$(mktemp -d /tmp/twinvol-demo.XXXXXX)
pids=()
loopdev=""
cleanup() {
  set +e
  mountpoint -q "$work/mnt" && umount "$work/mnt"
  mountpoint -q "$work/check" && umount "$work/check"
  [ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
  mountpoint -q "$work/fuse" && umount -l "$work/fuse"
  for s in a b; do
    ip netns del "tvdemo-$s" 2>/dev/null
    ip link del "tvdemo-$s" 2>/dev/null
  done
  ip link del tvdemo-br 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

step "creating two sites: network namespaces tvdemo-a and tvdemo-b on a bridge"
ip link del tvdemo-br 2>/dev/null || true
ip link add tvdemo-br type bridge
ip addr add 10.77.0.1/24 dev tvdemo-br
ip link set tvdemo-br up
for s in a b; do
  n=$([ "$s" = a ] && echo 2 || echo 3)
  ip netns del "tvdemo-$s" 2>/dev/null || true
  ip link del "tvdemo-$s" 2>/dev/null || true
  ip netns add "tvdemo-$s"
  ip link add "tvdemo-$s" type veth peer name eth0 netns "tvdemo-$s"
  ip link set "tvdemo-$s" master tvdemo-br up
  ip -n "tvdemo-$s" addr add "10.77.0.$n/24" dev eth0
  ip -n "tvdemo-$s" link set eth0 up
  ip -n "tvdemo-$s" link set lo up
  say "site $s: replica host 10.77.0.$n (veth tvdemo-$s on bridge tvdemo-br; the host is 10.77.0.1)"
done

step "creating volume 'demo' ($SIZE) in each site's pool and starting the replica servers"
head -c 32 /dev/urandom | base64 > "$work/secret"
for s in a b; do
  n=$([ "$s" = a ] && echo 2 || echo 3)
  mkdir -p "$work/pool-$s"
  "$engine" volume create --pool "$work/pool-$s" --volume demo --size "$SIZE"
  if [ "$s" = a ]; then peer=b=10.77.0.3:7700; else peer=a=10.77.0.2:7700; fi
  ip netns exec "tvdemo-$s" "$engine" replica --pool "$work/pool-$s" \
    --listen "10.77.0.$n:7700" --secret-file "$work/secret" --peer "$peer" \
    --ready-file "$work/ready-$s" 2>"$work/replica-$s.log" &
  pids+=($!)
done
wait_for() { # file, seconds
  local deadline=$(( $(date +%s) + $2 ))
  while [ ! -s "$1" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "demo-engine: timed out waiting for $1" >&2; tail -n 20 "$work"/*.log >&2; exit 1; }
    sleep 0.1
  done
}
wait_for "$work/ready-a" 20
wait_for "$work/ready-b" 20
say "both replicas serving"

step "creating the arbiter record (in-sync set {a, b}), starting the frontend on the host"
"$engine" arbiter create --path "$work/arbiter.json" --replica a --replica b >/dev/null
mkdir -p "$work/fuse" "$work/mnt"
"$engine" frontend --volume demo --replica a=10.77.0.2:7700 --replica b=10.77.0.3:7700 \
  --local a --secret-file "$work/secret" --arbiter "$work/arbiter.json" --frontend-id demo-host \
  --fuse-dir "$work/fuse" \
  --metrics-listen 127.0.0.1:0 --ready-file "$work/ready-fe" 2>"$work/frontend.log" &
pids+=($!)
wait_for "$work/ready-fe" 30
fuse_file=$(sed -n 's/^fuse_file=//p' "$work/ready-fe")
metrics=$(sed -n 's/^metrics=//p' "$work/ready-fe")
say "volume file: $fuse_file (lease held, reads from site a)"
"$engine" arbiter show --path "$work/arbiter.json" | sed 's/^/           /'

step "loop device (direct I/O) over the FUSE file, mkfs.ext4, mount"
loopdev=$(losetup --direct-io=on --show -f "$fuse_file")
say "block device: $loopdev"
mkfs.ext4 -q -F "$loopdev"
mount "$loopdev" "$work/mnt"

step "writing files through the mirror"
t0=$(date +%s.%N)
mkdir -p "$work/mnt/records"
for i in $(seq 1 200); do head -c 65536 /dev/urandom > "$work/mnt/records/r$i"; done
dd if=/dev/urandom of="$work/mnt/big" bs=1M count=64 oflag=direct status=none
sync
(cd "$work/mnt" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$work/sums"
say "$(find "$work/mnt" -type f | wc -l) files, $(du -sh "$work/mnt" | cut -f1), in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
if [ -n "$metrics" ]; then
  say "frontend metrics (http://$metrics/metrics):"
  curl -s "http://$metrics/metrics" 2>/dev/null | grep -E '^twinvol_frontend_io_bytes_total.*op="Write"' | head -4 | sed 's/^/             /' || true
fi

step "SITE A GOES DARK: cutting its link (ip link set tvdemo-a down), writing on"
ip link set tvdemo-a down
t0=$(date +%s.%N)
mkdir -p "$work/mnt/during-outage"
for i in $(seq 1 100); do head -c 65536 /dev/urandom > "$work/mnt/during-outage/r$i"; done
dd if=/dev/urandom of="$work/mnt/during-outage/big" bs=1M count=16 oflag=direct status=none
sync
say "wrote 100 files + 16 MiB with site a unreachable, in $(printf '%.1f' "$(echo "$(date +%s.%N) - $t0" | bc)") s"
grep -h -i 'writes resumed on the survivor' "$work/frontend.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 2 | cut -c1-220 | sed 's/^/           frontend: /'
"$engine" arbiter show --path "$work/arbiter.json" | sed 's/^/           /'

step "SITE A RETURNS: link up; site b resyncs the regions a missed; a catches up and rejoins"
ip link set tvdemo-a up
status="$work/pool-b/demo/resync-status.json"
resync_done() {
  [ -s "$status" ] && [ "$(jq -r '.state + " " + (.remaining_bytes|tostring)' "$status" 2>/dev/null)" = "done 0" ]
}
deadline=$(( $(date +%s) + 180 ))
seen=0
until resync_done; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "demo-engine: resync did not finish in 180 s" >&2; tail -n 20 "$work/replica-b.log" >&2; exit 1; }
  n=$(grep -c 'resync demo' "$work/replica-b.log" || true)
  if [ "$n" -gt "$seen" ]; then
    grep 'resync demo' "$work/replica-b.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n +$((seen + 1)) | grep -o 'resync demo.*' | cut -c1-160 | sed 's/^/           /'
    seen=$n
  fi
  sleep 0.2
done
say "$(jq -r '"resync " + .state + ": copied " + ((.copied_bytes/1048576*10|floor)/10|tostring) + " MiB in " + (.elapsed_ms|tostring) + " ms" + (if .full_copy then " (FULL copy: " + .full_copy + ")" else "" end)' "$status") of a $SIZE volume"
say "(only the 64 KiB regions written while a was dark; new writes reached a directly meanwhile)"
"$engine" volume status --pool "$work/pool-b" --volume demo | sed 's/^/           /'
deadline=$(( $(date +%s) + 120 ))
until "$engine" arbiter show --path "$work/arbiter.json" | grep -q '^in_sync: a,b$'; do
  [ "$(date +%s)" -lt "$deadline" ] || { echo "demo-engine: site a did not rejoin the in-sync set in 120 s" >&2; tail -n 20 "$work/frontend.log" >&2; exit 1; }
  sleep 0.2
done
grep -h 'replica back in the in-sync set' "$work/frontend.log" | sed 's/\x1b\[[0-9;]*m//g' | tail -n 1 | grep -o 'replica back.*' | cut -c1-160 | sed 's/^/           frontend: /'
"$engine" arbiter show --path "$work/arbiter.json" | sed 's/^/           /'
mkdir -p "$work/mnt/after-return"
for i in $(seq 1 20); do head -c 262144 /dev/urandom > "$work/mnt/after-return/f$i"; done
sync
say "wrote 20 more files: every write reaches both sites again"

step "unmounting, stopping the frontend, comparing the two sites' copies"
umount "$work/mnt"
losetup -d "$loopdev"; loopdev=""
kill "${pids[2]}"; wait "${pids[2]}" 2>/dev/null || true
a="$work/pool-a/demo/data"; b="$work/pool-b/demo/data"
if cmp -s "$a" "$b"; then
  say "site a and site b data files are byte-identical ($(stat -c %s "$a") bytes, sha256 $(sha256sum "$a" | cut -c1-16)…)"
else
  echo "demo-engine: the two copies DIFFER — this is a bug" >&2
  cmp "$a" "$b" | head -3 >&2
  exit 1
fi
la=$(losetup --read-only --show -f "$a")
if ! fsck_out=$(fsck.ext4 -fn "$la" 2>&1); then echo "$fsck_out" >&2; losetup -d "$la"; exit 1; fi
mkdir -p "$work/check"
mount -o ro,noload "$la" "$work/check"
before=$(grep -c . "$work/sums")
if (cd "$work/check" && sha256sum --quiet -c "$work/sums"); then
  say "site a's copy alone passes fsck.ext4 -fn; its $before files written before the outage have the same checksums"
else
  umount "$work/check"; losetup -d "$la"; echo "demo-engine: files differ on site a's copy" >&2; exit 1
fi
say "and it holds the $(find "$work/check/during-outage" -type f | wc -l) files written while it was dark"
umount "$work/check"; losetup -d "$la"
printf '\n[%6.1fs] engine demo finished: fail-over with no acknowledged write lost, resync of what changed, automatic rejoin, identical copies.\n' "$(echo "$(date +%s.%N) - $t_start" | bc)"
