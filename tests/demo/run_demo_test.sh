#!/usr/bin/env bash
# ctest's demo_end_to_end (tests/demo/CMakeLists.txt): the demo pipeline on the built binary
# ($QLORA_CLI) in a new temporary directory, removed when the demo passes and kept (its path printed) when
# it fails. Extra demo settings pass through (QLORA_DEMO_SEED, QLORA_DEMO_PRETRAIN_SET, ...).
set -euo pipefail
: "${QLORA_CLI:?}" "${QLORA_PYTHON:?}" "${QLORA_SOURCE_DIR:?}"
work="$(mktemp -d "${TMPDIR:-/tmp}/qlora-demo.XXXXXX")"
if QLORA_DEMO_WORKDIR="$work" bash "$QLORA_SOURCE_DIR/scripts/demo.sh" --no-build; then
  rm -rf "$work"
else
  rc=$?
  echo "demo failed (exit $rc); its outputs are kept in $work/runs/demo" >&2
  exit "$rc"
fi
