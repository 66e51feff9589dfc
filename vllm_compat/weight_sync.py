"""Fix 3: V0-style in-flight weight updates.

V0-era RL code blocked the engine between two model steps, loaded the new weights on every
worker and resumed; requests in flight kept their KV cache (no abort, no cache reset) and
continued with the new weights. ``update_weights`` does the same on V1, atomically:

  0. AsyncLLM: pause between steps in keep mode without clearing any cache (vLLM's
     defaults, abort + clear_cache, would abort or re-prefill requests); resumed in a
     ``finally``. Where vLLM has no keep mode, the RPCs below still run between two
     engine-core steps, which is the same blocking.
  1. stage: every worker receives the whole update (transport.py) and validates every
     name, shape and dtype against the checkpoint its model was loaded from. Nothing is
     loaded yet;
  2. if any worker found a problem, every worker drops its batch and WeightUpdateError
     lists the problems: nothing changed;
  3. commit: every worker loads its batch (vLLM's in-place ``reload_weights`` where it
     exists, which re-runs weight post-processing such as CPU weight packing) and
     refreshes derived state (a tied head's packed copy; the fp32 head reads the live
     weight and needs nothing). Each worker loads its own tensor-parallel shard.

Calls on one engine are serialised. What validation cannot catch (a weight loader raising
half-way through step 3) cannot be rolled back either: the error propagates, the engine is
resumed, and the caller should load a complete set of weights again.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Iterable, Union

import torch

from . import transport as tp
from . import versions

Weights = Union[str, os.PathLike, Iterable[tuple[str, torch.Tensor]], dict, tp.TransportSpec, "BroadcastGroup"]


class WeightUpdateError(ValueError):
    """The update was refused before any weight changed."""


@dataclass
class WeightUpdateResult:
    tensors: int  # tensors loaded per worker
    bytes: int  # bytes received per worker
    # request id (as the engine core names it) -> tokens it had sampled with the old weights;
    # its later tokens come from the new ones. Lets a trainer tag tokens with a policy version.
    in_flight: dict[str, int] = field(default_factory=dict)
    paused: bool = False  # whether a keep-mode pause was used (AsyncLLM)
    seconds: dict[str, float] = field(default_factory=dict)  # receive+validate, load, total


@dataclass(frozen=True)
class BroadcastGroup:
    """Engine end of a process group joined with ``join_weight_broadcast``; pass it to
    ``update_weights`` to receive one broadcast from the trainer's WeightBroadcaster."""
    name: str
    world_size: int

    def spec(self) -> tp.TransportSpec:
        return tp.TransportSpec("process_group", {"group": self.name})


# ---- client side ----------------------------------------------------------------------

def _is_async(engine) -> bool:
    return not hasattr(engine, "llm_engine")  # LLM wraps an LLMEngine; AsyncLLM is the engine


def _engine_world_size(engine) -> int:
    config = engine.llm_engine.vllm_config if hasattr(engine, "llm_engine") else engine.vllm_config
    return config.parallel_config.world_size


def _spec(weights: Weights):
    """-> (TransportSpec, cleanup)."""
    if isinstance(weights, BroadcastGroup):
        return weights.spec(), lambda: None
    if isinstance(weights, tp.TransportSpec):
        return weights, lambda: None
    try:
        return tp.file_spec(weights)
    except (FileNotFoundError, TypeError) as e:
        raise WeightUpdateError(f"weight update refused, nothing changed: {e}") from None


def _problems(reports: list[list[str]]) -> list[str]:
    return sorted({p for worker in reports for p in worker})


def _refusal(problems: list[str]) -> WeightUpdateError:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return WeightUpdateError("weight update refused, nothing changed:\n  " + "\n  ".join(problems[:20]) + more)


def _result(commits: list[dict], t0: float, t1: float, paused: bool) -> WeightUpdateResult:
    t2 = time.perf_counter()
    first = commits[0]
    return WeightUpdateResult(first["tensors"], first["bytes"], first["in_flight"], paused,
                              {"receive_validate": t1 - t0, "load": t2 - t1, "total": t2 - t0})


