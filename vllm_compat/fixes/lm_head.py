"""Fix ``lm_head_fp32``: the final projection in fp32, as RL trainers compute it.

Why: with a bf16/fp16 model V1 computes logits in the model dtype; the rounding of the
logits (and of the hidden state fed to them) is exactly where trainer and engine logprobs
diverge in the tails (open-instruct #1387: 2-24 nats). The migration's V0 reference ran the
head in fp32. An fp32 head on one side only is worse than none: the trainer must match.
How: vLLM >= 0.28 has it built in (``hf_overrides={"head_dtype": "float32"}``, PR #48390):
the configure hook sets it unless the user chose a head dtype. Older versions:
``LogitsProcessor._get_logits`` projects ``hidden.float() @ weight.float().T``. Both read
``lm_head.weight`` itself at every call (tied embeddings included, never changing the shared
tensor's dtype, and never a packed CPU copy), so a weight update is visible at the next
step with no cache to refresh.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import versions
from ..registry import Fix, register


def configure(engine_args) -> None:
    if not versions.has_native_head_dtype():
        return
    overrides = engine_args.hf_overrides
    if callable(overrides):
        user = overrides

        def overrides(config):  # noqa: F811  (compose with the user's callable)
            config = user(config)
            if getattr(config, "head_dtype", None) is None:
                config.head_dtype = "float32"
            return config
    else:
        overrides = dict(overrides or {})
        overrides.setdefault("head_dtype", "float32")
    engine_args.hf_overrides = overrides


def patch(patcher) -> None:
    if versions.has_native_head_dtype():
        return
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    def _get_logits(self, hidden_states, lm_head, embedding_bias, *args, **kwargs):
        if hidden_states.dtype == torch.float32 or not isinstance(lm_head.quant_method, UnquantizedEmbeddingMethod):
            return original(self, hidden_states, lm_head, embedding_bias, *args, **kwargs)
        logits = F.linear(hidden_states.float(), lm_head.weight.float(),
                          None if embedding_bias is None else embedding_bias.float())
        logits = self._gather_logits(logits)  # TP: vocab-sharded head, gathered like vLLM does
        return None if logits is None else logits[..., : self.org_vocab_size]

    original = patcher.replace(LogitsProcessor, "_get_logits", _get_logits,
                               expect_params=["self", "hidden_states", "lm_head", "embedding_bias"])


register(Fix(
    name="lm_head_fp32",
    summary="final projection (lm_head, tied embeddings included) in fp32",
    why="bf16 logits differ from the trainer's fp32 logits by up to nats in the tails",
    how="hf_overrides head_dtype=float32 on vLLM >= 0.28; LogitsProcessor._get_logits patch before",
    upstream="built in from 0.28 (PR #48390): hf_overrides={'head_dtype': 'float32'}",
    remove_when="users on >= 0.28 can pass head_dtype themselves; the fix then only sets the default",
    patch=patch,
    configure=configure,
))
