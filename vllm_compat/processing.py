"""V0's logits processing (vLLM 0.8.5 ``Sampler.forward``) in plain torch.

This is the one reference implementation of "the distribution V0 sampled from". The
trainer-side reference and ``vllm-compat verify`` use it; fixes reuse it instead of
re-deriving V0's order. Everything here works on 2-D float tensors ``[rows, vocab]``
on any device: tensors made per call live on the logits' device, decisions that the Python
sampling parameters answer are taken from them, and the host reads a per-step tensor only
through :func:`_host` (one data-dependent decision, see ``_top_k_candidates``).

V0's order (0.8.5 sampler.py 216-324):
  penalties (model dtype) -> fp32 cast -> / temperature -> top-k then top-p (sort based)
  -> min-p (AFTER top-k/top-p; V1 applies it before) -> log_softmax in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

_GREEDY_EPS = 1e-5  # V0 treats T < 1e-5 as greedy and divides by 1.0


@dataclass(frozen=True)
class SamplingSpec:
    """The sampling parameters that change V0's processed distribution."""

    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @classmethod
    def from_params(cls, params: dict) -> "SamplingSpec":
        spec = cls(**{k: params[k] for k in cls.__dataclass_fields__ if params.get(k) is not None})
        if spec.temperature < _GREEDY_EPS:  # SamplingParams resets the filters for greedy
            spec = cls(temperature=0.0, repetition_penalty=spec.repetition_penalty,
                       presence_penalty=spec.presence_penalty, frequency_penalty=spec.frequency_penalty)
        return spec

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)


def _host(t: torch.Tensor):
    """Read a per-step tensor on the host. On an accelerator this waits for its queue, so the
    per-step path does it only where a shape depends on the data; tests count these calls."""
    return t.item()


