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

    if is_api_server_process():
        _patch_api_server(patcher)

    add_sync = patcher.replace(LLMEngine, "add_request", add_request, expect_params=["self", "request_id"])
    add_async = patcher.replace(AsyncLLM, "add_request", add_request_async, expect_params=["self", "request_id"])
    generate_original = patcher.replace(AsyncLLM, "generate", generate, expect_params=["self", "request_id"])


_API_SERVER_MODULES = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.launchers.api_server.entry",
                       "vllm.entrypoints.cli.serve")


def is_api_server_process() -> bool:
    """Whether this process runs (or is about to run) vLLM's OpenAI server: the plugin applies the
    fixes there while the server parses its arguments, before the app is built. Engine processes
    spawned from it may match too; there the patch is never called (no app is built)."""
    import sys

    main = getattr(getattr(sys.modules.get("__main__"), "__spec__", None), "name", None) or ""
    return main in _API_SERVER_MODULES or any(m in sys.modules for m in _API_SERVER_MODULES) or (
        len(sys.argv) > 1 and sys.argv[1] == "serve" and sys.argv[0].endswith("vllm"))


def _patch_api_server(patcher) -> None:
    """The HTTP routes (routes.py) join vLLM's app while it is built, and the API server's output
    processor records the weight version each request starts with."""
    from vllm.v1.engine.output_processor import OutputProcessor

    from . import routes
    from ... import versions

    module, name = versions.api_server_app_hook()

    def hook(*args, **kwargs):
        result = original(*args, **kwargs)
        routes.install(result if name == "build_app" else (args[0] if args else kwargs["app"]))
        return result

    def add_request(self, request, *args, **kwargs):
        new = request.request_id not in self.request_states  # not a streaming-input continuation
        result = add_original(self, request, *args, **kwargs)
        state = self.request_states.get(request.request_id)
        if new and state is not None:
            routes.TRACKER.started(state)
        return result

    original = patcher.replace(module, name, hook, expect_params=["app"] if name != "build_app" else ["args"])
    add_original = patcher.replace(OutputProcessor, "add_request", add_request, expect_params=["self", "request"])


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
