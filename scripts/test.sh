#!/usr/bin/env bash
# The README's test command: set-up (idempotent), build, then every test through ctest.
# Tests that need a GPU skip themselves on machines without one. Extra arguments go to ctest
# (e.g. scripts/test.sh -R llama).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
BUILD="${QLORA_BUILD_DIR:-build}"
JOBS="${QLORA_JOBS:-$(nproc)}"
cmake -S . -B "$BUILD" -G Ninja -DQLORA_PYTHON="$QLORA_PYTHON" >/dev/null
ninja -C "$BUILD" -j "$JOBS"
ctest --test-dir "$BUILD" --output-on-failure -j "$JOBS" "$@"