_sync_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_async_locks: "weakref.WeakKeyDictionary[object, asyncio.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def update_weights(engine, weights: Weights):
    """Load ``weights`` into every worker, V0 style. ``engine``: ``LLM`` (blocks; call it
    between ``generate`` calls or ``llm_engine.step()`` calls) or ``AsyncLLM`` (returns an
    awaitable; requests in flight keep running and continue with the new weights).
    ``weights``: (HF name, tensor) pairs, a dict, a safetensors file or directory, a
    ``BroadcastGroup`` from ``join_weight_broadcast`` (one broadcast from the trainer), or a
    ``TransportSpec`` for a transport of your own. Returns a ``WeightUpdateResult``; raises
    ``WeightUpdateError`` (nothing changed) when any worker refuses the update."""
    if _is_async(engine):
        return _update_async(engine, weights)
    with _locks_guard:
        lock = _sync_locks.setdefault(engine, threading.Lock())
    with lock:
        spec, cleanup = _spec(weights)
        try:
            t0 = time.perf_counter()
            staged = engine.collective_rpc("vllm_compat_stage_weights", args=spec.as_rpc_args())
            problems = _problems(staged)
            if problems:
                engine.collective_rpc("vllm_compat_drop_weights")
                raise _refusal(problems)
            t1 = time.perf_counter()
            return _result(engine.collective_rpc("vllm_compat_commit_weights"), t0, t1, False)
        finally:
            cleanup()


async def _update_async(engine, weights: Weights) -> WeightUpdateResult:
    lock = _async_locks.setdefault(engine, asyncio.Lock())
    async with lock:
        spec, cleanup = await asyncio.to_thread(_spec, weights)
        paused = False
        try:
            if versions.has_keep_mode_pause(engine) and not await engine.is_paused():
                await engine.pause_generation(mode="keep", clear_cache=False)
                paused = True
            t0 = time.perf_counter()
            staged = await engine.collective_rpc("vllm_compat_stage_weights", args=spec.as_rpc_args())
            problems = _problems(staged)
            if problems:
                await engine.collective_rpc("vllm_compat_drop_weights")
                raise _refusal(problems)
            t1 = time.perf_counter()
            return _result(await engine.collective_rpc("vllm_compat_commit_weights"), t0, t1, paused)
        finally:
            try:
                if paused:
                    await engine.resume_generation()
            finally:
                await asyncio.to_thread(cleanup)


def join_weight_broadcast(engine, host: str, port: int, *, backend: str | None = None,
                          timeout: timedelta = timedelta(minutes=10), name: str = "default"):
    """Have every worker of ``engine`` join the trainer's ``WeightBroadcaster`` (ranks
    1..N; the trainer, rank 0, must connect at the same time). Returns a BroadcastGroup
    (an awaitable of one for AsyncLLM). ``backend``: default gloo for CPU workers, NCCL
    for CUDA workers."""
    world_size = 1 + _engine_world_size(engine)
    args = (name, host, port, world_size, backend, timeout.total_seconds())
    group = BroadcastGroup(name, world_size)
    if _is_async(engine):
        async def join():
            await engine.collective_rpc("vllm_compat_join_broadcast", args=args)
            return group
        return join()
    engine.collective_rpc("vllm_compat_join_broadcast", args=args)
    return group


# ---- worker side (called through CompatWorkerExtension) --------------------------------

def _tied(worker) -> bool:
    return bool(getattr(worker.model_config.hf_config, "tie_word_embeddings", False))


def _checkpoint_dir(worker) -> Path:
    model = worker.model_config.model
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download  # a hub id: the snapshot vLLM loaded

    return Path(snapshot_download(model, revision=worker.model_config.revision, local_files_only=True,
                                  allow_patterns=["*.safetensors"],
                                  cache_dir=getattr(worker, "load_config", None) and worker.load_config.download_dir))


