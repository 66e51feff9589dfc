"""Update tests that start engines of their own through verify. Kept out of
test_weight_updates.py: an engine shut down in a process tears down vLLM's global parallel
state, which would break that file's module-scoped engine."""
import pytest

import vllm_compat
from vllm_compat import versions
from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import verify
from vllm_compat.fixes.weights import worker as weights_worker
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
MODELS = GOLDEN_DIR / "models"


def test_tied_head_is_refreshed_after_an_update():
    """bf16 head on CPU (lm_head_fp32 left out): the tied head's packed copy must be rebuilt
    from the new embedding, or the update scenario is computed with the old head."""
    def run(refresh: bool):
        before = vllm_compat.applied()
        vllm_compat.apply(exclude=["lm_head_fp32"])
        original = weights_worker.refresh_derived
        if not refresh:
            weights_worker.refresh_derived = lambda model: None
        try:
            rows = verify.verify(GOLDEN_DIR / "fixtures", MODELS, ["qwen2-tied-bf16"], ["weight_update_greedy"],
                                 log=lambda s: None)
        finally:
            weights_worker.refresh_derived = original
            vllm_compat.apply(include=before)
        return rows[0]

    fresh, stale = run(True), run(False)
    # bf16 head on purpose: verify's bf16-head signature gate fails the row; nothing else may.
    assert fresh.judged_reference == "v0", fresh.judged_reference
    assert not [f for f in fresh.failures if not f.startswith("bf16-head signature")], fresh.failures
    if stale.vs["v0"] == fresh.vs["v0"]:
        # vLLM 0.18.1's Qwen2 uses the embedding module itself as lm_head: no copy to go stale.
        return
    assert stale.vs["v0"]["topk_max_abs"] > 2.0  # 0.32: measured 3.6 stale vs 0.76 refreshed


@pytest.mark.stock_baseline  # shows the stock engine failing: first CI row (ci/test.sh)
def test_stock_pause_that_clears_caches_misses_v0(stock):
    """Companion of the golden update parity (test_shim_parity): vLLM's own pause with its
    default clear_cache=True (here the in-process engine core's pause_scheduler, which
    AsyncLLM.pause_generation drives) resets the KV of running requests, so they re-prefill
    with the new weights, which V0 never did. Prefix caching is off, so only the pause differs."""
    def pause_clear_reload(llm, weights_dir):
        core = llm.llm_engine.engine_core.engine_core
        if not versions.has_scheduler_pause(core):
            pytest.skip("this vLLM has no engine-core pause (EngineCore.pause_scheduler, 0.18.1 and later): its "
                        "AsyncLLM.pause_generation aborts or drains in-flight requests, so there is no "
                        "cache-clearing pause that keeps them running to compare against (the keep-reload half "
                        "of this test ran and passed)")
        core.pause_scheduler(mode="keep", clear_cache=True)
        try:
            verify.native_load_update(llm, weights_dir)
        finally:
            core.resume_scheduler()

    def keep_reload(llm, weights_dir):  # the same reload with nothing cleared: V0's behaviour
        verify.native_load_update(llm, weights_dir)

    limit = verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
    sc = next(s for s in golden.load_fixture(GOLDEN_DIR / "fixtures/llama-fp32.v0.json").scenarios
              if s["name"] == "weight_update_greedy")
    for load, in_flight_matches in ((keep_reload, True), (pause_clear_reload, False)):
        row = verify.verify(GOLDEN_DIR / "fixtures", MODELS, ["llama-fp32"], ["weight_update_greedy"],
                            log=lambda s: None, load=load, enable_prefix_caching=False)[0]
        in_flight = golden.compare_to_reference(row.results[:2], sc["results"][:2])
        if in_flight_matches:
            assert in_flight["sampled_max_abs"] <= limit and in_flight["token_agreement"] == 1.0
        else:
            assert in_flight["sampled_max_abs"] > 100 * limit or in_flight["token_agreement"] < 1.0


def _head_state(worker):
    model = worker.model_runner.get_model()
    head, embed = model.lm_head.weight, model.model.embed_tokens.weight
    return {"head_dtype": str(head.dtype), "embed_dtype": str(embed.dtype),
            "shared": head.data_ptr() == embed.data_ptr(), "head_sum": float(head.double().sum())}


@pytest.mark.parametrize("model, untied", [("llama-bf16", True), ("qwen2-tied-bf16", False)])
def test_fp32_head_storage_on_cpu_follows_updates(shim, model, untied):
    """lm_head_fp32 on CPU stores an untied bf16 head's weight in fp32 once (no per-step
    conversion), leaves a tied head (the embedding's tensor) alone, and an update still lands
    in it. That the logits are bit for bit unchanged is checked against the patch series,
    which converts at every step (test_patches.py: patched == shim)."""
    import torch
    from safetensors.torch import load_file

    mdir = MODELS / model
    llm = verify.make_engine(mdir, "bfloat16", {"max_model_len": 512})
    try:
        before = llm.collective_rpc(_head_state)[0]
        assert before["embed_dtype"] == "torch.bfloat16"
        if not untied:
            assert before["shared"] and before["head_dtype"] == "torch.bfloat16"
            return
        assert not before["shared"] and before["head_dtype"] == "torch.float32"
        head = load_file(str(mdir / "model.safetensors"))["lm_head.weight"]
        new = (head.float() * 1.5).to(torch.bfloat16)
        vllm_compat.update_weights(llm, [("lm_head.weight", new)])
        after = llm.collective_rpc(_head_state)[0]
        assert after["head_dtype"] == "torch.float32"
        assert after["head_sum"] == float(new.double().sum()) != before["head_sum"]
    finally:
        del llm
