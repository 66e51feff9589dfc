"""Client side of fix 3: ``update_weights`` and ``join_weight_broadcast``.

V0-era RL code blocked the engine between two model steps, loaded the new weights on every
worker and resumed; requests in flight kept their KV cache (no abort, no cache reset) and
continued with the new weights. ``update_weights`` does the same on V1:

  0. AsyncLLM: pause between steps in keep mode without clearing any cache (vLLM's
     defaults, abort + clear_cache, would abort or re-prefill requests). Where vLLM has no
     keep mode, the RPCs below still run between two engine-core steps, which is the same
     blocking.
  1. stage: every worker receives the whole update (transport.py), validates every name,
     shape and dtype against the checkpoint its model was loaded from, and plans where each
     tensor lands (worker.py). Nothing is loaded yet;
  2. if any worker found a problem, every worker drops its batch and WeightUpdateError
     lists the problems: nothing changed;
  3. commit: every worker loads its batch in place and refreshes derived state.

With a single worker (no tensor or pipeline parallelism, one replica) steps 1-3 are one RPC
(``vllm_compat_update_weights``): the worker validates and plans the whole update, and loads it
only if it found no problem, so a bad or partial update is still refused before any tensor is
touched. That RPC runs in the engine core between two steps; where the engine core also runs
one batch at a time (no async scheduling: the CPU platform forces it off) that is already the
blocking step 0 gives, so no pause is taken either.

What is atomic: steps 0-2 change nothing, whatever happens (a refusal, a timeout, a cancelled
task, a dead trainer): the staged copies are dropped, temporary files removed and the engine
resumed before update_weights returns or raises. Step 3 cannot be interrupted once it started:
a cancellation then takes effect when the load has finished (the new weights are in place). If
a worker fails during step 3, its weights may be half old and half new: the engine is *fenced*
(running requests are aborted, new ones fail with EngineFenced naming the failed update) and
WeightUpdateIncomplete is raised; a later update that succeeds and covers every tensor of the
failed one lifts the fence.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterable, Union

import torch

from . import transport as tp
from ... import versions

logger = logging.getLogger("vllm_compat")

Weights = Union[str, os.PathLike, Iterable[tuple[str, torch.Tensor]], dict, tp.TransportSpec, "BroadcastGroup"]


class WeightUpdateError(ValueError):
    """The update was refused before any weight changed; the engine serves as before."""


class WeightUpdateTimeout(WeightUpdateError, TimeoutError):
    """The update was not received and validated within its timeout; nothing changed."""


class WeightUpdateIncomplete(RuntimeError):
    """Loading failed on at least one worker after validation: weights may be mixed. The
    engine is fenced until an update covering the same tensors succeeds."""


class EngineFenced(RuntimeError):
    """A request was refused because the engine's last weight update failed half-way."""


@dataclass
class WeightUpdateResult:
    tensors: int  # tensors loaded per worker
    bytes: int  # bytes received per worker
    # request id (as the engine core names it) -> tokens it had sampled with the old weights;
    # its later tokens come from the new ones. Lets a trainer tag tokens with a policy version.
    in_flight: dict[str, int] = field(default_factory=dict)
    paused: bool = False  # whether a keep-mode pause was used (AsyncLLM)
    seconds: dict[str, float] = field(default_factory=dict)  # receive+validate, load, total
    # Updates committed on this engine so far, this one included: a policy version a trainer can
    # tag tokens with. (A cancelled update that had started loading still counts: see last_update.)
    version: int = 0


@dataclass(frozen=True)
class BroadcastGroup:
    """Engine end of a process group joined with ``join_weight_broadcast``; pass it to
    ``update_weights`` to receive one broadcast from the trainer's WeightBroadcaster."""
    name: str
    world_size: int

    def spec(self) -> tp.TransportSpec:
        return tp.TransportSpec("process_group", {"group": self.name})


