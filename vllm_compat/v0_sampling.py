"""V0's logits processing (vLLM 0.8.5 ``Sampler.forward``) in plain torch.

This is the one reference implementation of "the distribution V0 sampled from". The
trainer-side reference and ``vllm-compat verify`` use it; fixes reuse it instead of
re-deriving V0's order. Everything here works on 2-D float tensors ``[rows, vocab]``
on any device: tensors made per call live on the logits' device, decisions that the Python
sampling parameters answer are taken from them, and the host reads a per-step tensor only
through :func:`_host` (a data-dependent shape: ``_top_k_candidates``' tie check, one read per
round of ``_top_k_top_p_partial``).

V0's order (0.8.5 logits_processor.py, sampler.py 216-324):
  logits processors of sampled rows, in the model dtype: logit_bias (clamped to +-100), then
  allowed_token_ids (``get_logits_processors``' order) -> min_tokens (every stop id and the EOS
  ids -inf while a sequence has fewer outputs) -> penalties (model dtype) -> fp32 cast
  -> / temperature -> top-k then top-p (sort based) -> min-p (AFTER top-k/top-p; V1 applies it
  before) -> log_softmax in fp32.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
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
    # V0's logits processors and min_tokens: sampled rows only (V0's prompt-logprob rows get
    # neither; see ``for_prompt``). ``logit_bias``: sorted (token id, bias) pairs, bias clamped
    # to [-100, 100] as V0's ``get_logits_processors`` does; ``allowed_token_ids``: None = all.
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] | None = None
    # While a sequence has fewer than ``min_tokens`` outputs, every id in ``min_tokens_ids`` is
    # -inf: V0's ``all_stop_token_ids``, the request's stop_token_ids plus the model's EOS ids
    # (added whatever ignore_eos says; ``from_params(eos_token_ids=...)``).
    min_tokens: int = 0
    min_tokens_ids: tuple[int, ...] = ()

    @classmethod
    def from_params(cls, params: dict, eos_token_ids=()) -> "SamplingSpec":
        """``params``: SamplingParams fields (a fixture's dict; logit_bias keys may be strings).
        ``eos_token_ids``: the model's EOS ids, which V0 adds to the min_tokens set."""
        plain = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty")
        values = {k: params[k] for k in plain if params.get(k) is not None}
        if params.get("logit_bias"):
            values["logit_bias"] = tuple(sorted((int(t), min(100.0, max(-100.0, float(b))))
                                                for t, b in params["logit_bias"].items()))
        if params.get("allowed_token_ids") is not None:
            values["allowed_token_ids"] = tuple(sorted({int(t) for t in params["allowed_token_ids"]}))
        if params.get("min_tokens"):
            values["min_tokens"] = int(params["min_tokens"])
            values["min_tokens_ids"] = tuple(sorted({int(t) for t in params.get("stop_token_ids") or ()}
                                                    | {int(t) for t in eos_token_ids}))
        spec = cls(**values)
        if spec.temperature < _GREEDY_EPS:  # SamplingParams resets the filters for greedy
            spec = replace(spec, temperature=0.0, top_k=-1, top_p=1.0, min_p=0.0)
        return spec

    def for_prompt(self) -> "SamplingSpec":
        """V0's spec for prompt-logprob rows: temperature and filters, neutral penalties, no
        logits processors, no min_tokens (``sampling_metadata.py`` 436-448; the processors and
        min_tokens touch sampled rows only)."""
        return replace(self, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                       logit_bias=(), allowed_token_ids=None, min_tokens=0, min_tokens_ids=())

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def has_processors(self) -> bool:
        """logit_bias, allowed_token_ids or min_tokens set (whether they bite depends on the row)."""
        return bool(self.logit_bias) or self.allowed_token_ids is not None or (
            self.min_tokens > 0 and bool(self.min_tokens_ids))


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


def apply_logits_processors(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                            output_lengths: Sequence[int]) -> torch.Tensor:
    """V0's per-request logits processors and min_tokens, in the logits' dtype (a new tensor):
    logit_bias (``logits[t] += bias``: the sum in the dtype's op-math, fp32 for bf16/fp16, then
    rounded), then allowed_token_ids (everything else -inf), then min_tokens (the min_tokens
    ids -inf in rows with fewer than ``min_tokens`` outputs; ``output_lengths``: per row)."""
    rows, vocab = logits.shape
    device = logits.device
    logits = logits.clone(memory_format=torch.contiguous_format)
    flat = logits.view(-1)
    bias = [(i * vocab + t, b) for i, s in enumerate(specs) for t, b in s.logit_bias]
    if bias:
        idx = _from_host([i for i, _ in bias], torch.long, device)
        vals = _from_host([b for _, b in bias], torch.float32, device)
        acc = torch.promote_types(logits.dtype, torch.float32)  # op-math of `x += python float`
        flat.index_copy_(0, idx, (flat.index_select(0, idx).to(acc) + vals.to(acc)).to(logits.dtype))
    allowed_rows = [i for i, s in enumerate(specs) if s.allowed_token_ids is not None]
    if allowed_rows:
        banned = torch.zeros(rows * vocab, dtype=torch.bool, device=device)
        banned.view(rows, vocab).index_fill_(0, _from_host(allowed_rows, torch.long, device), True)
        keep = [i * vocab + t for i in allowed_rows for t in specs[i].allowed_token_ids]
        if keep:
            banned.index_fill_(0, _from_host(keep, torch.long, device), False)
        flat.masked_fill_(banned, -float("inf"))
    held = [i * vocab + t for i, (s, n) in enumerate(zip(specs, output_lengths))
            if n < s.min_tokens for t in s.min_tokens_ids]
    if held:
        flat.index_fill_(0, _from_host(held, torch.long, device), -float("inf"))
    return logits


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
    (``topk``); otherwise the exact partial path ``_top_k_top_p_partial`` (V0's kept set
    from a ``topk``, V0's full sort only for rows it cannot decide exactly).
    ``k_max``: the largest k as a Python int, if the caller knows it (saves a host read)."""
    found = _top_k_candidates(logits, k, k_max=k_max)
    if found is None:
        return _top_k_top_p_partial(logits, k, p)
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
    # Rare (tied logits at the k-th value), and a second host read: their number is a shape. A NaN
    # k-th value (a broken model's row) also lands here: its row counts no candidate, so the batch
    # takes V0's own sort, which gives such rows NaN as V0 did (nothing raises). One read for both.
    full = logits if temperature is None else logits / temperature.unsqueeze(1)
    most = (full >= kth).sum(dim=-1, dtype=torch.int32).max()
    code = int(_host(most + (vocab + 1) * torch.isnan(kth).any().to(torch.int32)))
    has_nan, kept = divmod(code, vocab + 1)
    if has_nan or kept > _MAX_CANDIDATES:
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


# Exact top-p without sorting the vocabulary ---------------------------------------------------
#
# V0 keeps, in the ascending sorted row, the tokens whose cumulative probability c_j (fp32 softmax
# over the whole row, then ``cumsum``) is > 1 - p, and always its largest. c_j only grows along
# the ascending order, so the kept set is the top K tokens: found from a ``topk``, if the
# candidates reach below the cut. The candidates' c_j are computed here from the row's own
# softmax (V0's exp of each value, in float64 sums), which differs from V0's fp32 arithmetic by
# rounding only; ``_top_p_decide`` bounds that difference rigorously (under the model of V0's
# sum in ``_sum_model``) and accepts a row only where every decision is further from 1 - p than
# the bound. Rows it cannot decide (a tie cut by the boundary, a margin within the bound, a
# token that may underflow with p = 1) are sorted as V0 did; rows whose cut lies below the
# candidates get a 4x larger ``topk``. One host read per round: its answer is a shape.

_TOP_P_CANDIDATES = 1024  # the first round's topk; x4 per further round, full sort from vocab / 2
_U = 2.0 ** -24  # fp32 unit roundoff


def _sum_model(device: torch.device) -> tuple[int, int] | None:
    """How V0's fp32 softmax sums a row on this device: (lanes, additions combining them).
    CPU: ``vec::reduce_all`` -- ``Vectorized<float>`` lanes, each summing its strided share of the
    ascending row in memory order; ``cumsum`` of fp32 accumulates in double. None: no model
    known for the device (CUDA's block reduction and fp32 scan are unverified here), so every
    row is sorted as in V0. ``meta`` follows CPU so that the device tests run the code."""
    if device.type not in ("cpu", "meta"):
        return None
    cap = torch.backends.cpu.get_cpu_capability()
    lanes = 16 if cap.startswith("AVX512") else 8 if cap == "AVX2" else 1  # 1: sequential, always safe
    return lanes, 64


def _top_k_top_p_partial(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                         top_k_max: int | None = None, p_one: bool = True) -> torch.Tensor:
    """``apply_top_k_top_p_sorted``'s result, bit for bit, sorting only the rows that need it.
    Hints a caller may know from the sampling parameters (none is a host read): ``top_k_max``,
    the largest k below the vocabulary (0: none), which sizes the first topk; ``p_one=False``:
    no row has ``1 - p <= 0`` without a top-k (saves a pass over the rows)."""
    rows, vocab = logits.shape
    model = _sum_model(logits.device)
    kc = min(max(_TOP_P_CANDIDATES, top_k_max or 0), vocab)
    if rows == 0 or model is None or 2 * kc > vocab:
        return apply_top_k_top_p_sorted(logits, k, p)
    k = k.to(torch.long)
    probs = logits.softmax(dim=-1)  # V0's exp of every value; its normaliser is re-derived below
    thr = (1 - p.unsqueeze(1)).to(torch.float64)  # V0's 1 - p, computed in p's dtype
    out = torch.empty_like(logits)
    pending, n = torch.arange(rows, device=logits.device), rows
    while True:
        sel = (lambda t: t) if n == rows else (lambda t: t.index_select(0, pending))
        sub = sel(logits)
        vals, idx = sub.topk(kc, dim=-1)
        keep, whole, more, fallback = _top_p_decide(sub, vals, idx, sel(probs), sel(k), sel(thr), model, p_one)
        kept = vals.masked_fill(torch.arange(kc, device=vals.device) >= keep.unsqueeze(1), -float("inf"))
        res = (out if n == rows else torch.empty_like(sub)).fill_(-float("inf")).scatter_(1, idx, kept)
        if p_one:
            res = torch.where(whole.unsqueeze(1), sub, res)
        if n < rows or p_one:
            out.index_copy_(0, pending, res)
        # The one host read of a round: how many rows need a full sort, and how many a larger topk.
        code = int(_host(more.sum() * (rows + 1) + fallback.sum()))
        n_more, n_sort = divmod(code, rows + 1)
        if n_sort:
            rs = pending.index_select(0, fallback.to(torch.int8).argsort(descending=True, stable=True)[:n_sort])
            out.index_copy_(0, rs, apply_top_k_top_p_sorted(logits.index_select(0, rs), k.index_select(0, rs),
                                                            p.index_select(0, rs)))
        if not n_more:
            return out
        pending = pending.index_select(0, more.to(torch.int8).argsort(descending=True, stable=True)[:n_more])
        n, kc = n_more, kc * 4
        if 2 * kc > vocab:  # nearly the whole row: V0's sort
            out.index_copy_(0, pending, apply_top_k_top_p_sorted(logits.index_select(0, pending),
                                                                 k.index_select(0, pending),
                                                                 p.index_select(0, pending)))
            return out


def _top_p_decide(sub, vals, idx, probs, k, thr, model, p_one=True):
    """For each row of the candidates (``vals`` descending, ``idx``): -> (number kept from the top,
    row kept whole, needs a larger topk, needs V0's sort), all [rows]."""
    lanes, combine = model
    n, kc = vals.shape
    vocab = sub.shape[1]
    f64 = torch.float64
    topk_on = (k < vocab).unsqueeze(1)
    kth = vals.gather(1, (k.clamp(1, kc) - 1).unsqueeze(1))
    in_topk = ~topk_on | (vals >= kth)  # V0's top-k mask on the candidates (a prefix)
    # Top-k decided among the candidates: k within them and no tie with the k-th value past them.
    topk_covered = (k <= kc).unsqueeze(1) & ((vals[:, -1:] < kth) | (kc == vocab))
    pc = probs.gather(1, idx).to(f64) * in_topk
    cand = pc.sum(1, keepdim=True)
    # Top-k on: everything past the candidates is -inf in V0's row (exp 0, adds exactly nothing).
    tail = torch.where(topk_on, 0.0, (probs.sum(1, dtype=f64, keepdim=True) - cand).clamp_min(0.0))
    z = tail + cand
    cum = (tail + pc.flip(1).cumsum(1).flip(1)) / z  # V0's c_j at candidate i (exact up to rounding)
    # Error bound of V0's fp32 normaliser (a sum of positive terms: rounding <= u * the partial
    # sums). A lane takes the ascending row in order, so when it adds candidate i its partial sum
    # is at most the mass of the values <= vals[i] (ties included: c at the first of them); over
    # the tail (nt values, mass T, each <= the last candidate q) a lane's partials sum to at most
    # (T / lanes + q) * (nt / lanes + 2) / 2, (T + lanes * q) * (nt / lanes + 2) / 2 over all lanes
    # (strided lanes of a sorted row differ by one value at most).
    col = torch.arange(kc, device=vals.device)
    starts = torch.ones_like(vals, dtype=torch.bool)
    starts[:, 1:] = vals[:, 1:] != vals[:, :-1]
    first = torch.where(starts, col, 0).cummax(dim=1).values  # first index of i's tied values
    w = (cum.gather(1, first) * in_topk).sum(1, keepdim=True)
    nt = vocab - kc
    w = w + torch.where(topk_on, 0.0, (tail / z + lanes * pc[:, -1:] / z) * (nt / lanes + 2) / 2)
    # + the lanes' combination; both sides' exp (<= 2 ulp each), V0's reciprocal, product and fp32
    # cumsum output, these float64 sums; absolute: underflow to subnormals of up to 2 * vocab terms.
    rel = _U * (1.01 * w + combine + 16) + vocab * 2.0 ** -50
    err = cum * rel + vocab * 2.0 ** -147
    above = (cum > thr) & in_topk
    above[:, 0] = True  # V0 keeps its largest value
    keep = above.sum(1)
    robust = ((cum - thr).abs() > err) | ~in_topk
    robust[:, 0] = True
    nk = in_topk.sum(1)
    k1 = keep.unsqueeze(1)
    tie_cut = (k1 < nk.unsqueeze(1)) & (vals.gather(1, k1 - 1) == vals.gather(1, k1.clamp(max=kc - 1)))
    decided = robust.all(1, keepdim=True) & ~tie_cut
    covered = torch.where(topk_on, topk_covered, (k1 < kc) | (kc == vocab))
    # p >= 1 without top-k: V0 drops only tokens whose probability is 0 (-inf, or an exp that
    # underflows: ruled out when every finite value is within 60 of the largest).
    if p_one:
        whole = ~topk_on & (thr <= 0)
        finite_min = sub.nan_to_num(nan=float("nan"), posinf=float("inf"), neginf=float("inf")).amin(1, keepdim=True)
        safe = (thr < 0) | (finite_min >= vals[:, :1] - 60)  # NaN: not safe
    else:
        whole = safe = torch.zeros_like(covered)
    fallback = torch.where(whole, ~safe, covered & ~decided)
    more = ~whole & ~covered
    return keep, (whole & safe).squeeze(1), more.squeeze(1), fallback.squeeze(1)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """V0 ``_apply_min_p``: drop tokens whose probability is below min_p * max probability."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, -float("inf"))


def v0_unfiltered_logits(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                         prompt_tokens: Sequence[Sequence[int]] | None = None,
                         output_tokens: Sequence[Sequence[int]] | None = None,
                         param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """V0's steps before temperature and the filters: logits processors and min_tokens, then
    penalties (in the logits' dtype), then the fp32 cast. Arguments as in v0_processed_logprobs."""
    rows, vocab = logits.shape
    pdt = param_dtype or torch.float32
    if any(s.has_processors for s in specs):
        logits = apply_logits_processors(logits, specs, [len(o) for o in output_tokens] if output_tokens
                                         else [0] * rows)
    if prompt_tokens is not None and any(s.has_penalties for s in specs):
        out = output_tokens or [[] for _ in range(rows)]

        def col(values) -> torch.Tensor:  # fp32 first, then pdt: V0's rounding, whatever pdt is
            return _from_host(values, torch.float32, logits.device).to(pdt)

        logits = apply_penalties(logits, bin_counts(prompt_tokens, vocab, logits.device),
                                 bin_counts(out, vocab, logits.device),
                                 col([s.repetition_penalty for s in specs]),
                                 col([s.frequency_penalty for s in specs]),
                                 col([s.presence_penalty for s in specs]))
    return logits.to(torch.float32)


def v0_scaled_logits(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                     prompt_tokens: Sequence[Sequence[int]] | None = None,
                     output_tokens: Sequence[Sequence[int]] | None = None,
                     param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """V0's fp32 logits divided by the temperature, before top-k, top-p and min-p: the values
    whose log_softmax over the kept set is the processed distribution (those filters only mask).
    Arguments as in v0_processed_logprobs."""
    logits = v0_unfiltered_logits(logits, specs, prompt_tokens, output_tokens, param_dtype)
    temp_values = [1.0 if s.greedy else s.temperature for s in specs]
    if all(t == 1.0 for t in temp_values):
        return logits
    temps = _from_host(temp_values, torch.float32, logits.device).to(param_dtype or torch.float32)
    return logits / temps.to(torch.float32).unsqueeze(1)


def v0_processed_logprobs(logits: torch.Tensor, specs: Sequence[SamplingSpec],
                          prompt_tokens: Sequence[Sequence[int]] | None = None,
                          output_tokens: Sequence[Sequence[int]] | None = None,
                          param_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Log-probabilities of the distribution V0 samples from, one row per spec.

    ``logits``: raw lm_head output rows (any float dtype; logits processors and penalties run
    in that dtype as in V0). ``prompt_tokens``/``output_tokens``: per row, for penalties (None =
    neutral, which is what V0 uses for prompt-logprob rows); ``output_tokens`` also counts the
    outputs for min_tokens (None: none yet). Prompt-logprob rows take ``spec.for_prompt()``. ``param_dtype``: dtype in which V0
    materialised the sampling parameters (its logits dtype); None = exact fp32.
    """
    rows, vocab = logits.shape
    pdt = param_dtype or torch.float32

    def col(values) -> torch.Tensor:  # fp32 first, then pdt: V0's rounding, whatever pdt is
        return _from_host(values, torch.float32, logits.device).to(pdt)

    logits = v0_unfiltered_logits(logits, specs, prompt_tokens, output_tokens, param_dtype)
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
        else:  # _top_k_candidates already refused these rows: V0's kept set without its sort
            top_k_max = max([kv for kv in k_values if kv < vocab], default=0)
            p_one = any(kv == vocab and float(1 - torch.tensor(s.top_p, dtype=torch.float32).to(pdt)) <= 0
                        for kv, s in zip(k_values, specs))  # host floats: V0's 1 - p in pdt
            logits = _top_k_top_p_partial(logits, ks, ps, top_k_max=top_k_max, p_one=p_one)
    elif any(t != 1.0 for t in temp_values):  # x / 1.0 == x: no copy of the row needed
        logits = logits / temps.unsqueeze(1)
    if with_min_p:
        logits = apply_min_p(logits, col([s.min_p for s in specs]).to(torch.float32))
    return torch.log_softmax(logits, dim=-1)


def v0_rank(row: torch.Tensor, token: int) -> int:
    """V0's rank: 1 + number of strictly larger values (V1 counts >=)."""
    return int((row > row[token]).sum().item()) + 1
