#!/usr/bin/env bash
# The Python environment of the tests: a virtual environment (first
# argument, default .venv) with numpy, ml_dtypes and pytest, plus torch when
# QKV_TORCH=1 (CI sets it; the torch tests skip without it), and the qkv
# package installed from python/ around the library in the build folder
# (second argument, default build).
set -euo pipefail
venv=${1:-.venv}
build=${2:-build}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv" 2>/dev/null || {
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv
    python3 -m venv "$venv"
  }
fi
py="$venv/bin/python"
"$py" -c "import numpy, ml_dtypes, pytest, setuptools, wheel" 2>/dev/null ||
  "$py" -m pip install -q --disable-pip-version-check numpy ml_dtypes pytest setuptools wheel
if [ "${QKV_TORCH:-0}" = 1 ] && ! "$py" -c "import torch" 2>/dev/null; then
  "$py" -m pip install -q --disable-pip-version-check torch
fi
QKV_LIBRARY="$(cd "$build" && pwd)/libqkv.so" "$py" -m pip install -q --disable-pip-version-check \
  --no-build-isolation --no-deps --force-reinstall ./python >/dev/null
rm -rf python/build python/*.egg-info
