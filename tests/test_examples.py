"""The examples run to completion on the tiny model, as a user would run them (own process,
default VLLM_COMPAT selection, multiprocess engine); each exits non-zero when its check
fails, and the server example is also run against stock V1 to show that check can fail."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_COMPAT") and k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # conftest's test settings
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("extra", [(), ("--support-replay",)], ids=["T=1", "top-p, support replay"])
def test_async_rl_loop(extra):
    proc = run_example(str(EXAMPLES / "async_rl_loop.py"), "--steps", "3", *extra)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 3 updates" in proc.stdout
    if extra:
        assert "support replay: 0 sequences" in proc.stdout


@pytest.mark.parametrize("compat, meaning", [("all", "V0 meaning"), ("off", "raw model distribution")])
def test_server_logprobs(compat, meaning):
    proc = run_example(str(EXAMPLES / "server_logprobs.py"), "--compat", compat)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert meaning in proc.stdout
