#!/usr/bin/env bash
# Set up a virtual environment in .venv with medanomaly installed (editable) and its dependencies.
#   bash scripts/setup.sh          # for running detection
#   bash scripts/setup.sh --test   # also the test dependencies (pytest, hypothesis, scikit-learn, slicer-core)
# TORCH_SPEC chooses the torch build (default torch==2.13.0, the CPU build this project is tested with; on a GPU
# machine install the CUDA build of your choice first, or set TORCH_SPEC).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install "${TORCH_SPEC:-torch==2.13.0}"
fi
extra=""
if [ "${1:-}" = "--test" ]; then extra="[test]"; fi
"${PIP[@]}" install -e ".${extra}"
.venv/bin/python -c "import medanomaly, torch; print(f'medanomaly {medanomaly.__version__} ready (torch {torch.__version__})')"
