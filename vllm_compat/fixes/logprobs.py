"""Fix ``logprobs``: sampled-token logprobs with V0's meaning.

Why: V1 returns logprobs of the raw model output by default; V0 (what RL trainers were
built against) returned the distribution actually sampled from. vLLM's own
``logprobs_mode="processed_logprobs"`` (0.11+) gets close, but applies min-p BEFORE
top-k/top-p (V0: after; the two do not commute with top-p), may use Triton/FlashInfer
top-k/top-p kernels, and counts ranks with ``>=`` (V0: 1 + #strictly greater).
How: ``Sampler.sample`` is replaced by V0's order -- penalties (already applied by
``Sampler.forward``) -> temperature -> sort-based top-k/top-p
(:func:`vllm_compat.v0_sampling.apply_top_k_top_p`) -> argmax-invariant processors
(min-p) -> log_softmax; the draw itself goes through vLLM's sampler with no further
filtering, except on CPU, where seeded rows get V0's exponential race bit for bit (so seeded
V1 tokens equal V0's) and unseeded rows an inverse-CDF draw (:mod:`vllm_compat.v0_draw`); after a
top-k both look at its candidates alone. Penalties keep vLLM's arithmetic (V0's too); on CPU it is
computed at the tokens each row has seen instead of over the vocabulary (speed only).
Under chunked prefill a seeded
CPU row is drawn only at the step that completes its prompt (V0 sampled it only then) and
vLLM's ``set_offset`` rewind of the discarded draw, which CPU generators lack, is skipped for
those rows. Greedy rows: log_softmax of the post-penalty logits. The configure hook turns
the default ``raw_logprobs`` into ``processed_logprobs``; explicit ``*_logits`` modes are
honoured. Ranks use V0's definition.
"""
from __future__ import annotations

import inspect
import itertools

import numpy as np
import torch

from .. import v0_draw
from ..v0_sampling import (apply_min_p, apply_min_p_keeping_probs_, apply_penalties_at, count_greater, penalized,
                           top_k_top_p_with_candidates)
from ..registry import Fix, InternalsMoved, register

_SAMPLING_EPS = 1e-5


