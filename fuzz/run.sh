#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer targets (clang, -fsanitize=fuzzer,address,undefined) and runs them side by
# side for a bounded time.
#
#   fuzz/run.sh [SECONDS_PER_TARGET]      (default 60)
#
# Environment: CXX (default clang++-14, else clang++), BUILD (default build-fuzz next to fuzz/),
# LOWRANK_INCLUDE (default include/ of this checkout). New interesting inputs go to
# $BUILD/corpus/<target> (the seeds in fuzz/corpus/ are only read); a crash leaves its input in
# $BUILD/crashes/ and makes this script fail. Keep every crash as a regression test: copy the input
# to tests/data/fuzz_regressions/<safetensors|peft_config>/ (tests/test_safetensors.cpp and
# tests/test_peft.cpp read every file there) and fix the reader.
set -eu
SECONDS_PER_TARGET=${1:-60}
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(dirname "$HERE")
BUILD=${BUILD:-$ROOT/build-fuzz}
INCLUDE=${LOWRANK_INCLUDE:-$ROOT/include}
if [ -z "${CXX:-}" ]; then
  if command -v clang++-14 >/dev/null 2>&1; then CXX=clang++-14; else CXX=clang++; fi
fi
mkdir -p "$BUILD/crashes"

# The two targets are built, then run, side by side (one core each): CI waits SECONDS once, not twice.
build_target() {
  "$CXX" -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer -I"$INCLUDE" -isystem /usr/include/eigen3 \
    "$HERE/fuzz_$1.cpp" -o "$BUILD/fuzz_$1"
}
run_target() {
  mkdir -p "$BUILD/corpus/$1"
  "$BUILD/fuzz_$1" "$BUILD/corpus/$1" "$HERE/corpus/$1" \
    -dict="$HERE/$1.dict" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$BUILD/crashes/$1-" >"$BUILD/fuzz_$1.log" 2>&1
}

echo "== building fuzz_safetensors and fuzz_peft_config with $CXX"
build_target safetensors & b1=$!
build_target peft_config & b2=$!
wait $b1
wait $b2

echo "== running both targets for ${SECONDS_PER_TARGET}s"
status=0
run_target safetensors & r1=$!
run_target peft_config & r2=$!
wait $r1 || { echo "!! fuzz_safetensors found a failure; inputs in $BUILD/crashes/" >&2; status=1; }
wait $r2 || { echo "!! fuzz_peft_config found a failure; inputs in $BUILD/crashes/" >&2; status=1; }
for target in safetensors peft_config; do
  echo "== fuzz_$target (last lines of $BUILD/fuzz_$target.log)"
  tail -n 12 "$BUILD/fuzz_$target.log"
done
exit $status
