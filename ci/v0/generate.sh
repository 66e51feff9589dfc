#!/usr/bin/env bash
# Regenerate the golden V0 fixtures with the real vLLM 0.8.5 V0 engine, or check that a
# regeneration reproduces the committed files byte for byte.
#   bash ci/v0/generate.sh            # writes tests/golden/fixtures/*.json
#   bash ci/v0/generate.sh --check    # regenerates into a temp dir and compares sha256
# The V0 environment comes from ci/v0/install.sh (V0_VENV, default .venv-v0).
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${V0_VENV:-$root/.venv-v0}"
check=0; [ "${1:-}" = "--check" ] && check=1
[ -x "$venv/bin/python" ] || bash "$root/ci/v0/install.sh" "$venv"
out="$root/tests/golden/fixtures"
[ $check = 1 ] && out="$(mktemp -d)"
# VLLM_COMPAT=off: vllm_compat is imported for its instruments only (it refuses vLLM 0.8.5 otherwise).
export VLLM_USE_V1=0 VLLM_CPU_KVCACHE_SPACE=1 PYTHONHASHSEED=0 VLLM_COMPAT=off
start=$(date +%s)
pairs=$(cd "$root" && "$venv/bin/python" -c \
  'from vllm_compat.golden.scenarios import REFERENCES as R; print(" ".join(f"{m}:{r}" for m in R for r in R[m]))' \
  | tail -n 1)  # the last line: importing vllm_compat imports vllm, whose logger writes to stdout
for pair in $pairs; do
  # One process per file: the fp32-head patch must not leak into the stock run.
  "$venv/bin/python" "$root/ci/v0/generate_fixtures.py" --out "$out" --reference "${pair#*:}" "${pair%%:*}"
done
echo "generated in $(( $(date +%s) - start ))s -> $out"
if [ $check = 1 ]; then
  status=0
  for f in "$out"/*.json "$out"/wide/*.json; do
    [ -e "$f" ] || continue
    name=${f#"$out"/}
    if cmp -s "$f" "$root/tests/golden/fixtures/$name"; then
      echo "identical: $name $(sha256sum "$f" | cut -c1-16)"
    else
      echo "DIFFERENT: $name"; status=1
    fi
  done
  exit $status
fi
