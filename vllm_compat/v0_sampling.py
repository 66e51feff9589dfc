"""V0's logits processing (vLLM 0.8.5 ``Sampler.forward``) in plain torch.

This is the one reference implementation of "the distribution V0 sampled from". The
trainer-side reference and ``vllm-compat verify`` use it; fixes reuse it instead of
re-deriving V0's order. Everything here works on 2-D float tensors ``[rows, vocab]``
on any device: tensors made per call live on the logits' device, decisions that the Python
sampling parameters answer are taken from them, and the host reads a per-step tensor only
through :func:`_host` (a data-dependent shape: ``_top_k_candidates``' tie check, the rows
``apply_top_k_top_p_by_value`` hands to V0's sort).

V0's order (0.8.5 logits_processor.py, sampler.py 216-324):
  logits processors of sampled rows, in the model dtype: logit_bias (clamped to +-100), then
  allowed_token_ids (``get_logits_processors``' order) -> min_tokens (every stop id and the EOS
  ids -inf while a sequence has fewer outputs) -> penalties (model dtype) -> fp32 cast
  -> / temperature -> top-k then top-p (sort based) -> min-p (AFTER top-k/top-p; V1 applies it
  before) -> log_softmax in fp32.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

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


def _overridden() -> bool:
    """A TorchFunctionMode or a dispatch mode is active (a profiler, a test that records ops): compiling
    under one fails on some torch versions (2.10: "Guard failed on the same frame it was created");
    such calls run eagerly, and the next call outside the mode compiles as usual."""
    return torch._C._len_torch_function_stack() > 0 or torch._C._len_torch_dispatch_stack() > 0


def _fused_on_cpu(fn: Callable) -> Callable:
    """``fn`` (exact elementwise steps: compares and selects) compiled into one fused kernel for
    CPU tensors. Eager torch runs each step as its own pass: a compare and a ``masked_fill`` over
    32 x 32,000 fp32 take 1.3 ms on 2 cores, the fused kernel 0.3 ms. Other devices run ``fn`` as
    written (their eager kernels are fast, and compiling there is the caller's choice). The result
    is the same either way; if compiling fails, the eager ``fn`` runs from then on, with a warning."""
    compiled = None

    def run(*args):
        nonlocal compiled
        if args[0].device.type != "cpu" or compiled is False or _overridden():
            return fn(*args)
        try:
            if compiled is None:
                compiled = torch.compile(fn, dynamic=True)
            return compiled(*args)
        except Exception as e:  # no C++ compiler, an unsupported torch: the result does not change
            compiled = False
            logger.warning("vllm-compat: %s runs eagerly (compiling failed: %s: %s)", fn.__name__,
                           type(e).__name__, e)
            return fn(*args)

    run.__name__ = run.__qualname__ = fn.__name__
    run.__doc__ = fn.__doc__
    run.eager = fn
    run.fused = lambda: compiled not in (None, False)  # tests: the fused kernel ran
    return run


@_fused_on_cpu
def drop_below(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with -inf where ``x < threshold`` (NaN stays)."""
    return x.masked_fill(x < threshold, -float("inf"))


@_fused_on_cpu
def drop_below_(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``drop_below`` in place (a fresh [rows, vocab] result costs its page faults: 0.3 ms for
    32 x 32,000 fp32 here, as much as the pass itself)."""
    return x.masked_fill_(x < threshold, -float("inf"))


@_fused_on_cpu
def drop_where_below(x: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``x`` with -inf where ``values < threshold``."""
    return x.masked_fill(values < threshold, -float("inf"))


@_fused_on_cpu
def drop_where_below_(x: torch.Tensor, values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """``drop_where_below`` in place."""
    return x.masked_fill_(values < threshold, -float("inf"))


@_fused_on_cpu
def count_greater(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row, how many entries of ``x`` are strictly greater than ``values`` ([rows, 1])."""
    return (x > values).sum(-1)


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
    """V0 ``apply_penalties``: repetition over prompt+output tokens (a positive logit times
    ``1.0 / penalty``, a negative one times ``penalty``: V0's and V1's arithmetic, which differs
    from dividing by the penalty in the last bit), frequency/presence over output."""
    rep = repetition.to(logits.dtype).unsqueeze(1).repeat(1, logits.shape[1])
    rep[~((prompt_counts > 0) | (output_counts > 0))] = 1.0
    logits = logits * torch.where(logits > 0, 1.0 / rep, rep)
    logits = logits - frequency.to(logits.dtype).unsqueeze(1) * output_counts.to(logits.dtype)
    logits = logits - presence.to(logits.dtype).unsqueeze(1) * (output_counts > 0).to(logits.dtype)
    return logits


def apply_penalties_at(logits: torch.Tensor, row: torch.Tensor, token: torch.Tensor, output_count: torch.Tensor,
                       repetition: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """``apply_penalties``, in place, computed only where it can change a value: at each
    ``(row, token)`` in the row's prompt or outputs (each pair once; ``output_count``: how often
    the token is among the row's outputs). Elsewhere the dense form multiplies by 1.0 and subtracts
    0 (a -0.0 logit could come back +0.0 there, the same number). The dense form's cost is the
    vocabulary per row; this one's, the tokens the row has seen."""
    flat = logits.view(-1)
    at = row * logits.shape[1] + token
    dt = logits.dtype
    flat[at] = penalized(flat[at], repetition.to(dt)[row], frequency.to(dt)[row], presence.to(dt)[row],
                         output_count.to(dt), torch.where)
    return logits


def penalized(x, repetition, frequency, presence, output_count, where):
    """The penalty arithmetic on values ``x`` of seen tokens with their rows' penalties and output
    counts (in ``x``'s dtype): torch tensors (``where=torch.where``) or numpy arrays (``np.where``;
    IEEE-754 operations, each rounded once, give the same bits in both)."""
    x = x * where(x > 0, 1.0 / repetition, repetition)
    x = x - frequency * output_count
    return x - presence * (output_count > 0)


_MAX_CANDIDATES = 1024  # top-k up to this size sorts only its candidates (a topk)


def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                      k_max: int | None = None, k_min: int | None = None) -> torch.Tensor:
    """V0 ``_apply_top_k_top_p``: top-k keeps ties with the k-th value, then top-p on the
    top-k-renormalized distribution; at least one token survives. When every row has a
    top-k below the vocabulary (the usual RL setting), only the kept candidates are sorted
    (``topk``); otherwise ``_top_p_without_indices``.
    ``k_max``, ``k_min``: the largest and smallest k as Python ints, if the caller knows them
    (each saves a host read)."""
    return top_k_top_p_with_candidates(logits, k, p, k_max, k_min)[0]


def top_k_top_p_with_candidates(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                                k_max: int | None = None, k_min: int | None = None,
                                temperature: torch.Tensor | None = None, inplace: bool = False):
    """``apply_top_k_top_p`` -> (logits, candidates): ``candidates`` ([rows, c] indices) holds
    every token left finite, where the top-k path found them; None where the row was sorted whole.
    A draw can then look at c tokens per row instead of the vocabulary. ``temperature`` ([rows]):
    the logits are not divided yet; the top-k path divides its candidates only (V0's values:
    ``x / T`` of each kept token), the others the whole row. ``inplace``: the result is written
    into ``logits`` (a sampler's own tensor, as vLLM's filters do; no fresh [rows, vocab] tensor)."""
    found = _top_k_candidates(logits, k, temperature, k_max=k_max)
    if found is None:
        if temperature is not None:
            logits = logits.div_(temperature.unsqueeze(1)) if inplace else logits / temperature.unsqueeze(1)
        return _top_p_without_indices(logits, k, p, k_min, inplace), None
    ascending, idx = _top_p_ascending(*found, p)
    out = logits.fill_(-float("inf")) if inplace else torch.full_like(logits, -float("inf"))
    return out.scatter_(dim=-1, index=idx, src=ascending), idx


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
    vals, idx = topk_values(logits, k_max + 1)
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


_TOPK_BLOCK = 32  # topk_values: block size of the first pass


def topk_values(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)``'s values, and indices holding them (among equal values any may be
    chosen). On CPU, where a k much smaller than the row is the common case, in two passes: each
    block of 32 tokens' maximum, then a topk over the k blocks with the largest maxima (the row's
    k largest values lie there: any value outside is at most the k-th largest block maximum, and
    those k blocks already hold k values that large). The k blocks are picked by numpy's
    partition (torch's topk costs 0.24 ms there). 32 x 32,000, k = 51: 0.54 ms, topk 0.90 ms."""
    rows, n = x.shape
    blocks = n // _TOPK_BLOCK
    if x.device.type != "cpu" or not x.is_contiguous() or k * _TOPK_BLOCK * 4 > n:
        return x.topk(k, dim=-1)
    body = x[:, :blocks * _TOPK_BLOCK].view(rows, blocks, _TOPK_BLOCK)
    maxima = body.amax(dim=-1)
    if maxima.dtype != torch.float64:  # numpy has no bf16 (fp32 holds it, and fp16, exactly)
        maxima = maxima.float()
    maxima = maxima.numpy()  # numpy's partition sorts NaN last, as the largest: as topk does
    chosen = torch.from_numpy(np.sort(np.argpartition(maxima, -k, axis=-1)[:, -k:], axis=-1))  # in the row's order
    part = body.gather(1, chosen.unsqueeze(-1).expand(rows, k, _TOPK_BLOCK)).view(rows, k * _TOPK_BLOCK)
    where = (chosen.unsqueeze(-1) * _TOPK_BLOCK + torch.arange(_TOPK_BLOCK)).view(rows, k * _TOPK_BLOCK)
    if blocks * _TOPK_BLOCK < n:  # the tail, shorter than a block, always
        part = torch.cat([part, x[:, blocks * _TOPK_BLOCK:]], dim=1)
        where = torch.cat([where, torch.arange(blocks * _TOPK_BLOCK, n).expand(rows, -1)], dim=1)
    vals, at = part.topk(k, dim=-1)
    return vals, where.gather(1, at)


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


# Top-p from the sorted values alone -----------------------------------------------------------
#
# V0 sorts each row ascending with its indices, masks below the k-th value, takes the fp32 softmax
# of the sorted row and its ``cumsum``, drops the prefix whose cumulative probability is <= 1 - p
# (never the last value) and scatters back. Every one of those numbers depends on the sorted VALUES
# only (tied values are equal floats wherever the sort puts them), so the cut is the same from a
# sort of the values alone; and the dropped set is a prefix of the sorted row, so the kept tokens
# are exactly those >= the first kept value -- unless a value equal to it was dropped (a tie cut
# by the boundary: which copies survive is the order of V0's index sort), or the row holds a NaN
# (V0's own answer for it is kept). Those rows take V0's sort. On CPU the values are sorted by
# numpy's SIMD sort, ~10x faster than torch's (value, index) sort (measured: 2.7 vs 27.6 ms for
# 32 x 32000 fp32 on 2 AVX-512 cores). One host read per call: how many rows need V0's sort.


def _top_p_without_indices(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                           k_min: int | None = None, inplace: bool = False) -> torch.Tensor:
    """V0's top-k/top-p where the whole vocabulary is sorted: on CPU (and ``meta``, so that the
    device tests run it) from the values alone; elsewhere V0's own sort, which an accelerator
    does fast and without the host read of the values path."""
    if logits.device.type in ("cpu", "meta"):
        return apply_top_k_top_p_by_value(logits, k, p, k_min, inplace)
    return apply_top_k_top_p_sorted(logits, k, p)


def _sorted_values(logits: torch.Tensor) -> torch.Tensor:
    """Each row's values ascending (NaN last, as torch.sort puts them). On CPU numpy's sort, one
    thread: splitting the rows over a second thread measured no faster inside the engine (torch's
    OpenMP threads hold the other core right after the model's forward)."""
    if logits.device.type != "cpu":
        return logits.sort(dim=-1).values
    # numpy has no bf16/fp16 sort: through fp32 (exact both ways)
    x = logits.detach() if logits.dtype in (torch.float32, torch.float64) else logits.detach().float()
    return torch.from_numpy(np.sort(x.numpy(), axis=-1)).to(logits.dtype)


def apply_top_k_top_p_by_value(logits: torch.Tensor, k: torch.Tensor, p: torch.Tensor,
                               k_min: int | None = None, inplace: bool = False) -> torch.Tensor:
    """``apply_top_k_top_p_sorted``'s result bit for bit, from a sort of the values alone; rows
    with a tie cut by the top-p boundary, or a NaN, get ``apply_top_k_top_p_sorted`` itself.
    ``k_min``: the smallest k as a Python int, if the caller knows it (saves a host read).
    ``inplace``: the result is written into ``logits``."""
    rows, vocab = logits.shape
    if rows == 0:
        return logits.clone()
    srt = _sorted_values(logits)
    k = k.to(torch.long)
    kth = srt.gather(1, (vocab - k).unsqueeze(1))
    # The counts come from binary searches: the sorted row and V0's cumulative sums (a rounded running
    # sum of non-negative terms) are both non-decreasing. Both masks drop a prefix, never the last value.
    below_kth = torch.searchsorted(srt, kth)  # how many values are < the k-th (V0's top-k mask)
    if (int(_host(k.min())) if k_min is None else k_min) < vocab:  # some row has a top-k (else kth = min)
        srt = srt.masked_fill(torch.arange(vocab, device=srt.device) < below_kth, -float("inf"))
    probs_sum = srt.softmax(dim=-1).cumsum(dim=-1)  # V0's numbers, on V0's sorted row
    thr = 1 - p.unsqueeze(1)
    common = torch.promote_types(probs_sum.dtype, thr.dtype)  # V0 compares in the wider of the two
    dropped = torch.searchsorted(probs_sum.to(common), thr.to(common), right=True)  # how many <= 1 - p
    cut = torch.maximum(dropped, below_kth).clamp_(max=vocab - 1)
    first_kept = srt.gather(1, cut)
    tie_cut = (cut > 0) & (srt.gather(1, (cut - 1).clamp_(min=0)) == first_kept)
    sort_rows = tie_cut.squeeze(1) | srt[:, -1].isnan()
    n_sort = int(_host(sort_rows.sum()))
    if n_sort:  # V0's sort, on the rows as they came in (before the drop below, which may be in place)
        rs = sort_rows.to(torch.int8).argsort(descending=True, stable=True)[:n_sort]  # no data-shaped nonzero
        sorted_rows = apply_top_k_top_p_sorted(logits.index_select(0, rs), k.index_select(0, rs), p.index_select(0, rs))
    out = drop_below_(logits, first_kept) if inplace else drop_below(logits, first_kept)
    if n_sort:
        out.index_copy_(0, rs, sorted_rows)
    return out


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """V0 ``_apply_min_p``: drop tokens whose probability is below min_p * max probability.
    ``inplace``: into ``logits`` (as vLLM's min-p processor does)."""
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)  # V0: .max().values, the same value
    return (drop_where_below_ if inplace else drop_where_below)(logits, probs, threshold)


@_fused_on_cpu
def _drop_both_below_(logits: torch.Tensor, probs: torch.Tensor, threshold: torch.Tensor) -> None:
    # The threshold's amax is taken outside: with it inside, torch 2.13's inductor fails to compile
    # the two in-place writes ("KeyError: 'buf2'").
    drop = probs < threshold
    logits.masked_fill_(drop, -float("inf"))
    probs.masked_fill_(drop, 0.0)


def apply_min_p_keeping_probs_(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """``apply_min_p`` in place, both drops in one fused pass on CPU; -> the softmax it compared,
    0 where dropped: weights of the distribution left, which an unseeded draw takes instead of
    computing ``exp`` over the row again (v0_draw.draw's ``weights``)."""
    probs = torch.softmax(logits, dim=-1)
    _drop_both_below_(logits, probs, min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True))
    return probs


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
            logits = apply_top_k_top_p(logits, ks, ps, k_max=max(k_values), k_min=min(k_values))
        else:  # _top_k_candidates already refused these rows: V0's kept set without its sort
            logits = _top_p_without_indices(logits, ks, ps, k_min=min(k_values))
    elif any(t != 1.0 for t in temp_values):  # x / 1.0 == x: no copy of the row needed
        logits = logits / temps.unsqueeze(1)
    if with_min_p:
        logits = apply_min_p(logits, col([s.min_p for s in specs]).to(torch.float32))
    return torch.log_softmax(logits, dim=-1)


def v0_rank(row: torch.Tensor, token: int) -> int:
    """V0's rank: 1 + number of strictly larger values (V1 counts >=)."""
    return int((row > row[token]).sum().item()) + 1