def v0_ranks(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """V0's ranks of one value per row (values: [rows, 1]): 1 + the number of entries strictly
    greater. Replaces V1's batched_count_greater_than (>=), which vLLM compiles into one fused
    kernel; so is this count on CPU. The one-row form is v0_sampling.v0_rank."""
    return count_greater(x, values) + 1


def _processed_output(logits: torch.Tensor, mode: str) -> torch.Tensor:
    return logits if mode == "processed_logits" else logits.log_softmax(dim=-1, dtype=torch.float32)


def _apply_argmax_invariant(processor, logits, rounded):
    """One of vLLM's argmax-invariant processors, after top-k/top-p as in V0; -> (logits, weights).
    Min-p is V0's ``apply_min_p`` with the processor's values (rounded like V0's parameter tensors):
    the same arithmetic as vLLM's processor, fused into one pass on CPU, where it also hands back
    its softmax with the dropped tokens zeroed (``weights``, for the unseeded draw)."""
    if not hasattr(processor, "min_p"):
        return processor.apply(logits), None
    if not getattr(processor, "min_p_count", 1):  # no request in the batch has a min-p
        return logits, None
    min_p = rounded(processor.min_p).reshape(-1)
    if logits.device.type == "cpu":
        weights = apply_min_p_keeping_probs_(logits, min_p)
        return logits, weights
    return apply_min_p(logits, min_p, inplace=True), None  # in place, as vLLM's processor


SUPPORT_CAPTURE = "vllm_compat_support_capture"


def _capture_support(sampler, logits: torch.Tensor) -> None:
    """Hand the rows the logprobs come from (their finite entries: the kept set) to the ``support``
    fix, which sets this hook on the sampler for a step where a request asked for them."""
    capture = sampler.__dict__.get(SUPPORT_CAPTURE)
    if capture is not None:
        capture(logits)


def v0_sample(self, logits, sampling_metadata, logprobs_mode_override=None):
    md = sampling_metadata
    mode = logprobs_mode_override or self.logprobs_mode
    want = mode.startswith("processed") and (
        md.max_num_logprobs is not None or bool(getattr(md, "logprob_token_ids", None)))
    greedy = None if md.all_random else self.greedy_sample(logits)
    if md.all_greedy:
        _capture_support(self, logits)
        return greedy, (_processed_output(logits, mode) if want else None)
    # Set by the opt-in v0_bf16_params fix: V0 materialised the parameters in the logits dtype.
    pdt = getattr(self, "v0_param_dtype", None)
    rounded = (lambda t: t) if pdt is None else (lambda t: t.to(pdt).to(torch.float32))
    candidates = None  # [rows, c]: every token left finite, where the top-k path found them
    if md.top_k is not None or md.top_p is not None:
        rows, vocab = logits.shape
        k = md.top_k if md.top_k is not None else torch.full((rows,), vocab, device=logits.device)
        p = md.top_p if md.top_p is not None else torch.ones(rows, device=logits.device)
        # The temperature as Sampler.apply_temperature takes it (greedy rows: 1.0); dividing is left to
        # the filter, which after a top-k divides the candidates alone (the rest of the row is dropped).
        temperature = rounded(md.temperature)
        if not md.all_random:
            temperature = torch.where(temperature < _SAMPLING_EPS, 1.0, temperature)
        logits, candidates = top_k_top_p_with_candidates(logits, k, p if pdt is None else p.to(pdt),  # 1 - p in pdt, as V0
                                                         k_min=vocab if md.top_k is None else None,
                                                         temperature=temperature, inplace=True)
    else:
        logits = self.apply_temperature(logits, rounded(md.temperature), md.all_random)
    weights = None  # the distribution's weights, where the last processor (min-p) left them
    for processor in md.logitsprocs.argmax_invariant:  # min-p, after top-k/top-p as in V0
        logits, weights = _apply_argmax_invariant(processor, logits, rounded)
    _capture_support(self, logits)
    if logits.device.type == "cpu":
        # V0's draws (v0_draw): seeded rows bit for bit, unseeded ones from the same
        # distribution at a fraction of the cost of vLLM's CPU Gumbel kernel. Rows of a partially
        # prefilled prompt are sampled and thrown away (chunked prefill); V0 drew a request only
        # once its whole prompt was in, so they take no seeded draw.
        skip = getattr(self, "v0_partial_prefill_rows", ())
        sampled = v0_draw.draw(logits, {row: g for row, g in md.generators.items() if row not in skip},
                               candidates, weights)
        processed = _processed_output(logits, mode) if want else None
        if processed is not None and candidates is not None:
            setattr(processed, CANDIDATES, candidates)  # gather_logprobs may then look at them alone
    else:  # vLLM's own draw over the already-filtered distribution
        sampled, processed = self.topk_topp_sampler(logits, md.generators, None, None)
        if want and processed is None:
            processed = _processed_output(logits, mode)
        if not want:
            processed = None
    if greedy is not None:
        sampled = torch.where(md.temperature < _SAMPLING_EPS, greedy, sampled, out=greedy)
    return sampled, processed


CANDIDATES = "vllm_compat_candidates"  # on a processed [rows, vocab] tensor: [rows, c] indices of its finite entries


def gather_on_candidates(gather, logprobs: torch.Tensor, num_logprobs: int, token_ids: torch.Tensor):
    """vLLM's ``gather_logprobs`` (``gather``) for a processed row whose finite entries all lie
    among its top-k candidates: the same tensors from the candidates alone (a topk and a rank
    count over c tokens instead of the vocabulary: ~0.7 ms of an ~18 ms decode step on the bench model).
    Everything outside the candidates is -inf, so it is never among the top values ahead of a
    finite one and never counts in a rank; the top ``num_logprobs`` are the same values, and the
    same tokens as the full row's topk unless two of them (or the next one) are equal: which of
    equal values topk returns first depends on the row it scans, so such rows, and a top list
    reaching past the finite entries, take ``gather`` on the whole row."""
    candidates = getattr(logprobs, CANDIDATES, None)
    if candidates is None or logprobs.device.type != "cpu" or num_logprobs >= candidates.shape[1]:
        return gather(logprobs, num_logprobs, token_ids)
    compact = logprobs.gather(1, candidates)
    found = candidates == token_ids.unsqueeze(1)
    ok = found.any(dim=1).all()
    if num_logprobs:
        top = compact.topk(num_logprobs + 1, dim=-1).values
        ok &= (top[:, :-2] > top[:, 1:-1]).all() & (top[:, -2] > top[:, -1]).all()  # distinct, finite (> -inf)
    if not bool(ok):  # on CPU: no sync to wait for
        return gather(logprobs, num_logprobs, token_ids)
    out = gather(compact, num_logprobs, found.to(torch.int8).argmax(dim=1))  # the token's place among them
    ids = out.logprob_token_ids
    return out._replace(logprob_token_ids=candidates.gather(1, ids.long()).to(ids.dtype))


def _patch_gather_logprobs(patcher, sampler_class) -> None:
    def gather_logprobs(logprobs, num_logprobs, token_ids):
        return gather_on_candidates(vllm_gather_logprobs, logprobs, num_logprobs, token_ids)

    vllm_gather_logprobs = patcher.replace(sampler_class, "gather_logprobs", staticmethod(gather_logprobs),
                                           expect_params=["logprobs", "num_logprobs", "token_ids"])


def _runs(sorted_keys: np.ndarray) -> np.ndarray:
    """Where each run of equal values starts in a sorted array. (np.unique measured 10x slower
    than a sort for these few thousand int64 keys: 0.27 vs 0.02 ms, numpy 2.)"""
    return np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1]))) if len(sorted_keys) \
        else np.zeros(0, np.int64)