# ---- fencing ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fence:
    names: frozenset[str]
    error: str

    def message(self) -> str:
        names = sorted(self.names)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (f"vllm-compat: this engine is fenced: a weight update failed while loading ({self.error}), so its "
                f"weights may be a mixture of old and new. Send an update that covers {shown} (or the whole "
                f"checkpoint) to serve again.")


_fences: "weakref.WeakKeyDictionary[object, Fence]" = weakref.WeakKeyDictionary()


def _fence_key(engine):
    return getattr(engine, "llm_engine", engine)  # LLM -> its LLMEngine (add_request lives there)


def fence_of(engine) -> Fence | None:
    """The fence on ``engine`` (LLM, LLMEngine or AsyncLLM), or None."""
    return _fences.get(_fence_key(engine))


def refuse_if_fenced(engine) -> None:
    """Called by the weight_updates fix from add_request of LLMEngine and AsyncLLM."""
    fence = _fences.get(engine)
    if fence is not None:
        raise EngineFenced(fence.message())


def _running_request_ids(engine) -> list[str]:
    states = getattr(getattr(_fence_key(engine), "output_processor", None), "request_states", None) or {}
    return list(states)


def _set_fence(engine, names: Iterable[str], error: BaseException) -> Fence:
    fence = _fences.get(_fence_key(engine))
    names = frozenset(names) | (fence.names if fence else frozenset())
    fence = _fences[_fence_key(engine)] = Fence(names, f"{type(error).__name__}: {error}")
    logger.error("%s", fence.message())
    return fence


def _lift_fence(engine, names: Iterable[str]) -> None:
    fence = _fences.get(_fence_key(engine))
    if fence is not None and fence.names <= set(names):
        del _fences[_fence_key(engine)]
        logger.warning("vllm-compat: weight update fence lifted: every tensor of the failed update was loaded again")


# ---- shared steps --------------------------------------------------------------------------

def _is_async(engine) -> bool:
    return not hasattr(engine, "llm_engine")  # LLM wraps an LLMEngine; AsyncLLM is the engine


def _parallel_config(engine):
    config = engine.llm_engine.vllm_config if hasattr(engine, "llm_engine") else engine.vllm_config
    return config.parallel_config


def _spec(weights: Weights, cleanups: list, timeout: float | None) -> tp.TransportSpec:
    """The workers' instructions; registers what must be removed afterwards in ``cleanups``."""
    if isinstance(weights, BroadcastGroup):
        spec = weights.spec()
    elif isinstance(weights, tp.TransportSpec):
        spec = weights
    else:
        try:
            spec, cleanup = tp.file_spec(weights)
        except (FileNotFoundError, TypeError, tp.NoSpaceForWeights) as e:
            raise WeightUpdateError(f"weight update refused, nothing changed: {e}") from None
        cleanups.append(cleanup)
    if timeout is not None:
        spec = tp.TransportSpec(spec.name, {**spec.params, "timeout_s": timeout})
    return spec


def _staged(reports: list[dict]) -> tuple[list[str], list[str]]:
    """-> (problems of every worker, the update's tensor names)."""
    problems = sorted({p for r in reports for p in r["problems"]})
    return problems, reports[0]["names"]


def _refusal(problems: list[str]) -> WeightUpdateError:
    more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
    return WeightUpdateError("weight update refused, nothing changed:\n  " + "\n  ".join(problems[:20]) + more)


def _incomplete(names: list[str], error: BaseException) -> WeightUpdateIncomplete:
    return WeightUpdateIncomplete(
        f"weight update failed while loading ({type(error).__name__}: {error}); weights may be mixed. The engine "
        f"is fenced (running requests aborted, new requests refused) until an update covering these "
        f"{len(names)} tensors succeeds.")


_last: "weakref.WeakKeyDictionary[object, WeightUpdateResult]" = weakref.WeakKeyDictionary()


def last_update(engine) -> WeightUpdateResult | None:
    """The last update committed on ``engine`` (None before the first): tells whether a cancelled
    or timed-out call had already loaded its weights (its ``version`` is then the newest)."""
    return _last.get(_fence_key(engine))


