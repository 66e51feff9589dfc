"""Trainer side of support replay: log-probabilities over exactly the set the engine sampled from.

With top-k, top-p or min-p the distribution a token is sampled from is truncated. A trainer that
re-applies the filters to its own logits decides the kept set again, on logits that differ from
the engine's by numerical noise (bf16 bodies, other kernels); near a boundary it decides
differently, and where it drops a token the engine sampled, its log-probability is -inf and the
policy ratio infinite. With support replay the engine returns, per sampled token, the kept set it
sampled from (:class:`SampledSupport`, requested with ``SamplingParams(extra_args=
{"vllm_compat_support": True})``), and the trainer renormalises its own processed distribution on
exactly that set (:func:`replay_logprobs`).

Which to use:
  * :func:`replay_logprobs` -- the trainer's side of V0's processed distribution, truncated where
    the engine truncated. Use it for the importance ratio against the engine's (processed)
    logprobs: numerator and denominator are distributions over the same support, so the ratio
    is finite and its noise is the body's only.
  * :func:`untruncated_logprobs` -- ``log_softmax(logits / T)`` over the full vocabulary, for
    trainers that define the policy without the filters (the ratio then also carries the
    truncation: log of the kept mass).

This module imports torch, numpy and vllm_compat.v0_sampling only: no vLLM (a trainer process
need not have it). ``import vllm_compat.trainer`` in a process without vLLM applies no fixes.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .v0_sampling import SamplingSpec, v0_scaled_logits

REQUEST_KEY = "vllm_compat_support"  # SamplingParams.extra_args / the server's vllm_xargs key


@dataclass
class SampledSupport:
    """Per sampled token of one completion, the token ids the engine sampled it from.

    Position i's support is ``token_ids[i]`` (sorted int32 ids) when ``complement[i]`` is False,
    and every id of the vocabulary except ``token_ids[i]`` when it is True: the engine sends
    whichever list is shorter, so a top-k of 50 costs 50 ids and an unfiltered row (T=1, no
    filters: everything kept) costs none. ``weight_version[i]``: the number of weight updates
    (``vllm_compat.update_weights``) the engine had committed when it sampled token i -- the
    policy version of that token.
    """

    token_ids: list[np.ndarray] = field(default_factory=list)
    complement: list[bool] = field(default_factory=list)
    weight_version: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def kept(self, i: int, vocab: int) -> np.ndarray:
        """Position i's kept ids, sorted."""
        ids = self.token_ids[i]
        if not self.complement[i]:
            return ids
        keep = np.ones(vocab, dtype=bool)
        keep[ids] = False
        return np.flatnonzero(keep).astype(np.int32)

    def mask(self, vocab: int, device: torch.device | str | None = None) -> torch.Tensor:
        """``[len(self), vocab]`` bool, True where kept, on ``device``."""
        n = len(self)
        listed = torch.zeros(n, vocab, dtype=torch.bool)
        if n:
            rows = np.repeat(np.arange(n), [len(t) for t in self.token_ids])
            cols = np.concatenate(self.token_ids).astype(np.int64)
            if cols.size and (cols.min() < 0 or cols.max() >= vocab):
                raise ValueError(f"support ids outside a vocabulary of {vocab}: the trainer's logits do not "
                                 f"match the engine's model")
            listed[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        flip = torch.tensor(self.complement, dtype=torch.bool).unsqueeze(1)
        return (listed ^ flip).to(device or "cpu")

    def extend(self, other: "SampledSupport") -> None:
        self.token_ids.extend(other.token_ids)
        self.complement.extend(other.complement)
        self.weight_version.extend(other.weight_version)

    # -- encodings: the engine's wire form, and JSON for the OpenAI server ---------------------

    @classmethod
    def from_wire(cls, items: Sequence[tuple[bytes, bool, int]]) -> "SampledSupport":
        return cls([np.frombuffer(b, dtype=np.int32) for b, _, _ in items],
                   [bool(c) for _, c, _ in items], [int(v) for _, _, v in items])

    def to_json(self) -> dict:
        """``token_ids``: per position, the little-endian int32 ids in base64 (a top-p row can
        keep thousands of ids: a JSON number list would be 3-4x larger and slower to parse)."""
        return {"token_ids": [base64.b64encode(t.astype("<i4").tobytes()).decode() for t in self.token_ids],
                "complement": list(self.complement), "weight_version": list(self.weight_version)}

    @classmethod
    def from_json(cls, data: dict) -> "SampledSupport":
        ids = [np.frombuffer(base64.b64decode(t), dtype="<i4").astype(np.int32) for t in data["token_ids"]]
        if not len(ids) == len(data["complement"]) == len(data["weight_version"]):
            raise ValueError("support: token_ids, complement and weight_version differ in length")
        return cls(ids, [bool(c) for c in data["complement"]], [int(v) for v in data["weight_version"]])


def replay_rows(logits: torch.Tensor, support: SampledSupport, params: dict,
                prompt: Sequence[int] | None = None, completion: Sequence[int] | None = None,
                eos_token_ids: Sequence[int] = (), param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[n, vocab]`` fp32 log-probabilities: V0's processed distribution of each completion
    position computed from the trainer's ``logits`` (``[n, vocab]``, row i predicting completion
    token i) and renormalised on the engine's support of that position.

    ``params``: the request's sampling parameters (SamplingParams fields as a dict); logit_bias,
    allowed_token_ids, min_tokens and penalties are applied as V0 did, then the temperature,
    then the support replaces top-k, top-p and min-p. ``prompt`` and ``completion`` (the tokens
    before each position) are needed for penalties and min_tokens; ``eos_token_ids``: the
    model's EOS ids (V0 adds them to the min_tokens set); ``param_dtype``: as in
    ``v0_sampling.v0_processed_logprobs`` (bf16 for V0 with bf16 logits). Given the engine's own
    logits the result equals the engine's processed logprobs bit for bit (fp32).
    """
    n, vocab = logits.shape
    if len(support) != n:
        raise ValueError(f"support holds {len(support)} positions, the logits {n}")
    spec = SamplingSpec.from_params(params, eos_token_ids=eos_token_ids)
    if spec.has_penalties and prompt is None:
        raise ValueError("penalties need the prompt (and completion) tokens")
    completion = list(completion) if completion is not None else None
    outputs = [completion[:t] for t in range(n)] if completion is not None else None
    scaled = v0_scaled_logits(logits, [spec] * n, [list(prompt)] * n if prompt is not None else None,
                              outputs, param_dtype)
    return scaled.masked_fill(~support.mask(vocab, scaled.device), -float("inf")).log_softmax(dim=-1)


def replay_logprobs(logits: torch.Tensor, completion: Sequence[int], support: SampledSupport, params: dict,
                    prompt: Sequence[int] | None = None, eos_token_ids: Sequence[int] = (),
                    param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``[n]``: the log-probability of each completion token under :func:`replay_rows` (keeps the
    autograd graph of ``logits``)."""
    rows = replay_rows(logits, support, params, prompt, completion, eos_token_ids, param_dtype)
    return rows.gather(1, torch.as_tensor(list(completion), device=rows.device).unsqueeze(1)).squeeze(1)


def untruncated_logprobs(logits: torch.Tensor, completion: Sequence[int], temperature: float) -> torch.Tensor:
    """``[n]``: ``log_softmax(logits / T)`` of each completion token over the full vocabulary
    (T below 1e-5, greedy, counts as 1, as in V0)."""
    t = 1.0 if temperature < 1e-5 else temperature
    rows = (logits.float() / t).log_softmax(dim=-1)
    return rows.gather(1, torch.as_tensor(list(completion), device=rows.device).unsqueeze(1)).squeeze(1)