def _from_host(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A Python list as a tensor on ``device``. One value for every row (the prompt_logprobs
    fix: one request) is a fill on the device; otherwise a copy, from pinned memory on CUDA
    (a copy from pageable memory waits for the GPU's queue)."""
    if values and all(v == values[0] for v in values):
        return torch.full((len(values),), values[0], dtype=dtype, device=device)
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def bin_counts(token_lists: Sequence[Sequence[int]], vocab: int,
               device: torch.device | str | None = None) -> torch.Tensor:
    """Per row, how often each token id occurs: ``[rows, vocab]`` long, on ``device``."""
    device = torch.device(device or "cpu")
    counts = torch.zeros(len(token_lists) * vocab, dtype=torch.long, device=device)
    # One index_add_ over the flattened [rows * vocab] counts, one index copy for all rows.
    flat = [i * vocab + t for i, toks in enumerate(token_lists) for t in toks]
    if flat:
        counts.index_add_(0, _from_host(flat, torch.long, device),
                          torch.ones(len(flat), dtype=torch.long, device=device))
    return counts.view(len(token_lists), vocab)


def apply_penalties(logits: torch.Tensor, prompt_counts: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """V0 ``apply_penalties``: repetition over prompt+output tokens, frequency/presence over output."""
    rep = repetition.to(logits.dtype).unsqueeze(1).repeat(1, logits.shape[1])
    rep[~((prompt_counts > 0) | (output_counts > 0))] = 1.0
    logits = torch.where(logits > 0, logits / rep, logits * rep)
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
    logits = logits - presence.to(logits.dtype).unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


_MAX_CANDIDATES = 1024  # top-k up to this size takes the partial-sort path


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                      k_max: int | None = None) -> torch.Tensor:
    """V0 ``_apply_top_k_top_p``: top-k keeps ties with the k-th value, then top-p on the
    top-k-renormalized distribution; at least one token survives. When every row has a
    top-k below the vocabulary (the usual RL setting), only the kept candidates are sorted
    (``topk``); otherwise, like V0, the whole vocabulary (``apply_top_k_top_p_sorted``).
    ``k_max``: the largest k as a Python int, if the caller knows it (saves a host read)."""
    found = _top_k_candidates(logits, k, k_max=k_max)
    if found is None:
        return apply_top_k_top_p_sorted(logits, k, p)
    ascending, idx = _top_p_ascending(*found, p)
    return torch.full_like(logits, -float("inf")).scatter_(dim=-1, index=idx, src=ascending)


def _top_k_candidates(logits: torch.Tensor, k: torch.Tensor, temperature: torch.Tensor | None = None,
                      k_max: int | None = None):
    """-> (values, indices, k-th values) of each row's top-k candidates, ties with the k-th
    value included, values descending and divided by ``temperature`` ([rows]) if given;
    None where the whole vocabulary must be sorted (a top-k off or above _MAX_CANDIDATES).
    ``k_max``: ``max(k)`` as a Python int; None reads it from ``k`` (a host read)."""
    rows, vocab = logits.shape
    if rows == 0:
        return None
    if k_max is None:
        k_max = int(_host(k.max()))
    if k_max >= vocab or k_max > _MAX_CANDIDATES:  # max(k) >= vocab: some row has top-k off
        return None
    k = k.to(torch.long)
    # topk of the raw row equals topk of the row divided by T > 0 (division is monotonic), so
    # only the candidates are divided. One candidate more than the largest k: if it is below
    # every row's k-th value, no tie with a k-th value lies outside the candidates (a count
    # over the whole row would cost more than the topk).
    vals, idx = logits.topk(k_max + 1, dim=-1)
    if temperature is not None:
        vals = vals / temperature.unsqueeze(1)
    kth = vals.gather(1, (k - 1).unsqueeze(1))
    # The one host read of the data: how many candidates there are (a shape) depends on whether
    # a tie with a k-th value lies past them, which no sampling parameter can tell.
    if _host((vals[:, -1:] < kth).all()):
        return vals[:, :-1], idx[:, :-1], kth
    # Ties with the k-th value stay, as in V0 (division by T can create them, too): keep them all.
    # Rare (tied logits at the k-th value), and a second host read: their number is a shape.
    full = logits if temperature is None else logits / temperature.unsqueeze(1)
    kept = int(_host((full >= kth).sum(dim=-1, dtype=torch.int32).max()))
    if kept > _MAX_CANDIDATES:
        return None
    vals, idx = full.topk(kept, dim=-1)
    return vals, idx, kth


def _top_p_ascending(vals: torch.Tensor, idx: torch.Tensor, kth: torch.Tensor, p: torch.Tensor):
    """V0's top-k mask and top-p cut on descending candidates -> (values, indices) in V0's
    ascending order, -inf where dropped."""
    ascending = vals.masked_fill(vals < kth, -float("inf")).flip(-1)  # V0's sort order
    probs_sum = ascending.softmax(dim=-1).cumsum(dim=-1)  # V0's zeros below the cut add nothing
    top_p_mask = probs_sum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    return ascending.masked_fill_(top_p_mask, -float("inf")), idx.flip(-1)


def apply_top_k_top_p_sorted(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """V0's own implementation: sort the whole vocabulary ascending, mask below the k-th
    value, then mask the low tail whose cumulative probability is <= 1 - p."""
    logits_sort, logits_idx = logits.sort(dim=-1, descending=False)
    kth = logits_sort.gather(1, (logits_sort.size(1) - k.to(torch.long)).unsqueeze(1))
    logits_sort.masked_fill_(logits_sort < kth, -float("inf"))
    probs_sum = logits_sort.softmax(dim=-1).cumsum(dim=-1)
    top_p_mask = probs_sum <= 1 - p.unsqueeze(1)
    top_p_mask[:, -1] = False
    logits_sort.masked_fill_(top_p_mask, -float("inf"))
    return torch.empty_like(logits_sort).scatter_(dim=-1, index=logits_idx, src=logits_sort)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """V0 ``_apply_min_p``: drop tokens whose probability is below min_p * max probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -float("inf"))


def v0_processed_logprobs(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                          prompt_tokens: Sequence[Sequence[int]] | None = None,
                          output_tokens: Sequence[Sequence[int]] | None = None,
                          param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities of the distribution V0 samples from, one row per spec.

    ``logits``: raw lm_head output rows (any float dtype; penalties run in that dtype as
    in V0). ``prompt_tokens``/``output_tokens``: per row, for penalties (None = neutral,
    which is what V0 uses for prompt-logprob rows). ``param_dtype``: dtype in which V0
    materialised the sampling parameters (its logits dtype); None = exact fp32.
    """
    rows, vocab = logits.shape
    pdt = param_dtype or torch.float32

    def col(values) -> torch.Tensor:  # fp32 first, then pdt: V0's rounding, whatever pdt is
        return _from_host(values, torch.float32, logits.device).to(pdt)

    if prompt_tokens is not None and any(s.has_penalties for s in specs):
        out = output_tokens or [[] for _ in range(rows)]
        logits = apply_penalties(logits, bin_counts(prompt_tokens, vocab, logits.device),
                                 bin_counts(out, vocab, logits.device),
                                 col([s.repetition_penalty for s in specs]),
                                 col([s.frequency_penalty for s in specs]),
                                 col([s.presence_penalty for s in specs]))
    logits = logits.to(torch.float32)
    temp_values = [1.0 if s.greedy else s.temperature for s in specs]
    temps = col(temp_values).to(torch.float32)
    with_min_p = any(s.min_p > 0 for s in specs)
    if any(s.top_k != -1 or s.top_p < 1.0 for s in specs):
        k_values = [vocab if s.top_k == -1 else min(s.top_k, vocab) for s in specs]
        ks = _from_host(k_values, torch.long, logits.device)
        # ps stays in the parameter dtype: V0 computes ``1 - p`` in it (bf16 with bf16 logits).
        ps = col([s.top_p for s in specs])
        found = None if with_min_p else _top_k_candidates(logits, ks, temps, k_max=max(k_values))
        if found is not None:
            # Everything outside the candidates is -inf, so the log-softmax of the candidates alone,
            # scattered into a -inf row, is the same distribution (the normalising sum differs from
            # the full row's by rounding only) without two passes over the vocabulary.
            ascending, idx = _top_p_ascending(*found, ps)
            return torch.full_like(logits, -float("inf")).scatter_(-1, idx, ascending.log_softmax(dim=-1))
        logits = logits / temps.unsqueeze(1)
        if with_min_p:
            logits = apply_top_k_top_p(logits, ks, ps, k_max=max(k_values))
        else:  # _top_k_candidates already refused these rows: V0's full sort
            logits = apply_top_k_top_p_sorted(logits, ks, ps)
    elif any(t != 1.0 for t in temp_values):  # x / 1.0 == x: no copy of the row needed
        logits = logits / temps.unsqueeze(1)
    if with_min_p:
        logits = apply_min_p(logits, col([s.min_p for s in specs]).to(torch.float32))
    return torch.log_softmax(logits, dim=-1)


def v0_rank(row: torch.Tensor, token: int) -> int:
    """V0's rank: 1 + number of strictly larger values (V1 counts >=)."""
    return int((row > row[token]).sum().item()) + 1
