"""Cancelled and timed-out updates on a real AsyncLLM, engine core in-process and in its own
process: whatever await point a cancellation hits, the engine ends up resumed (a new request
completes within seconds), no worker keeps a staged copy, the temporary file of an in-memory
update is removed, and the weights are either the old or the new set, never a mixture."""
import asyncio
import glob
import os
import tempfile

import pytest
from safetensors.torch import load_file

import vllm_compat
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}
TURNS = list(range(0, 11))  # event-loop turns before the cancel
MILLISECONDS = [1, 2, 5, 10, 20, 35, 50, 75, 100]


def temp_files() -> set[str]:
    return set(glob.glob("/dev/shm/vllm-compat-weights-*") + glob.glob(os.path.join(tempfile.gettempdir(),
                                                                                    "vllm-compat-weights-*")))


async def greedy(engine, request_id: str) -> list[int]:
    from vllm import SamplingParams

    final = None
    async for out in engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4), request_id=request_id):
        final = out
    return list(final.outputs[0].token_ids)


def run(multiprocessing: bool):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    base = load_file(str(MODELS / "llama-fp32/model.safetensors"))
    upd = load_file(str(MODELS / "llama-fp32-update/model.safetensors"))
    report = []

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512))
        try:
            tokens = {"base": await greedy(engine, "ref-base")}
            await vllm_compat.update_weights(engine, upd)
            tokens["update"] = await greedy(engine, "ref-update")
            await vllm_compat.update_weights(engine, base)
            assert tokens["base"] != tokens["update"]
            files = temp_files()
            points = [("turns", n) for n in TURNS] + [("ms", n) for n in MILLISECONDS]
            for i, (kind, n) in enumerate(points):
                weights = upd if i % 2 == 0 else base
                # A request running through the update, as in RL: it must not be aborted.
                running = asyncio.create_task(greedy(engine, f"running-{i}"))
                task = asyncio.create_task(vllm_compat.update_weights(engine, weights))
                if kind == "turns":
                    for _ in range(n):
                        await asyncio.sleep(0)
                else:
                    await asyncio.sleep(n / 1000)
                task.cancel()
                try:
                    await task
                    outcome = "completed"
                except asyncio.CancelledError:
                    outcome = "cancelled"
                # A new request completes within seconds: the engine is not left paused.
                new = await asyncio.wait_for(greedy(engine, f"after-{i}"), timeout=10)
                assert not await engine.is_paused()
                assert len(await asyncio.wait_for(running, timeout=10)) == 4
                assert new in (tokens["base"], tokens["update"])  # old or new weights, not a mixture
                statuses = await engine.collective_rpc("vllm_compat_status")
                assert not any(s["staged_update"] for s in statuses), (kind, n)
                assert temp_files() == files, (kind, n)
                report.append((kind, n, outcome))
            # A timeout: a transport that never delivers (sleeps in receive) times out, nothing changed.
            before = await greedy(engine, "before-timeout")
            with pytest.raises(vllm_compat.WeightUpdateTimeout):
                await vllm_compat.update_weights(engine, vllm_compat.TransportSpec(
                    "slow_transport:Slow", {"seconds": 3.0}), timeout=0.5)
            assert await asyncio.wait_for(greedy(engine, "after-timeout"), timeout=10) == before
            assert not await engine.is_paused()
        finally:
            engine.shutdown()

    asyncio.run(main())
    return report


SLOW_TRANSPORT = '''
import time
from safetensors.torch import load_file
from vllm_compat.fixes.weights.transport import Received, WorkerTransport


class Slow(WorkerTransport):
    """Receives nothing useful for a while (a sender that stalls)."""
    def receive(self):
        time.sleep(self.params["seconds"])
        return Received({}, {})
'''


@pytest.mark.parametrize("multiprocessing", [False, True], ids=["in-process", "multiprocess"])
def test_cancel_at_every_await_point_leaves_the_engine_serving(shim, monkeypatch, tmp_path, multiprocessing):
    (tmp_path / "slow_transport.py").write_text(SLOW_TRANSPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")  # engine core
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1" if multiprocessing else "0")
    report = run(multiprocessing)
    print(report)
    outcomes = {o for _, _, o in report}
    assert "cancelled" in outcomes  # the cancels did hit the update at different points
