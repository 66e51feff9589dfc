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


# Model name -> the weight set its update scenarios load (None: no update scenarios).
MODELS = {
    "llama-fp32": "llama-fp32-update",
    "llama-bf16": None,
    "qwen2-tied-bf16": "qwen2-tied-bf16-update",
}
# References per model: stock V0, and V0 with an fp32 lm_head (only differs for bf16 models).
REFERENCES = {"llama-fp32": ["v0"], "llama-bf16": ["v0", "v0_fp32_head"],
              "qwen2-tied-bf16": ["v0", "v0_fp32_head"]}
