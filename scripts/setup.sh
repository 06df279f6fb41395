#!/usr/bin/env bash
# Set up prefopt in a virtual environment at .venv/ in the repo root (idempotent; fast when done).
#
#   bash scripts/setup.sh
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0): a bare `torch`
# requirement on a fresh machine resolves to a multi-GB CUDA build. On our machines pip finds
# the 2.13.0 CPU wheel on local disk. Elsewhere, point TORCH_INDEX_URL at PyTorch's CPU wheel
# index (…/whl/cpu) for a CPU build, or at a CUDA index for a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
  "${PIP[@]}" "$TORCH_SPEC" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
# Editable, with the test/peer/plot extras: the tests compare against TRL and transformers.
"${PIP[@]}" -e ".[test,peer,plot]"

# `tune run recipes/<name>.py` imports the module `recipes.<name>`. torchtune's wheel installs a
# top-level `recipes` package whose __init__.py only raises an error, and it would shadow this
# repo's recipes/ package. torchtune runs its own recipes by file path and never imports that
# package, so we remove just that one file (see docs/tune_run.md).
.venv/bin/python -m prefopt.tune_compat