def _present_tokens(prompt_ids: torch.Tensor, output_ids: list[list[int]], vocab: int):
    """-> (row, token, output count) (numpy int64) of every token in a row's prompt (``prompt_ids``: V1's
    padded tensor, pad = ``vocab``) or outputs (ids outside the vocabulary -- async scheduling's
    -1 placeholders -- count as padding, as in vLLM), each pair once."""
    rows, width = prompt_ids.shape[0], vocab + 1  # keys: row * width + token
    lengths = np.fromiter(map(len, output_ids), np.int64, rows)
    out = np.fromiter(itertools.chain.from_iterable(output_ids), np.int64, int(lengths.sum()))
    out_keys = np.sort((np.repeat(np.arange(rows, dtype=np.int64) * width, lengths) + out)[(out >= 0) & (out < vocab)])
    starts = _runs(out_keys)
    counts = np.diff(np.append(starts, len(out_keys)))
    out_keys = out_keys[starts]
    prompt_keys = (np.arange(rows, dtype=np.int64)[:, None] * width + prompt_ids.numpy()).ravel()
    present = np.sort(np.concatenate([prompt_keys[prompt_keys % width < vocab], out_keys]))
    present = present[_runs(present)]
    count = np.zeros(len(present), np.int64)
    count[np.searchsorted(present, out_keys)] = counts
    return present // width, present % width, count


def penalties_on_cpu(logits, sampling_metadata, output_token_ids):
    """``Sampler.apply_penalties`` for CPU logits with penalties: vLLM's (= V0's) arithmetic,
    computed at the tokens each row has seen instead of over its whole vocabulary (vLLM builds two
    [rows, vocab] count tensors per step: 7.8 ms of a 16 ms decode step on the bench model)."""
    md = sampling_metadata
    row, token, count = _present_tokens(md.prompt_token_ids.cpu(), output_token_ids, logits.shape[1])
    penalties = (md.repetition_penalties, md.frequency_penalties, md.presence_penalties)
    if logits.dtype != torch.float32 or any(t.dtype != torch.float32 for t in penalties):
        return apply_penalties_at(logits, torch.from_numpy(row), torch.from_numpy(token), torch.from_numpy(count),
                                  *penalties)
    # In numpy: the same float32 operations on a few thousand values, without torch's per-op overhead
    # (~20 small ops: 0.3 ms per step, as much as the rest of the penalties together).
    flat = logits.view(-1).numpy()
    at = row * logits.shape[1] + token
    rep, freq, pres = (t.cpu().numpy()[row] for t in penalties)
    flat[at] = penalized(flat[at], rep, freq, pres, count.astype(np.float32), np.where)
    return logits


def _patch_penalties(patcher, sampler_class) -> None:
    def apply_penalties(logits, sampling_metadata, output_token_ids):
        if sampling_metadata.no_penalties or logits.device.type != "cpu" or not logits.is_contiguous():
            return vllm_apply_penalties(logits, sampling_metadata, output_token_ids)  # fast on accelerators
        return penalties_on_cpu(logits, sampling_metadata, output_token_ids)

    vllm_apply_penalties = patcher.replace(sampler_class, "apply_penalties", staticmethod(apply_penalties),
                                           expect_params=["logits", "sampling_metadata", "output_token_ids"])


def _partial_prefill_rows(runner) -> frozenset[int]:
    """Batch rows whose sample this step is discarded: prompt not fully prefilled yet."""
    num_reqs = runner.input_batch.num_reqs
    return frozenset(np.nonzero(runner.discard_request_mask.np[:num_reqs])[0].tolist())


