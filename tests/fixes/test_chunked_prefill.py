"""Seeded sampling under chunked prefill (issue 13): V1 prefills a prompt over several steps
when a step's token budget (``max_num_batched_tokens``) is smaller than the batch's prompts,
samples the partially prefilled rows anyway, discards those tokens and rewinds the request's
generator with ``set_offset``, which CPU generators lack (the engine core dies, stock V1
too). V0 had no chunked prefill below 32K tokens: it drew a request only once its whole
prompt was in. With the shim the seeded draw must follow V0's stream exactly."""
import pytest

import vllm_compat
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
FIXTURES, MODELS = GOLDEN_DIR / "fixtures", GOLDEN_DIR / "models"
MODEL = "llama-fp32"
# 16 tokens a step: the 4 prompts of 5-17 tokens (42 tokens, 84 with n=2) prefill over
# several steps, most rows of a first step are partial prefills.
SMALL = 16
BATCH_SCENARIOS = ["greedy", "temp_0.6", "top_p", "top_p_min_p", "n2", "mixed_batch"]
# The update scenarios count steps ("update after step 6") as V0 did, with both early prompts
# (8 + 160 tokens) prefilled in step 1. 168 tokens a step keeps that and still splits the
# late 160-token prompt: the two running requests decode (2) + 8 + 160 > 168.
UPDATE_BUDGET = 168
UPDATE_SCENARIOS = ["weight_update_sampled", "weight_update_greedy"]


def _verify(scenarios, budget):
    return verify.verify(FIXTURES, MODELS, [MODEL], scenarios, log=lambda s: None,
                         max_num_batched_tokens=budget)


@pytest.fixture(scope="module")
def shim_applied():
    before = vllm_compat.applied()
    vllm_compat.apply()
    yield
    vllm_compat.apply(include=before)


def _assert_v0_parity(rows, scenarios):
    assert sorted(r.scenario for r in rows) == sorted(scenarios)
    failed = {r.scenario: r.failures for r in rows if not r.passed}
    assert not failed
    for r in rows:  # the seeded tokens identical to V0's over whole sequences
        assert r.vs["v0"]["token_agreement"] == 1.0, r.scenario


@pytest.fixture
def seeded_partial_prefills(monkeypatch):
    """Counts the steps in which a seeded row was a partial prefill (in-process engine core),
    so that a parity test cannot pass because nothing was chunked."""
    from vllm_compat.fixes import logprobs as fix

    seen = []
    original = fix._partial_prefill_rows

    def spy(runner):
        rows = original(runner)
        seen.extend(r for r in rows if r in runner.input_batch.generators)
        return rows

    monkeypatch.setattr(fix, "_partial_prefill_rows", spy)
    return seen


def test_golden_parity_with_chunked_prefill(shim_applied, seeded_partial_prefills):
    _assert_v0_parity(_verify(BATCH_SCENARIOS, SMALL), BATCH_SCENARIOS)
    assert seeded_partial_prefills


def test_golden_update_parity_with_a_chunked_late_prompt(shim_applied, seeded_partial_prefills):
    # Both, in the fixture's order: the V0 fixture ran them on one engine, so the sampled
    # scenario starts from the weights the greedy one loaded (alone it fails, chunked or not).
    _assert_v0_parity(_verify(UPDATE_SCENARIOS, UPDATE_BUDGET), UPDATE_SCENARIOS)
    assert seeded_partial_prefills


def _offset_error(exc: BaseException) -> bool:
    while exc is not None:
        if "does not use offset" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@pytest.mark.stock_baseline  # shows the stock engine failing: first CI row (ci/test.sh)
def test_stock_v1_dies_on_seeded_chunked_prefill(stock):
    """The defect: stock V1 rewinds the CPU generator of a partial prefill with set_offset."""
    with pytest.raises(Exception) as info:
        _verify(["temp_0.6"], SMALL)
    assert _offset_error(info.value), repr(info.value)


def test_drawing_the_discarded_rows_loses_v0_parity(shim_applied, seeded_partial_prefills, monkeypatch):
    """Keep the rewind skipped but let the partial-prefill rows draw (as if the shim ignored
    which rows are discarded): the engine runs, but each discarded draw shifts that request's
    stream and its tokens leave V0's."""
    from vllm.v1.sample.sampler import Sampler

    monkeypatch.setattr(Sampler, "v0_partial_prefill_rows",
                        property(lambda self: frozenset(), lambda self, rows: None), raising=False)
    rows = _verify(["temp_0.6"], SMALL)
    assert seeded_partial_prefills
    assert rows[0].vs["v0"]["token_agreement"] < 1.0


def _generate(llm, prompt, params):
    out = llm.generate([{"prompt_token_ids": prompt}], [params], use_tqdm=False)[0]
    return [(list(c.token_ids), [lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
            for c in sorted(out.outputs, key=lambda c: c.index)]


def test_long_prompt_n2_chunked_equals_unchunked(shim_applied, seeded_partial_prefills):
    """The issue's shape: a 300-token prompt, 64 tokens a step, n=2 seeded: each child's tokens
    equal those of the same request prefilled in one step."""
    import gc

    from vllm import SamplingParams

    prompt = [3 + (i * 7919) % 1000 for i in range(300)]
    params = SamplingParams(n=2, seed=4321, temperature=0.9, top_p=0.95, max_tokens=24,
                            logprobs=1, ignore_eos=True)
    results, partial = {}, {}
    for budget in (64, 1024):  # 1024: both children (2 x 300 tokens) prefill in one step
        llm = verify.make_engine(MODELS / MODEL, "float32", {"seed": 0, "max_model_len": 512},
                                 max_num_batched_tokens=budget)
        results[budget] = _generate(llm, prompt, params)
        partial[budget] = len(seeded_partial_prefills)
        seeded_partial_prefills.clear()
        del llm
        gc.collect()
    assert partial[64] and not partial[1024]
    chunked, unchunked = results[64], results[1024]
    assert [t for t, _ in chunked] == [t for t, _ in unchunked]
    assert chunked[0][0] != chunked[1][0]  # two different children, not one stream twice
    for (_, a), (_, b) in zip(chunked, unchunked):
        assert max(abs(x - y) for x, y in zip(a, b)) <= verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
