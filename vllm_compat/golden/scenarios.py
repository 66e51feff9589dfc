"""The golden scenario matrix: what the V0 fixture generator runs, and therefore what
``vllm-compat verify`` replays (verify reads the specs back from the fixture files, so a
fixture is self-contained; this module is only the source the generator writes from).

Every request is seeded, so V0 reruns are bit-identical and V1 can be compared token for
token. Parameters are plain ``SamplingParams`` keyword dicts, valid in vLLM 0.8.5 and V1.
"""
from __future__ import annotations

import copy

MAX_TOKENS = 16

# Fixed token-id prompts (no tokenizer needed). Different lengths exercise batching.
PROMPTS = [
    [17, 402, 88, 911, 5],
    [640, 12, 12, 733, 98, 401, 256, 77],
    [3, 1001, 45, 45, 45, 870, 222, 19, 604, 388, 51, 932],
    [700, 81, 515, 29, 290, 834, 66, 147, 972, 418, 8, 655, 303, 170, 999, 42, 581],
]


def _long_prompt(length: int, seed: int) -> list[int]:
    """Deterministic pseudo-random prompt (an LCG, so no library version can change it)."""
    x, out = seed, []
    for _ in range(length):
        x = (1103515245 * x + 12345) % 2**31
        out.append(3 + x % 1021)
    return out


# Longer than one V1 CPU KV block (128 tokens), so a prefix-cache hit is possible: the
# weight-update scenarios re-send it after the update to catch stale-KV reuse.
LONG_PROMPT = _long_prompt(160, seed=7)

COMMON = dict(max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=5, prompt_logprobs=5)


def _requests(params: dict, prompts=PROMPTS, seed0: int = 1000) -> list[dict]:
    reqs = []
    for i, prompt in enumerate(prompts):
        p = dict(COMMON, **params)
        if p.get("temperature", 1.0) > 0:
            p["seed"] = seed0 + i
        reqs.append({"prompt_token_ids": list(prompt), "params": dict(sorted(p.items()))})
    return reqs


_MATRIX = [
    ("greedy", "temperature 0: argmax; logprobs are the plain log-softmax", dict(temperature=0.0)),
    ("greedy_repetition_penalty", "greedy after a repetition penalty",
     dict(temperature=0.0, repetition_penalty=1.5)),
    ("temp_0.6", "temperature below 1", dict(temperature=0.6)),
    ("temp_1.0", "temperature 1, no filters: raw == processed", dict(temperature=1.0)),
    ("temp_1.3", "temperature above 1", dict(temperature=1.3)),
    ("top_k", "top-k alone", dict(temperature=0.8, top_k=8)),
    ("top_p", "top-p alone", dict(temperature=0.8, top_p=0.8)),
    ("min_p", "min-p alone", dict(temperature=0.8, min_p=0.1)),
    ("top_k_top_p", "top-k then top-p", dict(temperature=1.0, top_k=16, top_p=0.8)),
    ("top_p_min_p", "top-p with min-p: V0 applies min-p AFTER top-p, V1 before",
     dict(temperature=1.0, top_p=0.9, min_p=0.15)),
    ("all_filters", "top-k, top-p and min-p together", dict(temperature=0.7, top_k=12, top_p=0.9, min_p=0.05)),
    ("repetition_penalty", "repetition penalty (prompt + output tokens)",
     dict(temperature=0.8, repetition_penalty=1.3)),
    ("presence_penalty", "presence penalty (output tokens)", dict(temperature=0.8, presence_penalty=1.0)),
    ("frequency_penalty", "frequency penalty (output tokens)", dict(temperature=0.8, frequency_penalty=0.7)),
    ("penalties_and_filters", "all penalties with top-p and min-p",
     dict(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.3,
          top_p=0.9, min_p=0.05)),
    ("n2", "n=2 completions per prompt (child seeds)", dict(temperature=0.9, top_k=20, n=2)),
    ("logprobs_20", "logprobs=20 lists longer than the kept set (-inf entries, ranks)",
     dict(temperature=0.8, top_k=5, logprobs=20, prompt_logprobs=10)),
]


