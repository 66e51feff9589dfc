"""Fix ``prompt_logprobs``: prompt logprobs with V0's meaning.

Why: V0 computed prompt logprobs from the same processed tensor as sampled ones: the
request's temperature, top-k/top-p and min-p applied (penalties neutral), -inf outside the
kept set. V1 returns raw log-softmax for prompt tokens in every version, whatever
logprobs_mode says; RL code that scores sequences through prompt logprobs then gets a
different quantity than the rollout's logprobs.
How: ``GPUModelRunner._get_prompt_logprobs_dict`` (the CPU runner inherits it) handles all
requests with prompt logprobs in one loop. The wrapper runs it once per request, with that
request alone in ``num_prompt_logprobs`` and the sampler's ``compute_logprobs`` swapped for
V0's processing with that request's parameters; vLLM's own chunking, gathering and
CPU-transfer logic is untouched.
"""
from __future__ import annotations

import torch

from ..v0_sampling import SamplingSpec, v0_processed_logprobs
from ..registry import Fix, register

_PARAMS = ("temperature", "top_k", "top_p", "min_p")


def spec_for(sampling_params) -> SamplingSpec:
    """V0's prompt-row spec: the request's temperature and filters, neutral penalties.
    (V1 uses top_k = 0 or -1 for "off".)"""
    values = {k: getattr(sampling_params, k) for k in _PARAMS}
    if values["top_k"] is not None and values["top_k"] <= 0:
        values["top_k"] = -1
    return SamplingSpec.from_params(values)


def _processing(spec: SamplingSpec, param_dtype_of_logits: bool):
    def compute_logprobs(logits: torch.Tensor) -> torch.Tensor:
        pdt = logits.dtype if param_dtype_of_logits else None
        return v0_processed_logprobs(logits, [spec] * logits.shape[0], param_dtype=pdt)
    return compute_logprobs


def patch(patcher) -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from .. import registry

    def get_prompt_logprobs_dict(self, hidden_states, num_scheduled_tokens):
        pending = self.num_prompt_logprobs
        if not pending:
            return original(self, hidden_states, num_scheduled_tokens)
        bf16_params = "v0_bf16_params" in registry.applied()
        out = {}
        try:
            for req_id, n in list(pending.items()):
                self.num_prompt_logprobs = {req_id: n}
                request = self.requests[req_id]
                self.sampler.compute_logprobs = _processing(spec_for(request.sampling_params), bf16_params)
                try:
                    out.update(original(self, hidden_states, num_scheduled_tokens))
                finally:
                    del self.sampler.compute_logprobs  # back to the class's staticmethod
                if req_id not in self.num_prompt_logprobs:  # prefill finished: vLLM dropped it
                    del pending[req_id]
        finally:
            self.num_prompt_logprobs = pending
        return out

    original = patcher.replace(GPUModelRunner, "_get_prompt_logprobs_dict", get_prompt_logprobs_dict,
                               expect_params=["self", "hidden_states", "num_scheduled_tokens"])


register(Fix(
    name="prompt_logprobs",
    summary="prompt logprobs processed like V0 (temperature, top-k/top-p, min-p; neutral penalties)",
    why="V1 returns raw prompt logprobs in every version; V0 returned the processed distribution",
    how="GPUModelRunner._get_prompt_logprobs_dict run per request with V0 processing as compute_logprobs",
    upstream="none; patches/*/prompt_logprobs.patch proposes a prompt-logprobs mode",
    remove_when="vLLM can process prompt logprobs with the request's sampling parameters",
    patch=patch,
))
