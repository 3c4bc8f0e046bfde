#!/usr/bin/env bash
# The test executables of the workspace build:
#   test-exe.sh <crate directory> <test target>    the path of one (test-exe.sh e2e site_loss)
#   test-exe.sh --list                             every one: crate directory name, its
#                                                  path, target kind and name, executable
#                                                  (tab-separated; e2e/tools/test-lanes.sh)
# Builds the workspace's tests if they are not built (`cargo test --workspace
# --no-run`), and nothing else: `cargo test -p <crate>` would resolve the
# dependencies' features for that crate alone and compile dozens of them again.
# Run an executable in its crate's directory, as cargo does:
#   (cd e2e && CARGO_MANIFEST_DIR=$PWD "$(e2e/tools/test-exe.sh e2e site_loss)" --nocapture)
set -euo pipefail
usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
err=${TMPDIR:-/tmp}/test-exe.$$.err
list() {
  if ! cargo test --workspace --no-run --message-format=json 2>"$err" |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .profile.test)
      | (.manifest_path | sub("/Cargo.toml$"; "")) as $dir
      | [($dir | split("/") | last), $dir, ((.target.kind | join(",")) + " " + .target.name), .executable]
      | @tsv'; then
    cat "$err" >&2
    rm -f "$err"
    return 1
  fi
  rm -f "$err"
}
case $# in
  1) [ "$1" = --list ] || usage; list ;;
  2) exe=$(list | awk -F'\t' -v dir="$top/$1" -v name="$2" '$2 == dir && $3 ~ (" " name "$") { print $4 }')
     [ -n "$exe" ] && [ -x "$exe" ] || { echo "test-exe: no test $2 in $1" >&2; exit 1; }
     echo "$exe" ;;
  *) usage ;;
esac