def _mixed_batch() -> dict:
    """One batch mixing greedy and sampled rows with different filters and penalties."""
    params = [dict(temperature=0.0), dict(temperature=0.6, top_p=0.9),
              dict(temperature=1.2, min_p=0.1), dict(temperature=0.8, repetition_penalty=1.2, top_k=10)]
    reqs = []
    for i, (prompt, p) in enumerate(zip(PROMPTS, params)):
        reqs += _requests(p, [prompt], seed0=2000 + i)
    return {"name": "mixed_batch", "description": "greedy and sampled rows with different parameters in one batch",
            "requests": reqs, "update": None}


def _weight_update(name: str, params: dict, weights: str) -> dict:
    """In-flight update, V0 style: after step k, load new weights between two steps; the
    running requests keep their KV. Then the same prompts are sent again: they must be
    computed from scratch with the new weights (no stale prefix-cache reuse)."""
    prompts = [PROMPTS[1], LONG_PROMPT]
    # No prompt logprobs here: V1 bypasses the prefix cache for such requests, which would
    # hide exactly the stale-KV reuse this scenario must expose.
    params = dict(params, prompt_logprobs=None)
    return {"name": name,
            "description": f"{params}: update to '{weights}' after step 6, then the same prompts again",
            "requests": _requests(params, prompts, seed0=3000),
            "update": {"after_step": 6, "weights": weights,
                       "late_requests": _requests(params, prompts, seed0=3100)}}


def scenarios(update_weights: str | None) -> list[dict]:
    out = [{"name": n, "description": d, "requests": _requests(p, seed0=1000 + 10 * i), "update": None}
           for i, (n, d, p) in enumerate(_MATRIX)]
    out.append(_mixed_batch())
    if update_weights:
        out.append(_weight_update("weight_update_greedy", dict(temperature=0.0), update_weights))
        out.append(_weight_update("weight_update_sampled", dict(temperature=0.8, top_p=0.9), update_weights))
    return copy.deepcopy(out)


# --------------------------------------------------------------------------- wide list
# Every other SamplingParams field that changes the distribution or the stopping, degenerate
# and below-neutral values, n=3, logprobs=0 and a 16-request mixed batch. Its own list, run
# only on phi3-fp32 (fused checkpoint tensors, word-level tokenizer: V0 validates logit_bias
# and allowed_token_ids against the tokenizer), so the other models' files do not change.

# Tokens phi3-fp32 ranks first (HF fp32 greedy) at the 2nd-4th completion step of PROMPTS:
# stopping on them really happens, and min_tokens really has something to suppress; plus the
# tokens V0 draws in min_tokens_stop right at or just after min_tokens (916, 238, 562) and in
# the 16-request batch (571), so that each of those requests stops once min_tokens allows it
# (masking a token that was not drawn does not change V0's seeded draw).
STOP_TOKENS = [315, 368, 537, 466, 179, 782, 572, 835, 260, 532, 590, 160, 916, 238, 562, 571]
GREEDY_STOPS = [537, 782, 260, 160]  # the 4th greedy token of each prompt
BIAS = {315: -100.0, 466: -100.0, 572: -100.0, 532: -100.0,  # ban the greedy 2nd tokens
        17: 6.0, 402: 3.0, 640: 4.5, 1001: 2.0, 81: 5.0, 3: -3.0}
ALLOWED = sorted({*range(40, 72), 103, 814, 843, 365, 315, 466, 572, 532})


def _wide_matrix() -> list[tuple[str, str, dict | list[dict]]]:
    """(name, description, params for every prompt, or one params dict per prompt)."""
    return [
        ("greedy", "temperature 0 (the architecture's baseline)", dict(temperature=0.0)),
        ("logit_bias", "logit_bias: -100 bans, positive boosts (V0: before penalties, model dtype)",
         dict(temperature=0.8, logit_bias=BIAS)),
        ("logit_bias_greedy", "greedy after logit_bias", dict(temperature=0.0, logit_bias=BIAS)),
        ("allowed_token_ids", "allowed_token_ids: 40 tokens, every other one -inf",
         dict(temperature=1.0, allowed_token_ids=ALLOWED)),
        ("min_tokens_stop", "stop_token_ids with min_tokens 0/3/6/12 (stop ids masked before)",
         [dict(temperature=0.7, stop_token_ids=STOP_TOKENS, min_tokens=m, ignore_eos=False)
          for m in (0, 3, 6, 12)]),
        ("greedy_stop", "greedy stopping on its 4th token, or held by min_tokens=5",
         [dict(temperature=0.0, stop_token_ids=GREEDY_STOPS, min_tokens=m) for m in (0, 5, 0, 5)]),
        ("top_k_1", "top_k=1 at T=0.8: one token left", dict(temperature=0.8, top_k=1)),
        ("top_p_0.01", "top_p=0.01: only the top token survives", dict(temperature=1.0, top_p=0.01)),
        ("min_p_0.9", "min_p=0.9: at most near-ties survive", dict(temperature=1.0, min_p=0.9)),
        ("temp_2.0", "temperature 2", dict(temperature=2.0)),
        ("temp_1.7_top_p", "temperature 1.7 with top_p", dict(temperature=1.7, top_p=0.95)),
        ("penalties_below_neutral", "repetition 0.8, presence -0.5, frequency -0.3 (reward repeats)",
         dict(temperature=0.9, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=-0.3)),
        ("greedy_repetition_0.7", "greedy with repetition_penalty 0.7", dict(temperature=0.0, repetition_penalty=0.7)),
        ("n3", "n=3 completions per prompt", dict(temperature=1.0, top_p=0.95, n=3)),
        ("logprobs_0", "logprobs=0 and prompt_logprobs=0: the chosen/actual token only",
         dict(temperature=0.9, logprobs=0, prompt_logprobs=0)),
    ]


