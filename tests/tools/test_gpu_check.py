"""ci/gpu_check.sh as CI runs it: the dry run on the CPU. Every check passes with the shim (the
CUDA-only one skips), and the same checks fail on stock V1, so the GPU run can fail too."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
ROOT = Path(__file__).resolve().parents[2]


def _run(compat: str, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, VLLM_COMPAT=compat, PYTHON=sys.executable)
    env.pop("VLLM_COMPAT_ACTIVE", None)
    return subprocess.run(["bash", str(ROOT / "ci/gpu_check.sh"), "--dry-run", *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def _lines(proc) -> dict[str, str]:
    return {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()
            if line.split() and line.split()[0] in ("PASS", "FAIL", "SKIP", "INFO")}


def test_dry_run_passes_with_the_shim():
    proc = _run("all")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert _lines(proc) == {"paths": "PASS", "sampled_logprobs": "PASS", "prompt_logprobs": "PASS",
                            "seeded_replay": "PASS", "graphs_vs_eager": "SKIP", "update_paths": "PASS",
                            "update_memory": "INFO", "ray_tp2": "SKIP"}, proc.stdout


def test_stock_v1_fails_the_same_checks():
    proc = _run("off", "--only", "paths,sampled_logprobs,seeded_replay")
    assert proc.returncode == 1
    assert _lines(proc) == {"paths": "FAIL", "sampled_logprobs": "FAIL", "seeded_replay": "FAIL"}, proc.stdout
