#!/usr/bin/env bash
# The GPU check: one line per check of what the shim does on a CUDA vLLM (ci/gpu_check.py says which).
# Usage: bash ci/gpu_check.sh [--dry-run] [--only CHECK,...]
# Needs one GPU and a CUDA vLLM already installed in $PYTHON's environment (default: python3; the
# workflow's gpu job installs vllm==0.33.0). --dry-run runs the same checks on the CPU (CI does,
# through tests/tools/test_gpu_check.py). The tiny models are the committed tests/golden/models
# (ci/build_models.py rebuilds them bit for bit). Budget: under 8 minutes on one GPU.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
# vllm 0.33.0 (CUDA) has no recorded green verify run (vllm_compat/versions.py, VERIFIED): the check warns
# about that instead of refusing (it is how such a record is made).
export VLLM_COMPAT_UNVERIFIED="${VLLM_COMPAT_UNVERIFIED:-warn}"
exec timeout 480 "${PYTHON:-python3}" "$root/ci/gpu_check.py" "$@"
