"""verify's token-identity gate on the real engine: a deliberately broken seeded draw must fail
every seeded fp32 scenario on token identity, although every logprob it can still compare
matches V0 (the old gates passed such a draw: the comparison stopped at the first diverging
position), while the unbroken shim passes the same scenarios. One engine for the module."""
import gc

import pytest
import torch

import vllm_compat
from vllm_compat import v0_draw
from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
FIXTURES, MODELS = GOLDEN_DIR / "fixtures", GOLDEN_DIR / "models"
MODEL = "llama-fp32"
REFS = {f.reference: f for f in golden.load_all(FIXTURES, MODELS) if f.model == MODEL}
# Every scenario with a seeded request (16 of 20; the update scenarios change the weights of the
# shared engine and have tests of their own).
SEEDED = [sc["name"] for sc in REFS["v0"].scenarios
          if not sc.get("update") and any("seed" in r["params"] for r in sc["requests"])]


@pytest.fixture(scope="module")
def llm():
    before = vllm_compat.applied()
    vllm_compat.apply()
    engine = verify.make_engine(MODELS / MODEL, "float32", REFS["v0"].data["generator"]["engine_args"])
    try:
        yield engine
    finally:
        del engine
        gc.collect()
        vllm_compat.apply(include=before)


def run(llm, names):
    return verify.verify_on(llm, MODEL, REFS, MODELS, names, log=lambda s: None)


def assert_failed_on_tokens_only(row):
    ref = row.vs["v0"]
    assert not row.passed, row.scenario
    assert ref["token_agreement"] < 1.0, row.scenario
    assert any(f.startswith("tokens differ from v0") for f in row.failures), (row.scenario, row.failures)
    assert ref["compared_positions"] < ref["expected_positions"], row.scenario
    # What was still compared matches V0: only the token-identity gates catch this draw.
    assert max(ref["sampled_max_abs"], ref["topk_max_abs"], ref["prompt_max_abs"]) <= 1e-4, row.scenario
    assert all(f.startswith(("tokens differ", "compared ")) for f in row.failures), (row.scenario, row.failures)


def test_real_seeded_draw_passes_every_seeded_scenario(llm):
    assert len(SEEDED) == 16
    rows = run(llm, SEEDED)
    assert [r.scenario for r in rows] == SEEDED
    assert not {r.scenario: r.failures for r in rows if not r.passed}
    for r in rows:
        assert r.vs["v0"]["token_agreement"] == 1.0
        assert r.vs["v0"]["compared_positions"] == r.vs["v0"]["expected_positions"] > 0


@pytest.mark.stock_baseline  # shows the stock engine failing: first CI row (ci/test.sh)
def test_perturbed_noise_fails_every_seeded_scenario_on_token_identity(monkeypatch, llm):
    """The subtle break: V0's exponential noise, the generator advanced exactly as V0 does, but
    the values shifted by one place (still Exp(1) noise, so the draw is a correct sample of the
    same distribution; only V0's seeded tokens are lost)."""
    real = v0_draw._noise_of  # every seeded draw's noise goes through it
    monkeypatch.setattr(v0_draw, "_noise_of", lambda products: torch.roll(real(products), 1, dims=-1))
    rows = run(llm, SEEDED)
    for row in rows:
        print(verify.format_row(row))  # the evidence, with -s
        assert_failed_on_tokens_only(row)


@pytest.mark.stock_baseline  # shows the stock engine failing: first CI row (ci/test.sh)
def test_second_best_draw_fails_token_identity(monkeypatch, llm):
    """The blunt break: each seeded row takes the second most likely token."""
    monkeypatch.setattr(v0_draw, "seeded_draw", lambda logits, generators, candidates=None: {
        row: int(logits[row].topk(2).indices[1]) for row in sorted(generators)})
    row, = run(llm, ["temp_1.0"])
    assert_failed_on_tokens_only(row)
    assert any(f.startswith("compared ") and "positions" in f for f in row.failures), row.failures
