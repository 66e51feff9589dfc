"""The fixes live in vLLM's other processes too: the multiprocess engine core and its
worker, and two tensor-parallel workers. Shown by results, not only by flags."""
import os

import pytest

import vllm_compat
from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR
from vllm_compat.registry import ENV_ACTIVE
from vllm_compat.golden.runner import run_scenario

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
FP32 = GOLDEN_DIR / "fixtures/llama-fp32.v0.json"


def _scenario(fixture, name):
    return next(s for s in fixture.scenarios if s["name"] == name)


def _multiprocess_engine(monkeypatch, model="llama-fp32", dtype="float32", **kwargs):
    from vllm import LLM

    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    return LLM(model=str(GOLDEN_DIR / "models" / model), dtype=dtype, skip_tokenizer_init=True,
               max_model_len=512, max_logprobs=20, **kwargs)


def test_multiprocess_workers_run_the_fixes(monkeypatch, shim):
    llm = _multiprocess_engine(monkeypatch)
    try:
        reports = vllm_compat.check(llm)
        assert reports and all(r["pid"] != os.getpid() and r["plugin_loaded"] for r in reports)
        fx = golden.load_fixture(FP32)
        sc = _scenario(fx, "top_p_min_p")  # sampled + prompt logprobs, V0 order
        m = golden.compare_to_reference(run_scenario(llm, sc), sc["results"])
        limit = verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
        assert max(m["sampled_max_abs"], m["topk_max_abs"], m["prompt_max_abs"]) <= limit
    finally:
        del llm


def test_check_reports_a_worker_without_the_fixes(monkeypatch, shim):
    """Companion: a worker process that applied a different set is caught by check(), and
    its results miss V0 (here the workers get only `defaults`)."""
    monkeypatch.setenv(ENV_ACTIVE, "defaults")
    llm = _multiprocess_engine(monkeypatch)
    try:
        with pytest.raises(vllm_compat.CompatCheckError, match="differ"):
            vllm_compat.check(llm)
        fx = golden.load_fixture(FP32)
        sc = _scenario(fx, "top_p_min_p")
        m = golden.compare_to_reference(run_scenario(llm, sc), sc["results"])
        assert m["prompt_max_abs"] > 1.0
    finally:
        del llm


def test_tensor_parallel_two_workers(monkeypatch, shim):
    """TP=2 on CPU (one core per worker): both workers run the fixes, and bf16 parity with
    the fp32-head V0 holds with a vocabulary-sharded fp32 lm_head."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    llm = LLM(model=str(GOLDEN_DIR / "models/llama-bf16"), dtype="bfloat16", skip_tokenizer_init=True,
              max_model_len=512, max_logprobs=20, tensor_parallel_size=2, distributed_executor_backend="mp")
    try:
        reports = vllm_compat.check(llm)
        assert len({r["pid"] for r in reports}) == 2
        fx = golden.load_fixture(GOLDEN_DIR / "fixtures/llama-bf16.v0_fp32_head.json")
        for name in ("greedy", "top_p_min_p", "penalties_and_filters"):
            sc = _scenario(fx, name)
            row = verify.Row("llama-bf16", name, "bfloat16", "v0_fp32_head")
            row.vs["v0_fp32_head"] = golden.compare_to_reference(run_scenario(llm, sc), sc["results"])
            verify.judge(row, verify.THRESHOLDS["bfloat16"], verify.temperature_scale(sc))
            assert row.passed, (name, row.failures)
    finally:
        del llm


def test_async_engine_gets_the_fixes(shim, monkeypatch):
    """AsyncLLM.from_engine_args goes through the same EngineArgs hook: V0 defaults, and
    ``await check(engine)`` answers from the worker."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # AsyncLLM's normal mode
    import asyncio

    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    async def main():
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=str(GOLDEN_DIR / "models/llama-fp32"), dtype="float32", skip_tokenizer_init=True,
            max_model_len=512))
        try:
            reports = await vllm_compat.check(engine)
            assert reports and reports[0]["applied"] == vllm_compat.applied()
            assert engine.vllm_config.cache_config.enable_prefix_caching is False
        finally:
            engine.shutdown()

    asyncio.run(main())


def test_explicit_user_choice_is_kept_with_a_warning(shim, caplog):
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=str(GOLDEN_DIR / "models/llama-fp32"), dtype="float32", skip_tokenizer_init=True,
                      max_model_len=512, enable_prefix_caching=True)
    with caplog.at_level("WARNING", logger="vllm_compat"):
        config = args.create_engine_config()
    assert config.cache_config.enable_prefix_caching is True
    assert "old weights" in caplog.text
    assert EngineArgs(model=str(GOLDEN_DIR / "models/llama-fp32"), dtype="float32", skip_tokenizer_init=True,
                      max_model_len=512).create_engine_config().cache_config.enable_prefix_caching is False
