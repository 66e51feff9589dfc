"""GPU-only parts of the in-flight update path (skipped without CUDA): an update under
AsyncLLM with async scheduling (a batch can be in flight when the update arrives, so the
keep-mode pause must drain it), and the NCCL broadcast from a trainer on another GPU."""
import asyncio
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import vllm_compat
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = [pytest.mark.engine, pytest.mark.gpu]
MODELS = GOLDEN_DIR / "models"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}

TRAINER = r"""
import sys
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster

host, port, path = sys.argv[1:]
bc = WeightBroadcaster(host, int(port), num_engine_workers=1, backend="nccl", device="cuda:0")
print("SENT", bc.send(load_file(path)), flush=True)
bc.close()
"""


def _engine(**extra):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    return AsyncLLM.from_engine_args(AsyncEngineArgs(model=str(MODELS / "llama-fp32"), dtype="float32",
                                                     skip_tokenizer_init=True, max_model_len=512,
                                                     gpu_memory_utilization=0.3, **extra))


async def _greedy(engine, rid):
    from vllm import SamplingParams

    final = None
    async for out in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=2), request_id=rid):
        final = out
    return list(final.outputs[0].token_ids)


def test_update_under_async_scheduling(shim, monkeypatch):
    """The shim's defaults turn async scheduling off; an RL user may turn it back on. The
    update must still land between steps with no request aborted."""
    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")

    async def main():
        engine = _engine(async_scheduling=True)
        try:
            params = SamplingParams(temperature=1.0, seed=0, max_tokens=300, ignore_eos=True)

            async def run(i):
                final = None
                async for out in engine.generate(PROMPT, params, request_id=f"a{i}"):
                    final = out
                return final

            tasks = [asyncio.create_task(run(i)) for i in range(16)]
            await asyncio.sleep(0.5)
            result = await vllm_compat.update_weights(engine, UPDATE)
            assert result.paused and len(result.in_flight) > 0
            outs = await asyncio.gather(*tasks)
            assert all(o.outputs[0].finish_reason == "length" for o in outs)
            return await _greedy(engine, "after")
        finally:
            engine.shutdown()

    after = asyncio.run(main())

    async def fresh():  # an engine started on the update weights
        engine = _engine()
        try:
            await vllm_compat.update_weights(engine, UPDATE)
            return await _greedy(engine, "fresh")
        finally:
            engine.shutdown()

    assert after == asyncio.run(fresh())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the trainer and the engine on two GPUs")
def test_nccl_broadcast_from_a_trainer_gpu(shim, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="1")
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), str(UPDATE)],
                               stdout=subprocess.PIPE, text=True, env=env)

    async def main():
        engine = _engine()
        try:
            group = await vllm_compat.join_weight_broadcast(engine, "127.0.0.1", port, backend="nccl")
            result = await vllm_compat.update_weights(engine, group)
            assert result.tensors == len(load_file(str(UPDATE)))
            via_nccl = await _greedy(engine, "nccl")
            await vllm_compat.update_weights(engine, UPDATE)
            return via_nccl, await _greedy(engine, "file")
        finally:
            engine.shutdown()

    try:
        via_nccl, via_file = asyncio.run(main())
        trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    assert via_nccl == via_file
