#!/bin/sh
# SPDX-License-Identifier: Apache-2.0
# Builds the libFuzzer targets (clang, -fsanitize=fuzzer,address,undefined) and runs each for a
# bounded time.
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

status=0
for target in safetensors peft_config; do
  bin="$BUILD/fuzz_$target"
  echo "== building fuzz_$target with $CXX"
  "$CXX" -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
    -fno-omit-frame-pointer -I"$INCLUDE" -isystem /usr/include/eigen3 \
    "$HERE/fuzz_$target.cpp" -o "$bin"
  mkdir -p "$BUILD/corpus/$target"
  echo "== running fuzz_$target for ${SECONDS_PER_TARGET}s"
  if ! "$bin" "$BUILD/corpus/$target" "$HERE/corpus/$target" \
        -dict="$HERE/$target.dict" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 \
        -artifact_prefix="$BUILD/crashes/${target}-"; then
    echo "!! fuzz_$target found a failure; inputs in $BUILD/crashes/" >&2
    status=1
  fi
done
exit $status
