"""Run golden scenarios on a live engine (V0 0.8.5 for the generator, V1 for verify) and
extract results in the fixture format. Uses only APIs that V0 and V1 share:
``LLM.generate`` and ``LLMEngine.add_request/step`` for the in-flight update scenarios.
"""
from __future__ import annotations

import math
from typing import Any, Callable

NEG_INF = "-inf"  # JSON has no -Infinity; fixtures spell it as this string


def encode_lp(x: float) -> float | str:
    if math.isnan(x):
        raise ValueError("NaN logprob")
    return NEG_INF if x == -math.inf else float(x)


def decode_lp(x: float | str) -> float:
    if x == NEG_INF:
        return -math.inf
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise ValueError(f"bad logprob value {x!r}")
    return float(x)


def _position(entry: dict | None) -> list | None:
    """One position's {token: Logprob} -> sorted [[token, logprob, rank], ...]."""
    if entry is None:
        return None
    return sorted([int(t), encode_lp(lp.logprob), None if lp.rank is None else int(lp.rank)]
                  for t, lp in entry.items())


def _support_json(completion) -> dict | None:
    # Set by the `support` fix where the request asked for it (V1 only; V0 fixtures have none).
    found = getattr(completion, "vllm_compat_support", None)
    return None if found is None else found.to_json()


def extract(output: Any, finish_reason: bool = False) -> dict:
    """A vLLM RequestOutput -> fixture dict. ``finish_reason``: also keep each completion's
    ``finish_reason`` ("length" / "stop") and ``stop_reason`` (the stop token id, or None)
    -- only for scenarios that ask for it (``record_finish_reason``), so older fixture
    files, which have no such keys, are regenerated unchanged."""
    plp = output.prompt_logprobs

    def completion(c) -> dict:
        out = {"index": c.index, "token_ids": list(c.token_ids),
               "logprobs": None if c.logprobs is None else [_position(e) for e in c.logprobs]}
        if finish_reason:
            out["finish_reason"] = c.finish_reason
            out["stop_reason"] = c.stop_reason
        support = _support_json(c)
        if support is not None:
            out["support"] = support
        return out

    return {
        "prompt_logprobs": None if plp is None else [_position(e) for e in plp],
        "completions": [completion(c) for c in sorted(output.outputs, key=lambda c: c.index)],
    }


def sampling_params(params: dict, support: bool = False):
    """``support``: ask for support replay (the `support` fix; V1 only)."""
    from vllm import SamplingParams

    if params.get("logit_bias"):  # JSON object keys are strings; SamplingParams wants token ids
        params = dict(params, logit_bias={int(t): float(b) for t, b in params["logit_bias"].items()})
    if support:
        params = dict(params, extra_args={**(params.get("extra_args") or {}), "vllm_compat_support": True})
    return SamplingParams(**params)


def run_scenario(llm: Any, scenario: dict, load_update: Callable[[str], None] | None = None,
                 support: bool = False) -> list[dict]:
    """Run one scenario; returns one result per request (late requests after the others).
    ``support``: every request asks for support replay; each completion then has ``support``."""
    update = scenario.get("update")
    reqs = scenario["requests"]
    reasons = bool(scenario.get("record_finish_reason"))
    if update is None:
        outs = llm.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in reqs],
                            [sampling_params(r["params"], support) for r in reqs], use_tqdm=False)
        return [extract(o, reasons) for o in outs]
    if load_update is None:
        raise ValueError(f"scenario {scenario['name']} needs a weight-update callback")
    engine = llm.llm_engine
    finished: dict[str, Any] = {}

    def add(prefix: str, rs: list[dict]) -> list[str]:
        ids = []
        for i, r in enumerate(rs):
            rid = f"{prefix}-{i}"
            engine.add_request(rid, {"prompt_token_ids": r["prompt_token_ids"]}, sampling_params(r["params"], support))
            ids.append(rid)
        return ids

    def step() -> None:
        for o in engine.step():
            if o.finished:
                finished[o.request_id] = o

    first = add("early", reqs)
    for _ in range(update["after_step"]):
        step()
    if any(rid in finished for rid in first):
        raise RuntimeError("a request finished before the update step; lengthen max_tokens")
    load_update(update["weights"])
    late = add("late", update["late_requests"])
    while engine.has_unfinished_requests():
        step()
    return [extract(finished[rid], reasons) for rid in first + late]
