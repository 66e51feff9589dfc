"""What driving an update over HTTP costs: POST /vllm_compat/update_weights {"path": ...} on an idle
`vllm serve` (client wall time) vs ``await vllm_compat.update_weights(engine, path)`` on an
in-process AsyncLLM with its engine core in its own process (as in the server). Same model, same
file, one engine at a time; prints the median of N runs of each.

    PYTHONPATH=. python ci/serve_overhead.py [--runs 10]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests/golden/models/llama-fp32"
UPDATE = ROOT / "tests/golden/models/llama-fp32-update/model.safetensors"


def http_runs(runs: int) -> list[float]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, VLLM_COMPAT="all", VLLM_CPU_KVCACHE_SPACE="1")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(MODEL), "--dtype", "float32",
           "--max-model-len", "512", "--skip-tokenizer-init", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        times = []
        for i in range(runs + 1):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/vllm_compat/update_weights",
                                         data=json.dumps({"path": str(UPDATE)}).encode(),
                                         headers={"Content-Type": "application/json"})
            t = time.perf_counter()
            with urllib.request.urlopen(req, timeout=120) as r:
                assert r.status == 200
                json.load(r)
            if i:  # the first one reads the checkpoint's headers for validation: warm-up
                times.append(time.perf_counter() - t)
        return times
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def in_process_runs(runs: int) -> list[float]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm_compat
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm_compat.apply()

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(MODEL), dtype="float32", skip_tokenizer_init=True,
                                                           max_model_len=512))
        try:
            times = []
            for i in range(runs + 1):
                t = time.perf_counter()
                await vllm_compat.update_weights(engine, str(UPDATE))
                if i:
                    times.append(time.perf_counter() - t)
            return times
        finally:
            engine.shutdown()

    return asyncio.run(main())


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--only", choices=["http", "in_process"])
    args = ap.parse_args()
    out = {}
    if args.only != "in_process":
        out["http"] = http_runs(args.runs)
    if args.only != "http":
        out["in_process"] = in_process_runs(args.runs)
    for k, v in out.items():
        print(f"{k}: median {statistics.median(v) * 1e3:.1f} ms over {len(v)} runs "
              f"(min {min(v) * 1e3:.1f}, max {max(v) * 1e3:.1f})", flush=True)
