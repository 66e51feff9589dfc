"""Fix ``v0_bf16_params`` (opt-in): sampling parameters rounded to the logits dtype, as V0 did.

Why: V0 built its sampling-parameter tensors in the logits dtype, so with bf16 logits
T=0.8 acted as 0.80078125, top_p=0.9 as 0.90234375 (``1 - p`` computed in bf16) and min_p
in bf16. Reproducing that brings V1 closer to a stock-V0 bf16 run. Off by default because
the trainer divides by the exact temperature: matching V0's rounding moves the engine away
from the trainer; and with an fp32 head (lm_head_fp32) V0 itself used exact values.
Not reproduced: V0 applied penalties in the model dtype; V1 applies them in fp32.
How: ``Sampler.forward`` records the dtype of the incoming logits for the ``logprobs`` fix's
V0 sampler (which it therefore requires); prompt logprobs read the dtype of their logits.
"""
from __future__ import annotations

import torch

from .. import registry
from ..registry import Fix, register


def patch(patcher) -> None:
    if "logprobs" not in registry.applied():
        raise ValueError("v0_bf16_params needs the logprobs fix (it rounds inside V0's sampler)")
    from vllm.v1.sample.sampler import Sampler

    def forward(self, logits, *args, **kwargs):
        self.v0_param_dtype = None if logits.dtype == torch.float32 else logits.dtype
        return original(self, logits, *args, **kwargs)

    original = patcher.replace(Sampler, "forward", forward, expect_params=["self", "logits", "sampling_metadata"])


register(Fix(
    name="v0_bf16_params",
    summary="(opt-in) temperature/top-p/min-p rounded to the logits dtype, as V0 did with bf16 logits",
    why="bit-level comparison with stock-V0 bf16 runs (bf16 head): V0 applied T=0.8 as 0.80078125",
    how="Sampler.forward records the logits dtype; the logprobs fix's sampler and prompt logprobs round with it",
    upstream="none (V0 behaviour, not wanted upstream)",
    remove_when="no longer comparing against stock-V0 bf16 runs",
    patch=patch,
    default=False,
))
