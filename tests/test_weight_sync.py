"""vllm_compat.update_weights on LLM: validated before anything changes, V0-style loading,
derived state refreshed. (The golden in-flight update scenarios run through it in
test_shim_parity.)"""
import pytest
import torch
from safetensors.torch import load_file, save_file

import vllm_compat
from vllm_compat import golden, verify, weight_sync
from vllm_compat.golden import GOLDEN_DIR

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    before = vllm_compat.applied()
    vllm_compat.apply()
    engine = LLM(model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512)
    yield engine
    del engine
    vllm_compat.apply(include=before)


def greedy_logprobs(llm):
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=5), use_tqdm=False)[0]
    return [{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs]


def test_bad_updates_change_nothing(llm, tmp_path):
    base = load_file(str(MODELS / "llama-fp32/model.safetensors"))
    upd = load_file(str(UPDATE))
    before = greedy_logprobs(llm)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(UPDATE.read_bytes()[:1000])
    cases = {
        "not a weight of this model": dict(upd, **{"model.layers.9.mlp.up_proj.weight": upd["model.norm.weight"]}),
        "shape": dict(upd, **{"model.norm.weight": torch.ones(64)}),
        "not floating point": dict(upd, **{"model.norm.weight": torch.ones(128, dtype=torch.int32)}),
        "Error": corrupt,
        "no such file": tmp_path / "missing.safetensors",
    }
    for match, weights in cases.items():
        with pytest.raises(vllm_compat.WeightUpdateError, match=match):
            vllm_compat.update_weights(llm, weights)
        assert greedy_logprobs(llm) == before, match  # nothing changed, engine still serves
    # A good update changes the output; loading the base weights back restores it exactly.
    assert vllm_compat.update_weights(llm, upd) == len(upd)
    assert greedy_logprobs(llm) != before
    vllm_compat.update_weights(llm, list(base.items()))
    assert greedy_logprobs(llm) == before


def test_directory_and_partial_updates(llm, tmp_path):
    before = greedy_logprobs(llm)
    upd = load_file(str(UPDATE))
    save_file({"lm_head.weight": upd["lm_head.weight"]}, str(tmp_path / "part.safetensors"))
    vllm_compat.update_weights(llm, tmp_path)  # a directory; only the head changes
    after = greedy_logprobs(llm)
    assert after != before
    vllm_compat.update_weights(llm, {"lm_head.weight": load_file(str(MODELS / "llama-fp32/model.safetensors"))
                                     ["lm_head.weight"]})
    assert greedy_logprobs(llm) == before


def test_tied_head_is_refreshed_after_an_update():
    """bf16 head on CPU (lm_head_fp32 left out): the tied head's packed copy must be rebuilt
    from the new embedding, or the update scenario is computed with the old head."""
    def run(refresh: bool):
        before = vllm_compat.applied()
        vllm_compat.apply(exclude=["lm_head_fp32"])
        original = weight_sync._refresh_derived
        if not refresh:
            weight_sync._refresh_derived = lambda model: None
        try:
            rows = verify.verify(GOLDEN_DIR / "fixtures", MODELS, ["qwen2-tied-bf16"], ["weight_update_greedy"],
                                 log=lambda s: None)
        finally:
            weight_sync._refresh_derived = original
            vllm_compat.apply(include=before)
        return rows[0]

    fresh, stale = run(True), run(False)
    assert fresh.judged_reference == "v0" and fresh.passed, fresh.failures
    if stale.vs["v0"] == fresh.vs["v0"]:
        # vLLM 0.18.1's Qwen2 uses the embedding module itself as lm_head: no copy to go stale.
        return
    assert stale.vs["v0"]["topk_max_abs"] > 2.0  # 0.32: measured 3.6 stale vs 0.76 refreshed