def _wide_mixed_batch() -> dict:
    """16 requests, every one with other parameters, in one batch."""
    params = [
        dict(temperature=0.0), dict(temperature=0.0, logit_bias=BIAS), dict(temperature=2.0),
        dict(temperature=0.6, top_k=1), dict(temperature=1.0, top_p=0.01), dict(temperature=1.0, min_p=0.9),
        dict(temperature=0.8, allowed_token_ids=ALLOWED), dict(temperature=0.9, logit_bias=BIAS, top_p=0.9),
        dict(temperature=0.7, stop_token_ids=STOP_TOKENS, min_tokens=4, ignore_eos=False),
        dict(temperature=1.0, repetition_penalty=0.8, presence_penalty=-0.5),
        dict(temperature=1.2, frequency_penalty=-0.3, top_k=20), dict(temperature=1.0, n=3, top_p=0.95),
        dict(temperature=0.9, logprobs=0, prompt_logprobs=0), dict(temperature=0.8, logprobs=20, prompt_logprobs=None),
        dict(temperature=1.5, top_k=16, top_p=0.9, min_p=0.05), dict(temperature=0.0, repetition_penalty=0.7),
    ]
    reqs = []
    for i, p in enumerate(params):
        reqs += _requests(p, [PROMPTS[i % len(PROMPTS)]], seed0=5000 + i)
    return {"name": "mixed_batch_16", "description": "16 requests with different parameters in one batch",
            "requests": reqs, "update": None, "record_finish_reason": True}


def wide_scenarios() -> list[dict]:
    out = []
    for i, (name, desc, params) in enumerate(_wide_matrix()):
        per_prompt = params if isinstance(params, list) else [params] * len(PROMPTS)
        reqs = []
        for j, (prompt, p) in enumerate(zip(PROMPTS, per_prompt)):
            reqs += _requests(p, [prompt], seed0=4000 + 10 * i + j)
        # record_finish_reason: results keep each completion's finish/stop reason (runner.extract).
        out.append({"name": name, "description": desc, "requests": reqs, "update": None,
                    "record_finish_reason": True})
    out.append(_wide_mixed_batch())
    return copy.deepcopy(out)


# Model name -> the weight set its update scenarios load (None: no update scenarios).
MODELS = {
    "llama-fp32": "llama-fp32-update",
    "llama-bf16": None,
    "qwen2-tied-bf16": "qwen2-tied-bf16-update",
    "phi3-fp32": None,
}
# References per model: stock V0, and V0 with an fp32 lm_head (only differs for bf16 models).
REFERENCES = {"llama-fp32": ["v0"], "llama-bf16": ["v0", "v0_fp32_head"],
              "qwen2-tied-bf16": ["v0", "v0_fp32_head"], "phi3-fp32": ["v0"]}
# Models whose fixture holds the wide list instead of the standard matrix.
WIDE_MODELS = {"phi3-fp32"}
# ... written to tests/golden/fixtures/<WIDE_DIR>/ (verify's default folder holds the standard matrix).
WIDE_DIR = "wide"


def scenarios_for(model: str) -> list[dict]:
    """The scenario list the generator runs for ``model``."""
    return wide_scenarios() if model in WIDE_MODELS else scenarios(MODELS[model])
