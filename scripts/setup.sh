#!/usr/bin/env bash
# Create (or update) the project's virtual environment in .venv and check that torch and torchvision
# import together. `--test` also installs the test tools. Safe to run again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python3}"
requirements=requirements.txt
[ "${1:-}" = "--test" ] && requirements=requirements-test.txt
if [ ! -x .venv/bin/python ]; then
  "$python_bin" -m venv .venv
fi
stamp=".venv/.installed-$(cat requirements.txt requirements-test.txt "$requirements" | sha256sum | cut -c1-16)-$(basename "$requirements" .txt)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -r "$requirements"
  touch "$stamp"
fi
.venv/bin/python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}, cuda available: {torch.cuda.is_available()}')"