def _reference(worker) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of the checkpoint the model was loaded from (cached)."""
    ref = worker.__dict__.get("_vllm_compat_reference")
    if ref is None:
        files = tp.safetensors_files(_checkpoint_dir(worker))
        if not files:
            raise RuntimeError(f"{worker.model_config.model}: no safetensors checkpoint to validate updates against")
        ref = worker.__dict__["_vllm_compat_reference"] = tp.safetensors_headers(files)
    return ref


def validate(worker, meta: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """Problems with an update for this worker's model, judged against its checkpoint:
    every name must exist with the same shape, and carry a floating-point dtype."""
    reference = _reference(worker)
    problems = []
    if not meta:
        problems.append("the update holds no tensors")
    for name, (shape, dtype) in meta.items():
        if name == "lm_head.weight" and _tied(worker) and name not in reference:
            continue  # tied head: the embedding carries it
        if name not in reference:
            problems.append(f"{name}: not a weight of this model")
        elif tuple(shape) != tuple(reference[name][0]):
            problems.append(f"{name}: shape {list(shape)} != {list(reference[name][0])}")
        elif not dtype.is_floating_point:
            problems.append(f"{name}: dtype {str(dtype).removeprefix('torch.')} is not floating point")
    return problems


def stage(worker, transport_name: str, params: dict) -> list[str]:
    """Receive and validate; keep the batch for ``commit`` when there is no problem."""
    worker.__dict__.pop("_vllm_compat_staged", None)
    try:
        received = tp.worker_transport(worker, transport_name, params).receive()
    except Exception as e:  # unreadable / corrupt / missing input: a refusal, not a crash
        return [f"{type(e).__name__}: {e}"]
    problems = validate(worker, received.meta)
    if not versions.has_iterator_reload(worker.model_runner):
        dropped = dropped_weights(worker.model_runner.model)
        if dropped:
            problems.append(f"this vLLM cannot update {', '.join(dropped[:3])}{' ...' if len(dropped) > 3 else ''} in "
                            "place: its GEMM weights were packed and the originals dropped, and its "
                            "reload_weights() cannot take tensors (it arrived in vLLM 0.18)")
    if not problems:
        worker.__dict__["_vllm_compat_staged"] = received
    return problems


def drop(worker) -> None:
    worker.__dict__.pop("_vllm_compat_staged", None)


def commit(worker) -> dict:
    received: tp.Received | None = worker.__dict__.pop("_vllm_compat_staged", None)
    if received is None:
        raise RuntimeError("vllm_compat: commit without a staged update")
    tensors = dict(received.tensors)
    if _tied(worker):
        tensors.pop("lm_head.weight", None)
    runner = worker.model_runner
    in_flight = {rid: len(state.output_token_ids) for rid, state in getattr(runner, "requests", {}).items()}
    load_in_place(runner, tensors)
    _refresh_derived(runner.model)
    return {"tensors": len(tensors), "bytes": received.nbytes, "in_flight": in_flight}


def load_in_place(runner, tensors: dict[str, torch.Tensor]) -> None:
    """vLLM's in-place reload where it takes tensors (it re-runs weight post-processing such as
    CPU weight packing layer by layer); elsewhere the model's own load_weights, then each loaded
    layer's post-processing again (``dropped_weights`` refuses models where that cannot work)."""
    if versions.has_iterator_reload(runner):
        runner.reload_weights(weights_iterator=iter(tensors.items()))
        return
    model = runner.model
    loaded = model.load_weights(tensors.items())
    names = loaded if loaded is not None else [n for n, _ in model.named_parameters()]
    for module_name in sorted({n.rpartition(".")[0] for n in names}):
        module = model.get_submodule(module_name)
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)


def dropped_weights(model) -> list[str]:
    """Layers whose load-time weight vLLM replaced by a processed copy and dropped (on CPU: the
    packed oneDNN / SGL GEMM weights). Without an in-place reload that restores and re-processes
    layers (``versions.has_iterator_reload``), such a layer cannot take new weights."""
    return sorted(name for name, module in model.named_modules()
                  if getattr(module, "quant_method", None) is not None
                  and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.numel() == 0)


def _refresh_derived(model) -> None:
    """A tied lm_head shares the embedding's weight, but on CPU its packed GEMM copy is made
    from it once and the layerwise reload does not revisit the head: re-pack it. An untied
    head that the lm_head_fp32 fix stored in fp32 stays fp32 (a reload may rebuild it in the
    model dtype)."""
    from . import registry
    from .fixes import lm_head

    if "lm_head_fp32" in registry.applied() and getattr(model, "_vllm_compat_fp32_head", False):
        lm_head.store_head_in_fp32(model)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head is embed or getattr(head, "weight", None) is not embed.weight:
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
