"""verify's token-identity gate on the real engine: a deliberately broken seeded draw (each
seeded row takes the second most likely token instead of V0's exponential race) must fail a
fp32 seeded scenario with a token-identity failure, although every logprob it can still compare
matches V0 (the old gates passed it: the comparison stopped at the first diverging position)."""
import pytest

import vllm_compat
from vllm_compat import v0_draw
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = pytest.mark.engine
FIXTURES, MODELS = GOLDEN_DIR / "fixtures", GOLDEN_DIR / "models"
MODEL, SCENARIO = "llama-fp32", "temp_1.0"


def run():
    before = vllm_compat.applied()
    vllm_compat.apply()
    try:
        return verify.verify(FIXTURES, MODELS, [MODEL], [SCENARIO], log=lambda s: None)[0]
    finally:
        vllm_compat.apply(include=before)


def test_broken_seeded_draw_fails_token_identity(monkeypatch):
    def second_best(logits, generators):
        return {row: int(logits[row].topk(2).indices[1]) for row in sorted(generators)}

    monkeypatch.setattr(v0_draw, "seeded_draw", second_best)
    row = run()
    ref = row.vs["v0"]
    print(verify.format_row(row))  # the evidence, with -s
    assert not row.passed
    assert ref["token_agreement"] < 1.0
    assert any(f.startswith("tokens differ from v0") for f in row.failures), row.failures
    assert any(f.startswith("compared ") and "positions" in f for f in row.failures), row.failures
    # What was still compared matches V0: only the new gates catch this draw.
    assert max(ref["sampled_max_abs"], ref["topk_max_abs"], ref["prompt_max_abs"]) <= 1e-4
    assert all(f.startswith(("tokens differ", "compared ")) for f in row.failures), row.failures
    assert ref["compared_positions"] < ref["expected_positions"]


def test_real_seeded_draw_passes():
    row = run()
    assert row.passed, row.failures
    assert row.vs["v0"]["compared_positions"] == row.vs["v0"]["expected_positions"] == 64  # 4 requests x 16