def _result(engine, commits: list[dict], t0: float, t1: float, paused: bool,
            seconds: dict[str, float] | None = None) -> WeightUpdateResult:
    """``seconds``: the worker's own receive_validate and load times (one-RPC updates); else they
    are taken between the RPCs here."""
    t2 = time.perf_counter()
    first = commits[0]
    previous = _last.get(_fence_key(engine))
    seconds = {**(seconds or {"receive_validate": t1 - t0, "load": t2 - t1}), "total": t2 - t0}
    result = _last[_fence_key(engine)] = WeightUpdateResult(
        first["tensors"], first["bytes"], first["in_flight"], paused, seconds,
        (previous.version if previous else 0) + 1)
    return result


def _one_worker(engine) -> bool:
    """Whether the engine has a single worker (one RPC can validate and load: no other worker's
    refusal to wait for)."""
    return tp.broadcast_world_size(_parallel_config(engine)) == 2  # the trainer + one worker


def _one_batch_at_a_time(engine) -> bool:
    """Whether the engine core finishes each step before it handles an RPC (no batch queue:
    no async scheduling, no pipeline parallelism), so an RPC already runs between two steps."""
    config = engine.vllm_config
    return (getattr(config.scheduler_config, "async_scheduling", None) is False  # resolved, and off
            and config.parallel_config.pipeline_parallel_size == 1)


def _names_of(spec: tp.TransportSpec) -> list[str]:
    """The update's tensor names as far as the client can tell without the workers (for the
    fence after a one-RPC update whose RPC itself failed): a file's header; else none known, and
    the next update that succeeds lifts the fence."""
    try:
        return sorted(tp.safetensors_headers(tp.safetensors_files(spec.params["path"]))) if spec.name == "file" else []
    except Exception:
        return []


def _one_rpc_outcome(engine, report: dict, cancelled: bool, t0: float, paused: bool,
                     timeout: float | None) -> WeightUpdateResult:
    """The result of ``vllm_compat_update_weights``, or its refusal (nothing loaded), or the
    fence when its load failed part-way."""
    names = report["names"]
    if report["load_error"] is not None:
        error = RuntimeError(report["load_error"])
        _set_fence(engine, names, error)
        raise _incomplete(names, error)
    if report["commit"] is None:  # nothing was loaded
        if cancelled:
            raise asyncio.CancelledError()
        if report["timed_out"]:
            raise WeightUpdateTimeout(f"weight update refused, nothing changed: not received and validated within "
                                      f"{timeout} s")
        raise _refusal(sorted(report["problems"]))
    _lift_fence(engine, names)
    return _result(engine, [report["commit"]], t0, t0, paused, report["seconds"])


def _cleanup(cleanups: list) -> None:
    for cleanup in cleanups:
        try:
            cleanup()
        except Exception as e:  # never mask the update's own outcome
            logger.warning("vllm-compat: cleanup after a weight update failed: %s", e)


