"""Trainer-side reference: what an RL trainer computes on the engine's sequences.

HF transformers forward pass in the model's dtype with the final projection in fp32 (as
RL trainers do), then per position
  * ``scaled``: log_softmax(logits / T) over the full vocabulary (the usual trainer loss);
  * ``processed``: V0's processed distribution (logit_bias, allowed_token_ids, min_tokens,
    penalties, temperature, top-k/top-p, min-p) recomputed by :mod:`vllm_compat.v0_sampling`
    -- V0's meaning, computed by the trainer;
  * ``replayed`` (given the engine's support of each sampled token): the same distribution
    renormalised on the set the engine sampled from (support replay, vllm_compat.trainer).
Prompt positions use neutral penalties and no logits processors or min_tokens, as V0's prompt
logprobs do (``SamplingSpec.for_prompt``).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ..trainer import SampledSupport, replay_logprobs
from ..v0_sampling import SamplingSpec, v0_processed_logprobs


class TrainerReference:
    def __init__(self, model_dir: str | Path, weights: str | Path | None = None):
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(model_dir)
        dtype = (getattr(cfg, "dtype", None) if _has_dtype_kwarg() else getattr(cfg, "torch_dtype", None)) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval() \
            if _has_dtype_kwarg() else AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype).eval()
        # V0 adds the model's EOS ids to every request's min_tokens set (SamplingParams.
        # update_from_generation_config: the tokenizer's EOS and the generation config's).
        eos = getattr(cfg, "eos_token_id", None)
        self.eos_token_ids = tuple(sorted({eos} if isinstance(eos, int) else set(eos or ())))
        if weights is not None:
            self.load(weights)

    def load(self, weights: str | Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(Path(weights) / "model.safetensors") if Path(weights).is_dir() else str(weights))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or [m for m in missing if m != "lm_head.weight"]:
            raise ValueError(f"weights do not match the model: missing={missing} unexpected={unexpected}")
        self.model.tie_weights()

    @torch.no_grad()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len, vocab]; row i predicts token i+1."""
        ids = torch.tensor([token_ids])
        hidden = self.model.model(input_ids=ids).last_hidden_state[0]
        head = self.model.get_output_embeddings().weight
        return hidden.float() @ head.float().t()

    def processed_rows(self, prompt: list[int], completion: list[int], params: dict,
                       logits: torch.Tensor | None = None, param_dtype: torch.dtype | None = None) -> torch.Tensor:
        """V0's processed log-probabilities at every position of one sequence, [len - 1, vocab]:
        row i is the distribution of token i + 1 (prompt rows first, then completion rows).
        ``param_dtype``: as in v0_processed_logprobs (V0 with bf16 logits: bfloat16)."""
        spec = SamplingSpec.from_params(params, eos_token_ids=self.eos_token_ids)
        if logits is None:
            logits = self.logits(prompt + completion)[:-1]
        n_prompt_rows = len(prompt) - 1
        prompt_ctx = [prompt] * logits.shape[0]
        outputs = [[] for _ in range(n_prompt_rows)] + [completion[:t] for t in range(len(completion))]
        # Prompt rows: neutral penalties, no processors (V0); completion rows: penalties and
        # min_tokens on the real history.
        specs = [spec.for_prompt()] * n_prompt_rows + [spec] * len(completion)
        return v0_processed_logprobs(logits, specs, prompt_ctx, outputs, param_dtype=param_dtype)

    def score(self, prompt: list[int], completion: list[int], params: dict,
              support: SampledSupport | None = None) -> dict:
        """Per-token reference logprobs for one sequence (prompt token 0 has none: None).
        ``support``: the engine's support of each completion token (support replay); adds
        ``replayed`` -- the processed distribution renormalised on it (vllm_compat.trainer) --
        for the completion (the prompt's ``replayed`` is its ``processed``: nothing was sampled)."""
        spec = SamplingSpec.from_params(params, eos_token_ids=self.eos_token_ids)
        logits = self.logits(prompt + completion)[:-1]
        targets = torch.tensor(prompt[1:] + completion)
        temp = 1.0 if spec.greedy else spec.temperature
        scaled = torch.log_softmax(logits / temp, -1).gather(1, targets[:, None])[:, 0]
        processed = self.processed_rows(prompt, completion, params, logits).gather(1, targets[:, None])[:, 0]
        as_list = lambda t: [None] + [_f(x) for x in t.tolist()]  # noqa: E731
        s, p = as_list(scaled), as_list(processed)
        k = len(prompt)
        out = {"prompt": {"scaled": s[:k], "processed": p[:k]},
               "completion": {"scaled": s[k:], "processed": p[k:]}}
        if support is not None:
            replayed = replay_logprobs(logits[k - 1:], completion, support, params, prompt=prompt,
                                       eos_token_ids=self.eos_token_ids)
            out["prompt"]["replayed"] = p[:k]
            out["completion"]["replayed"] = [_f(x) for x in replayed.tolist()]
        return out


def _f(x: float) -> float:
    return -math.inf if x == -math.inf else float(x)


def _has_dtype_kwarg() -> bool:
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version("4.56")
