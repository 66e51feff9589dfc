# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""V0-compatible sampling semantics (``--sampler-compat v0``).

RL trainers compare the logprobs an engine returns with the logprobs they compute
themselves; many were built against the V0 engine (vLLM <= 0.10). V0 sampled from, and with
processed logprobs described, this distribution:

    penalties -> temperature -> top-k, then top-p (sort based; ties with the k-th value
    stay) -> min-p -> sample

V1 applies min-p *before* top-k/top-p (they do not commute once top-p is set), may use
kernels with other tie handling, ranks a token as the number of entries ``>=`` its logprob
(V0: 1 + the number strictly greater), and never processes prompt logprobs. The functions
at the end of this module (``sample``, ``count_ranks``, ``prompt_logprobs``) give the V1
sampler and model runner V0's semantics. The draw itself stays V1's, except on CPU: seeded
requests use V0's exponential race, so that a seeded request gives the tokens V0 gave, and
unseeded ones an inverse-CDF draw of the same distribution.
"""
# The vLLM side of the module that `vllm-compat patches build` writes into logprobs.patch
# (vllm/v1/sample/ops/v0_sampling.py): this file's header, then the code of
# vllm_compat/v0_sampling.py and vllm_compat/v0_draw.py, then the functions below, which
# use their names (top_k_top_p_with_candidates, draw, SamplingSpec, v0_processed_logprobs).
from vllm.platforms import current_platform


@torch.compile(backend=current_platform.simple_compile_backend)
def count_ranks(logprobs: torch.Tensor, token_logprobs: torch.Tensor) -> torch.Tensor:
    """V0's rank: 1 + the number of entries strictly greater (token_logprobs: [rows, 1]).
    Compiled like ``batched_count_greater_than``, for the same reason."""
    return (logprobs > token_logprobs).sum(-1) + 1


def prompt_logprobs(logits: torch.Tensor, sampling_params) -> torch.Tensor:
    """Prompt logprobs as V0 computed them: the request's temperature, top-k/top-p and
    min-p applied to every prompt position (penalties neutral), then log_softmax."""
    params = {
        name: getattr(sampling_params, name)
        for name in ("temperature", "top_k", "top_p", "min_p")
    }
    if params["top_k"] is not None and params["top_k"] <= 0:  # V1's "off" is 0 or -1
        params["top_k"] = -1
    spec = SamplingSpec.from_params(params)
    return v0_processed_logprobs(logits, [spec] * logits.shape[0])


def sample(sampler, logits: torch.Tensor, sampling_metadata, logprobs_mode: str):
    """``Sampler.sample`` with V0's order. Returns (sampled, processed logprobs or None)."""
    md = sampling_metadata
    want_logprobs = logprobs_mode.startswith("processed") and (
        md.max_num_logprobs is not None or bool(getattr(md, "logprob_token_ids", None))
    )

    def processed(x: torch.Tensor) -> torch.Tensor | None:
        if not want_logprobs:
            return None
        if logprobs_mode == "processed_logits":
            return x
        return x.log_softmax(dim=-1, dtype=torch.float32)

    greedy = None if md.all_random else sampler.greedy_sample(logits)
    if md.all_greedy:
        return greedy, processed(logits)
    logits = sampler.apply_temperature(logits, md.temperature, md.all_random)
    candidates = None  # [rows, c]: every token left finite, where the top-k path found them
    if md.top_k is not None or md.top_p is not None:
        rows, vocab = logits.shape
        k = md.top_k if md.top_k is not None else torch.full((rows,), vocab, device=logits.device)
        p = md.top_p if md.top_p is not None else torch.ones(rows, device=logits.device)
        logits, candidates = top_k_top_p_with_candidates(logits, k, p, k_min=vocab if md.top_k is None else None)
    for processor in md.logitsprocs.argmax_invariant:  # min-p, after top-k/top-p
        logits = processor.apply(logits)
    # The draw: on CPU V0's (seeded rows by its exponential race, unseeded ones by inverse
    # CDF, cheaper than V1's CPU Gumbel kernel); elsewhere V1's sampler over the filtered
    # distribution (no further filtering).
    if logits.device.type == "cpu":
        sampled, logprobs = draw(logits, md.generators, candidates), processed(logits)
    else:
        sampled, logprobs = sampler.topk_topp_sampler(logits, md.generators, None, None)
        if want_logprobs and logprobs is None:
            logprobs = processed(logits)
        if not want_logprobs:
            logprobs = None
    if greedy is not None:
        sampled = torch.where(md.temperature < _GREEDY_EPS, greedy, sampled, out=greedy)
    return sampled, logprobs