def _patch_chunked_prefill(patcher) -> None:
    """The model runner marks partial-prefill rows in ``discard_request_mask`` before
    ``_sample`` and, in ``_bookkeeping_sync``, rewinds their generators with
    ``gen.set_offset(gen.get_offset() - 4)`` (the Philox offset of the discarded draw; CPU
    generators have no offset and raise). For CPU generators the draw is v0_sample's, which
    takes no draw for those rows, so there is nothing to rewind; CUDA generators keep vLLM's
    rewind."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    try:
        source = inspect.getsource(GPUModelRunner._bookkeeping_sync)
    except (OSError, TypeError) as e:
        raise InternalsMoved(f"GPUModelRunner._bookkeeping_sync: no source ({e})") from None
    if "discard_request_mask" not in source or "set_offset" not in source:
        # The rewind moved: skipping it here would silently do nothing.
        raise InternalsMoved("GPUModelRunner._bookkeeping_sync no longer rewinds discarded "
                             "generators (discard_request_mask / set_offset)")

    def _sample(self, logits, spec_decode_metadata, *args, **kwargs):
        self.sampler.v0_partial_prefill_rows = _partial_prefill_rows(self)
        try:
            return sample_original(self, logits, spec_decode_metadata, *args, **kwargs)
        finally:
            self.sampler.v0_partial_prefill_rows = frozenset()

    def _bookkeeping_sync(self, *args, **kwargs):
        batch = self.input_batch
        skip = _partial_prefill_rows(self)
        hidden = {row for row, g in batch.generators.items() if row in skip and g.device.type == "cpu"}
        if not hidden:
            return bookkeeping_original(self, *args, **kwargs)
        generators = batch.generators
        # Only the rewind loop reads input_batch.generators here; hide the CPU rows from it.
        batch.generators = {row: g for row, g in generators.items() if row not in hidden}
        try:
            return bookkeeping_original(self, *args, **kwargs)
        finally:
            batch.generators = generators

    sample_original = patcher.replace(GPUModelRunner, "_sample", _sample,
                                      expect_params=["self", "logits", "spec_decode_metadata"])
    bookkeeping_original = patcher.replace(GPUModelRunner, "_bookkeeping_sync", _bookkeeping_sync,
                                           expect_params=["self", "scheduler_output", "sampler_output"])


def patch(patcher) -> None:
    from vllm.v1.sample import sampler as sampler_module

    patcher.replace(sampler_module.Sampler, "sample", v0_sample,
                    expect_params=["self", "logits", "sampling_metadata"])
    patcher.replace(sampler_module, "batched_count_greater_than", v0_ranks)
    _patch_penalties(patcher, sampler_module.Sampler)
    _patch_gather_logprobs(patcher, sampler_module.Sampler)
    _patch_chunked_prefill(patcher)


class BypassRefused(ValueError):
    """An engine setting would route around a fix while ``check()`` reported it active."""


def configure(engine_args) -> None:
    if getattr(engine_args, "speculative_config", None):
        # Accepted draft tokens are sampled, and their logprobs computed, by vLLM's rejection
        # sampler, which this fix does not touch: V0 order, ranks and seeded draws would silently
        # not apply to them.
        raise BypassRefused("vllm-compat: speculative decoding bypasses the `logprobs` fix (draft tokens are "
                            "sampled by vLLM's rejection sampler); turn speculative_config off, or leave the fix "
                            "out (VLLM_COMPAT=-logprobs)")
    if getattr(engine_args, "logprobs_mode", None) == "raw_logprobs":  # vLLM's default
        engine_args.logprobs_mode = "processed_logprobs"


register(Fix(
    name="logprobs",
    summary="sampled-token logprobs of the distribution sampled from, in V0's order, with V0 ranks",
    why="V1 returns raw logprobs (or processed ones with min-p before top-p and >= ranks); V0 returned the "
        "processed distribution: the trainer's old-policy logprobs",
    how="Sampler.sample replaced by V0's order (sort-based top-k/top-p, then min-p); logprobs_mode default "
        "-> processed_logprobs; rank = 1 + #greater",
    upstream="processed_logprobs exists (PR #22387); V0 order and ranks: patches/*/logprobs.patch",
    remove_when="vLLM's processed mode applies min-p after top-k/top-p and ranks like V0",
    patch=patch,
    configure=configure,
))
