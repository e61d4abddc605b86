#!/usr/bin/env bash
# Creates the Python environment of the side-by-side benchmark: a virtual
# environment (bench/.venv, or $BENCH_VENV) holding numpy, torch and
# ggml-python from PyPI. Idempotent: what already imports is left alone.
# ggml-python is optional; when it does not install, bench.py skips ggml.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BENCH_VENV:-$root/bench/.venv}"
python="${PYTHON:-python3}"

if [ ! -x "$venv/bin/python" ]; then
  if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup.sh: $python cannot create virtual environments;" \
         "install python3-venv (Debian: apt-get install python3-venv)" >&2
    exit 1
  fi
  echo "setup.sh: creating $venv"
  "$python" -m venv "$venv"
  "$venv/bin/python" -m pip install -q -U pip setuptools ||
    echo "setup.sh: could not upgrade pip; going on with the bundled one" >&2
fi

pip=("$venv/bin/python" -m pip install -q)
imports() { "$venv/bin/python" -c "import $1" >/dev/null 2>&1; }

imports numpy || "${pip[@]}" numpy
# The full wheel with its dependencies: torch does not import without them.
imports torch || "${pip[@]}" torch
if ! imports ggml; then
  "${pip[@]}" ggml-python ||
    echo "setup.sh: ggml-python did not install; the benchmark skips ggml" >&2
fi
echo "setup.sh: $venv ready"
