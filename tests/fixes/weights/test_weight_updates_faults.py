"""A load that fails after validation (injected through a transport of the test's own, on one
tensor-parallel rank) must not leave the engine silently serving a mixture of old and new
weights: WeightUpdateIncomplete, the engine is fenced (running requests aborted, new requests
refused with EngineFenced naming the update) until an update covering the same tensors succeeds.
And a user's own worker extension class lives alongside vllm-compat's."""
import asyncio
import os

import pytest

import vllm_compat
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
BASE = MODELS / "llama-fp32/model.safetensors"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}

FAULTY_TRANSPORT = '''
import torch
from safetensors.torch import load_file
from vllm_compat.fixes.weights.transport import Received, WorkerTransport


class Poisoned(torch.Tensor):
    """Passes validation (names, shapes and dtypes come from the meta data) and fails when the
    weight loader touches it: a load that fails half-way."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError("injected load failure")


class FailOnRank(WorkerTransport):
    def receive(self):
        tensors = dict(sorted(load_file(self.params["path"]).items()))
        meta = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        if int(getattr(self.worker, "rank", 0)) == self.params["fail_rank"]:
            last = list(tensors)[-1]  # loaded after the others: a genuine mixture
            tensors[last] = tensors[last].as_subclass(Poisoned)
        return Received(meta, tensors, 0)


class UserExtension:
    """What an RL framework passes as worker_extension_cls."""
    def my_framework_method(self, x):
        return {"rank": int(getattr(self, "rank", 0)), "x": x}
'''


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    (tmp_path / "faulty_transport.py").write_text(FAULTY_TRANSPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # workers


def spec(fail_rank: int) -> vllm_compat.TransportSpec:
    return vllm_compat.TransportSpec("faulty_transport:FailOnRank", {"path": str(UPDATE), "fail_rank": fail_rank})


def greedy(llm):
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=6, logprobs=3), use_tqdm=False)[0]
    return list(out.outputs[0].token_ids), [{t: lp.logprob for t, lp in p.items()} for p in out.outputs[0].logprobs]


def test_a_load_failing_on_one_rank_fences_the_engine(shim, faulty, monkeypatch):
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = verify.make_engine(MODELS / "llama-fp32", "float32", {"max_model_len": 512}, tensor_parallel_size=2,
                             distributed_executor_backend="mp")
    try:
        before = greedy(llm)
        vllm_compat.update_weights(llm, UPDATE)
        updated = greedy(llm)
        vllm_compat.update_weights(llm, BASE)
        assert greedy(llm) == before != updated

        with pytest.raises(vllm_compat.WeightUpdateIncomplete, match="injected load failure"):
            vllm_compat.update_weights(llm, spec(fail_rank=1))
        assert not isinstance(vllm_compat.WeightUpdateIncomplete("x"), vllm_compat.WeightUpdateError)
        with pytest.raises(vllm_compat.EngineFenced, match="fenced: a weight update failed"):  # refused
            greedy(llm)
        # A refused update changes nothing and lifts nothing; an update of some tensors lifts nothing.
        with pytest.raises(vllm_compat.WeightUpdateError, match="shape"):
            import torch
            vllm_compat.update_weights(llm, {"model.norm.weight": torch.ones(3)})
        from safetensors.torch import load_file
        base = load_file(str(BASE))
        vllm_compat.update_weights(llm, {"model.norm.weight": base["model.norm.weight"]})
        with pytest.raises(vllm_compat.EngineFenced):
            greedy(llm)
        # A complete update (here: the same update again, on both ranks) lifts the fence.
        vllm_compat.update_weights(llm, UPDATE)
        assert greedy(llm) == updated
        vllm_compat.update_weights(llm, BASE)
        assert greedy(llm) == before
    finally:
        del llm


def test_async_engine_aborts_running_requests_when_fenced(shim, faulty):
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512))
        progress = {}

        async def generate(i, max_tokens=300):
            final = None
            params = SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=True)
            async for out in engine.generate(PROMPT, params, request_id=f"r{i}"):
                final = out
                progress[i] = len(out.outputs[0].token_ids)
            return final

        try:
            tasks = [asyncio.create_task(generate(i)) for i in range(4)]
            while len(progress) < 4 or min(progress.values()) < 3:
                await asyncio.sleep(0.01)
            with pytest.raises(vllm_compat.WeightUpdateIncomplete):
                await vllm_compat.update_weights(engine, spec(fail_rank=0))
            outs = await asyncio.gather(*tasks, return_exceptions=True)
            # None of them went on to the end on mixed weights.
            assert all(isinstance(o, BaseException) or o.outputs[0].finish_reason == "abort" for o in outs), outs
            with pytest.raises(vllm_compat.EngineFenced):
                await generate(10, max_tokens=2)
            await vllm_compat.update_weights(engine, UPDATE)
            final = await asyncio.wait_for(generate(11, max_tokens=4), timeout=30)
            assert final.finished and len(final.outputs[0].token_ids) == 4
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_a_user_worker_extension_lives_alongside(shim, faulty):
    """RL frameworks pass worker_extension_cls; their methods and vllm-compat's both work."""
    llm = verify.make_engine(MODELS / "llama-fp32", "float32", {"max_model_len": 512},
                             worker_extension_cls="faulty_transport.UserExtension")
    try:
        assert llm.collective_rpc("my_framework_method", args=(7,)) == [{"rank": 0, "x": 7}]
        assert [s["applied"] for s in vllm_compat.check(llm)] == [vllm_compat.applied()]
        before = greedy(llm)
        vllm_compat.update_weights(llm, UPDATE)
        assert greedy(llm) != before
    finally:
        del llm