_sync_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_async_locks: "weakref.WeakKeyDictionary[object, asyncio.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def update_weights(engine, weights: Weights, *, timeout: float | None = None):
    """Load ``weights`` into every worker, V0 style. ``engine``: ``LLM`` (blocks; call it
    between ``generate`` calls or ``llm_engine.step()`` calls) or ``AsyncLLM`` (returns an
    awaitable; requests in flight keep running and continue with the new weights).
    ``weights``: (HF name, tensor) pairs, a dict, a safetensors file or directory, a
    ``BroadcastGroup`` from ``join_weight_broadcast`` (one broadcast from the trainer), or a
    ``TransportSpec`` for a transport of your own. Any subset of the checkpoint's tensors.

    ``timeout`` (seconds): how long receiving and validating may take (a broadcast's receive
    on the workers is bounded by it too); past it WeightUpdateTimeout, nothing changed. The
    load itself is not interrupted. Returns a ``WeightUpdateResult``; raises WeightUpdateError
    (nothing changed) or WeightUpdateIncomplete (the engine is fenced)."""
    if _is_async(engine):
        return _update_async(engine, weights, timeout)
    with _locks_guard:
        lock = _sync_locks.setdefault(engine, threading.Lock())
    with lock:
        cleanups: list = []
        staged = False
        try:
            spec = _spec(weights, cleanups, timeout)
            t0 = time.perf_counter()
            if _one_worker(engine):
                try:
                    (report,) = engine.collective_rpc("vllm_compat_update_weights", args=(*spec.as_rpc_args(), timeout))
                except Exception as e:  # the RPC itself failed: whether the load had started is unknown
                    report = {"names": _names_of(spec), "load_error": f"{type(e).__name__}: {e}"}
                try:
                    return _one_rpc_outcome(engine, report, False, t0, False, timeout)
                except WeightUpdateIncomplete:
                    abort = engine.llm_engine.abort_request
                    abort(_running_request_ids(engine), **versions.abort_kwargs(abort))
                    raise
            staged = True
            problems, names = _staged(engine.collective_rpc("vllm_compat_stage_weights", args=spec.as_rpc_args()))
            if problems:
                raise _refusal(problems)
            t1 = time.perf_counter()
            staged = False  # commit consumes the staged copy
            try:
                commits = engine.collective_rpc("vllm_compat_commit_weights")
            except Exception as e:
                _set_fence(engine, names, e)
                abort = engine.llm_engine.abort_request
                abort(_running_request_ids(engine), **versions.abort_kwargs(abort))
                raise _incomplete(names, e) from e
            _lift_fence(engine, names)
            return _result(engine, commits, t0, t1, False)
        finally:
            if staged:
                engine.collective_rpc("vllm_compat_drop_weights")
            _cleanup(cleanups)


async def _finish(awaitable) -> tuple[object, bool]:
    """Await ``awaitable`` to its end even if this task is cancelled meanwhile (what it does in
    the engine cannot be taken back half-way). -> (its value, whether this task was cancelled
    meanwhile); its own error propagates, and outranks the cancellation."""
    task = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            return await asyncio.shield(task), cancelled
        except asyncio.CancelledError:
            if task.cancelled():
                raise
            cancelled = True
            if task.done():
                return task.result(), cancelled


async def _quietly(awaitable, what: str) -> None:
    """Clean-up step: run to the end even if cancelled; log (never raise) its error, which must
    not mask the update's own outcome."""
    try:
        await _finish(awaitable)
    except Exception as e:
        logger.warning("vllm-compat: %s after a weight update failed: %s", what, e)


