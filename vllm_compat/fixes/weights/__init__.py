"""Fix ``weight_updates`` (fix 3): V0-style in-flight weight updates.

Why: V0-era RL code paused between two model steps, loaded any subset of the weights into the
live parameters and resumed; requests in flight kept their KV. V1's native paths abort or
re-prefill requests (pause defaults), reload whole layers from fresh storage (a partial update
of a fused qkv_proj / gate_up_proj computes with uninitialised memory: NaN), and on CPU drop
each GEMM weight after packing it, so nothing can be loaded into it later.
How: ``update_weights`` (client.py: pause, stage + validate everywhere, commit, resume, fencing)
drives the worker extension (extension.py) on every worker (worker.py: plan, load in place,
re-process). This fix's patches: on CPU, vLLM keeps the unpacked GEMM weight next to its packed
copy (2x the linear weights' memory on CPU, nothing on GPU, where weights stay as loaded), and
``add_request`` refuses new requests while an engine is fenced after a failed load.
"""
from __future__ import annotations

from ...registry import Fix, register
from .client import (BroadcastGroup, EngineFenced, WeightUpdateError, WeightUpdateIncomplete,  # noqa: F401
                     WeightUpdateResult, WeightUpdateTimeout, fence_of, join_weight_broadcast, last_update,
                     update_weights)


def patch(patcher) -> None:
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.llm_engine import LLMEngine

    from .client import refuse_if_fenced

    if current_platform.is_cpu():
        from vllm.model_executor.layers import utils as layer_utils

        if hasattr(layer_utils, "dispatch_cpu_unquantized_gemm"):  # absent where vLLM never packs (keeps weights)
            def dispatch_cpu_unquantized_gemm(layer, remove_weight, *args, **kwargs):
                # Keep the checkpoint-format weight: a partial update loads into it, then re-packs.
                return dispatch(layer, False, *args, **kwargs)

            dispatch = patcher.replace(layer_utils, "dispatch_cpu_unquantized_gemm", dispatch_cpu_unquantized_gemm,
                                       expect_params=["layer", "remove_weight"])

    def add_request(self, *args, **kwargs):
        refuse_if_fenced(self)
        return add_sync(self, *args, **kwargs)

    async def add_request_async(self, *args, **kwargs):
        refuse_if_fenced(self)
        return await add_async(self, *args, **kwargs)

    async def generate(self, *args, **kwargs):  # before vLLM's own error handling, which hides the cause
        refuse_if_fenced(self)
        async for out in generate_original(self, *args, **kwargs):
            yield out

    add_sync = patcher.replace(LLMEngine, "add_request", add_request, expect_params=["self", "request_id"])
    add_async = patcher.replace(AsyncLLM, "add_request", add_request_async, expect_params=["self", "request_id"])
    generate_original = patcher.replace(AsyncLLM, "generate", generate, expect_params=["self", "request_id"])


register(Fix(
    name="weight_updates",
    summary="V0-style in-flight weight updates: any subset of the weights loaded in place, validated first",
    why="V1's native reload rebuilds whole layers (partial updates of fused layers give NaN) and its pause "
        "defaults abort or re-prefill requests; on CPU the GEMM weights are dropped after packing",
    how="vllm_compat.update_weights: keep-mode pause, stage + validate on every worker, load into the live "
        "parameters, re-process the touched layers, resume; CPU GEMM weights kept; fenced after a failed load",
    upstream="none (vLLM's weight-transfer API: NCCL/IPC, layerwise reload of whole layers)",
    remove_when="vLLM loads partial updates in place and pauses without clearing caches by default",
    patch=patch,
))
