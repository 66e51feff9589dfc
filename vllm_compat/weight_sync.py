"""V0-style in-flight weight updates (first slice: ``LLM``; files and in-memory tensors).

V0-era RL code loaded new weights between two engine steps on every worker, with no abort
and no cache reset: running requests continue on their KV cache with the new weights. This
module does the same on V1, atomically:

  1. the weights are materialised once as a safetensors file (tensors do not survive an RPC
     to another process as tensors), or an existing file/directory is used as it is;
  2. every worker validates every name, shape and dtype against its model's checkpoint
     BEFORE anything is loaded: on any problem, nothing changes and a WeightUpdateError
     lists the problems;
  3. every worker loads (vLLM's in-place ``reload_weights`` where it exists, which also
     re-runs weight post-processing such as CPU weight packing) and refreshes derived state
     (a tied head's packed copy; the fp32 head reads the live weight and needs nothing).

Each step is one ``collective_rpc``, which the engine core runs between two steps, so a
step never sees half-updated weights. Calls on one engine are serialised.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Iterable, Union

import torch

Weights = Union[str, os.PathLike, Iterable[tuple[str, torch.Tensor]], dict]


class WeightUpdateError(ValueError):
    """The update was refused before any weight changed."""


_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def _lock_for(engine) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(engine, threading.Lock())


def _materialise(weights: Weights) -> tuple[str, str | None]:
    """-> (path the workers can read, temp dir to delete afterwards or None)."""
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.exists():
            raise WeightUpdateError(f"{path}: no such file or directory")
        return str(path), None
    from safetensors.torch import save_file

    tensors = dict(weights.items() if isinstance(weights, dict) else weights)
    bad = [n for n, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise WeightUpdateError(f"not tensors: {bad[:5]}")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # RAM-backed where available
    tmp = tempfile.mkdtemp(prefix="vllm-compat-weights-", dir=shm)
    path = os.path.join(tmp, "update.safetensors")
    cpu, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # tied weights share storage; safetensors wants distinct tensors
            t = t.clone()
        seen.add(t.data_ptr())
        cpu[name] = t
    save_file(cpu, path)
    return path, tmp


def _refuse_if_problems(reports: list[list[str]]) -> None:
    problems = [p for worker in reports for p in worker]
    if problems:
        raise WeightUpdateError("weight update refused, nothing changed:\n  " + "\n  ".join(problems[:20]))


def update_weights(engine, weights: Weights):
    """Load ``weights`` into every worker V0 style; returns the number of tensors loaded per
    worker. ``engine``: ``LLM`` (blocking) or ``AsyncLLM`` (returns an awaitable; requests
    in flight keep running and continue with the new weights). ``weights``: (HF name,
    tensor) pairs, a dict, or a safetensors file or directory."""
    if hasattr(engine, "llm_engine"):  # LLM: blocking
        with _lock_for(engine):
            path, tmp = _materialise(weights)
            try:
                _refuse_if_problems(engine.collective_rpc("vllm_compat_check_weights", args=(path,)))
                return engine.collective_rpc("vllm_compat_load_weights", args=(path,))[0]
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
    return _update_async(engine, weights)


_async_locks: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()


async def _update_async(engine, weights: Weights) -> int:
    import asyncio

    lock = _async_locks.setdefault(engine, asyncio.Lock())
    async with lock:
        path, tmp = await asyncio.to_thread(_materialise, weights)
        try:
            _refuse_if_problems(await engine.collective_rpc("vllm_compat_check_weights", args=(path,)))
            return (await engine.collective_rpc("vllm_compat_load_weights", args=(path,)))[0]
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)


# ---- worker side (called through CompatWorkerExtension) --------------------------------

def _files(path: str) -> list[Path]:
    p = Path(path)
    return sorted(p.glob("*.safetensors")) if p.is_dir() else [p]


def _headers(files: list[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _tied(worker) -> bool:
    return bool(getattr(worker.model_config.hf_config, "tie_word_embeddings", False))


def check_weights(worker, path: str) -> list[str]:
    """Problems with an update for this worker's model, judged against the checkpoint the
    model was loaded from (names, shapes; dtypes must be floating point)."""
    reference = _headers(_files(worker.model_config.model))
    try:
        update = _headers(_files(path))
    except Exception as e:  # unreadable / corrupt file
        return [f"{path}: {type(e).__name__}: {e}"]
    problems = []
    for name, (shape, dtype) in update.items():
        if name == "lm_head.weight" and _tied(worker) and name not in reference:
            continue  # tied head: the embedding carries it
        if name not in reference:
            problems.append(f"{name}: not a weight of this model")
        elif shape != reference[name][0]:
            problems.append(f"{name}: shape {list(shape)} != {list(reference[name][0])}")
        elif not dtype.startswith(("F", "BF")):
            problems.append(f"{name}: dtype {dtype} is not floating point")
    return problems


def load_weights(worker, path: str) -> int:
    from safetensors.torch import load_file

    tensors = {}
    for f in _files(path):
        tensors.update(load_file(str(f)))
    if _tied(worker):
        tensors.pop("lm_head.weight", None)
    runner = worker.model_runner
    if hasattr(runner, "reload_weights"):
        runner.reload_weights(weights_iterator=iter(tensors.items()))
    else:
        runner.model.load_weights(tensors.items())
    _refresh_derived(runner.model)
    return len(tensors)


def _refresh_derived(model) -> None:
    """A tied lm_head shares the embedding's weight, but on CPU its packed GEMM copy is made
    from it once and the layerwise reload does not revisit the head: re-pack it."""
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head is embed or getattr(head, "weight", None) is not embed.weight:
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