async def _within(awaitable, deadline: float | None, timeout: float | None):
    if deadline is None:
        return await awaitable
    try:
        return await asyncio.wait_for(awaitable, max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        raise WeightUpdateTimeout(f"weight update refused, nothing changed: not received and validated within "
                                  f"{timeout} s") from None


def _refuse_several_engine_cores(engine) -> None:
    """With data parallelism behind one AsyncLLM, vLLM's client sends a utility call to every
    engine core but returns only the first one's result: a refusal on another replica would go
    unseen and the update would not be atomic. Refused until the results of all are read."""
    cores = getattr(getattr(engine, "engine_core", None), "core_engines", None) or ()
    if len(cores) > 1:
        raise WeightUpdateError(
            f"weight update refused, nothing changed: this AsyncLLM drives {len(cores)} data-parallel engine cores "
            "and vLLM returns only the first one's RPC results, so a refusal on another replica would go unseen. "
            "Run one engine per data-parallel rank (external load balancing) and update each.")


async def _update_async(engine, weights: Weights, timeout: float | None) -> WeightUpdateResult:
    _refuse_several_engine_cores(engine)
    lock = _async_locks.setdefault(engine, asyncio.Lock())
    async with lock:
        deadline = None if timeout is None else time.monotonic() + timeout
        cleanups: list = []
        paused = staged = False
        try:
            spec, cancelled = await _finish(asyncio.to_thread(_spec, weights, cleanups, timeout))
            if cancelled:
                raise asyncio.CancelledError()
            one_rpc = _one_worker(engine)
            if versions.has_keep_mode_pause(engine) and not (one_rpc and _one_batch_at_a_time(engine)) \
                    and not await engine.is_paused():
                paused = True  # before awaiting: a cancel inside pause_generation must still resume
                await _within(engine.pause_generation(mode="keep", clear_cache=False), deadline, timeout)
            t0 = time.perf_counter()
            if one_rpc:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise WeightUpdateTimeout(f"weight update refused, nothing changed: not received and validated "
                                              f"within {timeout} s")
                try:  # runs to its end even if this task is cancelled: the worker may be loading
                    (report,), cancelled = await _finish(engine.collective_rpc(
                        "vllm_compat_update_weights", args=(*spec.as_rpc_args(), left)))
                except asyncio.CancelledError:
                    raise
                except Exception as e:  # the RPC itself failed: whether the load had started is unknown
                    report, cancelled = {"names": _names_of(spec), "load_error": f"{type(e).__name__}: {e}"}, False
                try:
                    result = _one_rpc_outcome(engine, report, cancelled, t0, paused, timeout)
                except WeightUpdateIncomplete:
                    await _quietly(engine.abort(_running_request_ids(engine), **versions.abort_kwargs(engine.abort)),
                                   "aborting running requests")
                    raise
                if cancelled:  # the load finished: the new weights are in place (last_update tells)
                    raise asyncio.CancelledError()
                return result
            staged = True  # a worker may hold a staged copy from here on
            reports = await _within(engine.collective_rpc("vllm_compat_stage_weights", args=spec.as_rpc_args()),
                                    deadline, timeout)
            problems, names = _staged(reports)
            if problems:
                raise _refusal(problems)
            t1 = time.perf_counter()
            staged = False  # commit consumes the staged copy
            try:
                commits, cancelled = await _finish(engine.collective_rpc("vllm_compat_commit_weights"))
            except asyncio.CancelledError:
                raise
            except Exception as e:
                _set_fence(engine, names, e)
                await _quietly(engine.abort(_running_request_ids(engine), **versions.abort_kwargs(engine.abort)),
                               "aborting running requests")
                raise _incomplete(names, e) from e
            _lift_fence(engine, names)
            result = _result(engine, commits, t0, t1, paused)
            if cancelled:  # the load finished: the new weights are in place (last_update tells)
                raise asyncio.CancelledError()
            return result
        finally:
            if staged:  # queued behind a stage RPC still running in the engine: waits for it to end
                await _quietly(engine.collective_rpc("vllm_compat_drop_weights"), "dropping the staged update")
            if paused:
                await _quietly(engine.resume_generation(), "resuming generation")
            _cleanup(cleanups)


def join_weight_broadcast(engine, host: str, port: int, *, backend: str | None = None,
                          timeout: timedelta = tp.DEFAULT_TIMEOUT, name: str = "default"):
    """Have every worker of ``engine`` join the trainer's ``WeightBroadcaster`` (ranks
    1..N; the trainer, rank 0, must connect at the same time). Returns a BroadcastGroup
    (an awaitable of one for AsyncLLM). ``backend``: default gloo for CPU workers, NCCL
    for CUDA workers. ``timeout`` bounds every collective of the group (a dead trainer makes
    the receive fail within it). Joining again under the same name replaces the group, so a new
    trainer process can take over after one died. Workers of every data-parallel replica join
    (the trainer's ``num_engine_workers`` is ``world_size - 1``)."""
    world_size = tp.broadcast_world_size(_parallel_config(engine))
    args = (name, host, port, world_size, backend, timeout.total_seconds())
    group = BroadcastGroup(name, world_size)
    if _is_async(engine):
        async def join():
            await engine.collective_rpc("vllm_compat_join_broadcast", args=args)
            return group
        return join()
    engine.collective_rpc("vllm_compat_join_broadcast", args=args)
    return group
