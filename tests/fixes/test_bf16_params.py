"""Opt-in v0_bf16_params: with bf16 logits (bf16 head) V0 divided by bf16(T). Measured as
the effective temperature T_eff = Δlogit / Δlogprob between two tokens at the same position
(greedy logprobs give Δlogit exactly)."""
import pytest

import vllm_compat
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = pytest.mark.engine
PROMPT = [17, 402, 88, 911, 5, 640, 12]


def effective_temperatures(selection, temperature=0.8):
    from vllm import LLM, SamplingParams

    before = vllm_compat.applied()
    vllm_compat.apply(include=selection)
    try:
        llm = LLM(model=str(GOLDEN_DIR / "models/llama-bf16"), dtype="bfloat16", skip_tokenizer_init=True,
                  max_model_len=512)
        outs = {t: llm.generate([{"prompt_token_ids": PROMPT}],
                                SamplingParams(temperature=t, max_tokens=1, logprobs=5, prompt_logprobs=5, seed=1),
                                use_tqdm=False)[0] for t in (0.0, temperature)}
        del llm
    finally:
        vllm_compat.apply(include=before)

    def t_eff(greedy: dict, hot: dict) -> float:
        toks = sorted(greedy.keys() & hot.keys(), key=lambda t: -greedy[t].logprob)
        a, b = toks[0], toks[-1]
        return (greedy[a].logprob - greedy[b].logprob) / (hot[a].logprob - hot[b].logprob)

    sampled = t_eff(outs[0.0].outputs[0].logprobs[0], outs[temperature].outputs[0].logprobs[0])
    prompt = t_eff(outs[0.0].prompt_logprobs[3], outs[temperature].prompt_logprobs[3])
    return sampled, prompt


def test_v0_bf16_params_rounds_the_temperature():
    base = ["defaults", "logprobs", "prompt_logprobs"]  # bf16 head: lm_head_fp32 left out
    exact = effective_temperatures(base)
    rounded = effective_temperatures(base + ["v0_bf16_params"])
    assert exact == pytest.approx((0.8, 0.8), abs=1e-5)
    assert rounded == pytest.approx((0.80078125, 0.80078125), abs=1e-5)


def test_v0_bf16_params_requires_the_logprobs_fix():
    before = vllm_compat.applied()
    try:
        with pytest.raises(ValueError, match="needs the logprobs fix"):
            vllm_compat.apply(include=["v0_bf16_params"])
    finally:
        vllm_compat.apply(include=before)
