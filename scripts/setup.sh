#!/usr/bin/env bash
# One-time, idempotent set-up shared by the README's two commands:
#   1. Debian packages (libraries we build with: yaml-cpp, sentencepiece, nlohmann-json, CLI11, gtest;
#      fmt comes header-only with LibTorch)
#   2. a Python virtual environment with the pinned torch (its LibTorch is what we link) and the
#      reference libraries the tests compare against.
# Caches live outside the clone, keyed by what they depend on, so a fresh clone reuses them:
#   $QLORA_CACHE (default ~/.cache/qlora)/venv-<hash of requirements.txt + python version>
#   $QLORA_CACHE/ccache
# Source this file; it exports QLORA_PYTHON (the venv's python), CCACHE_DIR and QLORA_CACHE.
set -euo pipefail
_here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export QLORA_CACHE="${QLORA_CACHE:-$HOME/.cache/qlora}"
mkdir -p "$QLORA_CACHE"

_log() { printf '[setup] %s\n' "$*" >&2; }

# --- 1. Debian packages -------------------------------------------------------------------------
_debs=(build-essential cmake ninja-build ccache python3-venv libyaml-cpp-dev libsentencepiece-dev
       nlohmann-json3-dev libcli11-dev libgtest-dev)
_missing=()
for p in "${_debs[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || _missing+=("$p"); done
if ((${#_missing[@]})); then
  _log "installing Debian packages: ${_missing[*]}"
  _sudo=""; [ "$(id -u)" = 0 ] || _sudo="sudo"
  $_sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $_sudo apt-get install -y -qq "${_missing[@]}" >/dev/null
fi

# --- 2. Python virtual environment --------------------------------------------------------------
_pybase="${QLORA_BASE_PYTHON:-python3}"
_pyver="$("$_pybase" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
_key="$( (cat "$_here/requirements.txt"; echo "$_pyver") | sha256sum | cut -c1-12)"
_venv="$QLORA_CACHE/venv-py$_pyver-$_key"
if [ ! -f "$_venv/.complete" ]; then
  _log "creating $_venv (first run only: downloads torch and the reference libraries)"
  rm -rf "$_venv"
  "$_pybase" -m venv "$_venv"
  "$_venv/bin/python" -m pip install -q --upgrade pip
  "$_venv/bin/python" -m pip install -q -r "$_here/requirements.txt"
  touch "$_venv/.complete"
fi
export QLORA_PYTHON="$_venv/bin/python"

# --- 3. Compiler cache --------------------------------------------------------------------------
export CCACHE_DIR="${CCACHE_DIR:-$QLORA_CACHE/ccache}"
export CCACHE_MAXSIZE="${CCACHE_MAXSIZE:-5G}"
# Torch headers are found through the venv, whose path is stable per key: let ccache hit across clones.
export CCACHE_BASEDIR="${CCACHE_BASEDIR:-$(cd "$_here/.." && pwd)}"
export CCACHE_NOHASHDIR=1
# The shared precompiled header must not defeat ccache.
export CCACHE_SLOPPINESS="${CCACHE_SLOPPINESS:-pch_defines,time_macros,include_file_mtime,include_file_ctime}"
