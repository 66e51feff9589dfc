"""processing.py is device-generic and reads per-step tensors on the host only through _host.

No GPU needed: tensors on the ``meta`` device have no data, so any op that mixes them with a
CPU tensor raises ("Tensor on device cpu is not on the expected device meta!") and so does
any host read (``.item()``, ``bool()``, ``int()``, ``.tolist()``). A function that runs on
meta logits therefore makes every per-call tensor on the logits' device and syncs nowhere.
The deliberate host reads (the tie check in ``_top_k_candidates``; in the top-p path from sorted
values, ``apply_top_k_top_p_by_value``, how many rows go to V0's sort: their answers set shapes) go through ``processing._host``;
here it is replaced by scripted answers, so the test also pins how many reads each kind of
request costs and covers the answers.
"""
import types

import pytest
import torch

from vllm_compat import v0_sampling as processing
from vllm_compat.fixes.prompt_logprobs import _processing, spec_for
from vllm_compat.v0_sampling import (SamplingSpec, apply_logits_processors, apply_min_p, apply_penalties,
                                    apply_penalties_at, apply_top_k_top_p, apply_top_k_top_p_sorted, bin_counts,
                                    v0_processed_logprobs)

META = torch.device("meta")
ROWS, VOCAB = 4, 3000  # VOCAB > processing._MAX_CANDIDATES: the "too many ties" answer is reachable


def assert_device_generic(monkeypatch, fn, *args, reads=(), **kwargs):
    """Run ``fn`` on meta tensors; ``reads``: the answers, in order, to the host reads it
    may make through ``processing._host`` -- it must make exactly those. Returns its output."""
    answers, seen = list(reads), []

    def host(t):
        assert t.device == META and t.numel() == 1, t  # a scalar of the step, not a shape
        seen.append(t)
        assert answers, f"unexpected host read #{len(seen)}"
        return answers.pop(0)

    # raising=False: on code without _host the test still runs and fails where it syncs.
    monkeypatch.setattr(processing, "_host", host, raising=False)
    out = fn(*args, **kwargs)
    assert not answers, f"{len(seen)} host reads, expected {len(reads)}"
    for t in out if isinstance(out, tuple) else (out,):
        assert t.device == META
    return out


def meta_logits(dtype=torch.float32):
    return torch.empty(ROWS, VOCAB, dtype=dtype, device=META)


S = SamplingSpec
PROMPT = [[1, 2, 3], [], [5, 5], [7]]
OUTPUT = [[2, 9], [4], [], [9, 9, 9]]
NO_TIE, TIE = [True], [False, 12]  # answers for the tie check (+ the tied count)
# Answers for the top-p path from sorted values (no index sort): one read, the number of rows
# that need V0's sort (a tie cut by the top-p boundary, or a NaN).
DECIDED, SORT_TWO = [0], [2]

# (specs per row, with tokens for penalties, answers to the host reads it must make)
CASES = {
    "neutral": ([S()] * ROWS, False, []),
    "temperature": ([S(temperature=0.7)] * ROWS, False, []),
    "greedy": ([S.from_params({"temperature": 0.0, "top_p": 0.5, "top_k": 3})] * ROWS, False, []),
    "top_k": ([S(top_k=5)] * ROWS, False, NO_TIE),
    "top_k_ties": ([S(top_k=5)] * ROWS, False, TIE),
    "top_k_too_many_ties": ([S(top_k=5)] * ROWS, False, [False, 2000] + DECIDED),  # -> exact top-p path
    "top_k_above_candidates": ([S(top_k=2000)] * ROWS, False, DECIDED),  # k > 1024: the values path
    "top_k_above_candidates_and_off": ([S(top_k=1200), S(top_p=0.9)] * (ROWS // 2), False, DECIDED),
    "top_p": ([S(top_p=0.9)] * ROWS, False, DECIDED),
    "top_p_some_rows_sorted": ([S(top_p=0.9)] * ROWS, False, SORT_TWO),
    "top_p_near_one": ([S(top_p=0.99)] * ROWS, False, DECIDED),
    "top_p_near_one_sorted": ([S(top_p=0.99)] * ROWS, False, [ROWS]),
    "top_p_one": ([S(top_p=1.0, top_k=-1), S(top_p=0.5)] * (ROWS // 2), False, DECIDED),
    "min_p": ([S(min_p=0.1)] * ROWS, False, []),
    "top_k_min_p": ([S(top_k=5, min_p=0.1)] * ROWS, False, NO_TIE),
    "repetition": ([S(repetition_penalty=1.3)] * ROWS, True, []),
    "presence": ([S(presence_penalty=0.5)] * ROWS, True, []),
    "frequency": ([S(frequency_penalty=0.2)] * ROWS, True, []),
    "penalties_without_tokens": ([S(repetition_penalty=1.3)] * ROWS, False, []),  # prompt rows
    "everything": ([S(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1,
                      presence_penalty=0.3, frequency_penalty=0.1)] * ROWS, True, NO_TIE),
    "everything_but_min_p": ([S(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.1)] * ROWS,
                             True, TIE),
    "mixed_rows": ([S(), S.from_params({"temperature": 0.0}), S(temperature=1.5, top_p=0.8),
                    S(top_k=3, frequency_penalty=0.5)], True, DECIDED),  # a top-k off: exact top-p path
    # V0's logits processors and min_tokens (sampled rows; OUTPUT lengths 2, 1, 0, 3 when given).
    "logit_bias": ([S.from_params({"temperature": 0.8, "logit_bias": {"5": 3.0, 7: -100.0}})] * ROWS, False, []),
    "allowed_token_ids": ([S.from_params({"allowed_token_ids": [1, 4, 9]})] * ROWS, False, []),
    "min_tokens": ([S.from_params({"min_tokens": 2, "stop_token_ids": [3, 8]}, eos_token_ids=[2])] * ROWS,
                   True, []),
    "min_tokens_without_tokens": ([S.from_params({"min_tokens": 2, "stop_token_ids": [3]})] * ROWS, False, []),
    "processors_mixed_rows": ([S.from_params({"temperature": 0.0, "logit_bias": {1: 2.0}}),
                               S.from_params({"allowed_token_ids": [0, 5], "top_p": 0.9}),
                               S(), S.from_params({"min_tokens": 3, "stop_token_ids": [4], "top_k": 5,
                                                   "repetition_penalty": 1.2})], True, DECIDED),
    "everything_with_processors": ([S.from_params({
        "temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.1,
        "presence_penalty": 0.3, "frequency_penalty": 0.1, "logit_bias": {3: 1.5}, "allowed_token_ids": [1, 2, 3],
        "min_tokens": 4, "stop_token_ids": [2]}, eos_token_ids=[9])] * ROWS, True, NO_TIE),
    "mixed_rows_all_top_k": ([S(top_k=1), S(temperature=0.5, top_k=7), S(top_k=20, top_p=0.5),
                              S(top_k=3, repetition_penalty=2.0)], True, NO_TIE),
}


@pytest.mark.parametrize("param_dtype", [None, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_v0_processed_logprobs_is_device_generic(monkeypatch, case, param_dtype):
    specs, with_tokens, reads = CASES[case]
    logits_dtype = param_dtype or torch.float32  # bf16 parameters come with bf16 logits
    out = assert_device_generic(monkeypatch, v0_processed_logprobs, meta_logits(logits_dtype), specs,
                                PROMPT if with_tokens else None, OUTPUT if with_tokens else None,
                                param_dtype=param_dtype, reads=reads)
    assert out.shape == (ROWS, VOCAB) and out.dtype == torch.float32


@pytest.mark.parametrize("params", [
    {"temperature": 0.7, "top_k": 0, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 1.0, "top_k": 20, "top_p": 0.9, "min_p": 0.0},
    {"temperature": 0.0, "top_k": -1, "top_p": 1.0, "min_p": 0.0},
    {"temperature": 1.2, "top_k": 0, "top_p": 0.95, "min_p": 0.1},
])
def test_prompt_logprobs_fix_processing_is_device_generic(monkeypatch, params):
    """What the prompt_logprobs fix runs inside the engine step, as vLLM calls it."""
    compute_logprobs = _processing(spec_for(types.SimpleNamespace(**params)), param_dtype_of_logits=True)
    reads = NO_TIE if params["top_k"] > 0 else DECIDED if params["top_p"] < 1 else []
    assert_device_generic(monkeypatch, compute_logprobs, meta_logits(torch.bfloat16), reads=reads)


def test_building_blocks_are_device_generic(monkeypatch):
    logits = meta_logits()
    k = torch.full((ROWS,), 5, device=META)
    p = torch.full((ROWS,), 0.9, device=META)
    assert_device_generic(monkeypatch, apply_top_k_top_p, logits, k, p, k_max=5, reads=NO_TIE)
    # Without k_max the largest k is read first (the logprobs fix's sampler path).
    assert_device_generic(monkeypatch, apply_top_k_top_p, logits, k, p, reads=[5, True])
    assert_device_generic(monkeypatch, apply_top_k_top_p, logits, k, p, reads=[VOCAB, VOCAB] + DECIDED)  # top-k off
    off = torch.full((ROWS,), VOCAB, device=META)
    assert_device_generic(monkeypatch, apply_top_k_top_p, logits, off, p, k_max=VOCAB, k_min=VOCAB, reads=SORT_TWO)
    # Without k_min the smallest k is read first; some row's top-k below the vocabulary masks first.
    assert_device_generic(monkeypatch, apply_top_k_top_p, logits, off, p, k_max=VOCAB, reads=[5] + SORT_TWO)
    assert_device_generic(monkeypatch, processing.apply_top_k_top_p_by_value, logits, off, p, reads=[VOCAB] + SORT_TWO)
    assert_device_generic(monkeypatch, apply_top_k_top_p_sorted, logits, k, p)
    assert_device_generic(monkeypatch, apply_min_p, logits, torch.full((ROWS,), 0.1, device=META))
    assert_device_generic(monkeypatch, processing.apply_min_p_keeping_probs_, meta_logits(),
                          torch.full((ROWS,), 0.1, device=META))
    counts = assert_device_generic(monkeypatch, bin_counts, PROMPT, VOCAB, META)
    assert counts.shape == (ROWS, VOCAB) and counts.dtype == torch.long
    ones = torch.ones(ROWS, device=META)
    assert_device_generic(monkeypatch, apply_penalties, logits, counts, counts, ones, ones, ones)
    seen = torch.zeros(5, dtype=torch.long, device=META)  # (row, token) pairs: any 5
    assert_device_generic(monkeypatch, apply_penalties_at, meta_logits(), seen, seen, seen, ones, ones, ones)
    specs = [S.from_params({"logit_bias": {2: 1.0}, "allowed_token_ids": [2, 3], "min_tokens": 2,
                            "stop_token_ids": [3]})] * ROWS
    for dtype in (torch.float32, torch.bfloat16):
        out = assert_device_generic(monkeypatch, apply_logits_processors, meta_logits(dtype), specs, [0, 1, 2, 3])
        assert out.dtype == dtype  # in the model dtype, as V0


def count_host_reads(monkeypatch):
    reads = []
    real = processing._host

    def host(t):
        reads.append(t)
        return real(t)

    monkeypatch.setattr(processing, "_host", host)
    return reads


@pytest.mark.parametrize("ties", [False, True])
def test_host_reads_on_real_data(monkeypatch, ties):
    """On CPU data: one host read per call without ties at the k-th value, two with them
    (the tie path that the meta test can only script), and results equal V0's full sort."""
    logits = torch.randn(ROWS, VOCAB, generator=torch.Generator().manual_seed(5)) * 3
    if ties:
        logits = (logits * 2).round() / 2
    reads = count_host_reads(monkeypatch)
    out = v0_processed_logprobs(logits, [S(top_k=5)] * ROWS)
    assert len(reads) == (2 if ties else 1)
    ref = torch.log_softmax(apply_top_k_top_p_sorted(logits, torch.full((ROWS,), 5), torch.ones(ROWS)), -1)
    assert torch.equal(out.isinf(), ref.isinf())
    assert bool(((~out.isinf()).sum(-1) > 5).any()) == ties  # the tie path really ran


def test_bin_counts_on_cpu_counts_repeats():
    counts = bin_counts([[1, 1, 4], [], [0]], 5)
    assert counts.tolist() == [[0, 2, 0, 0, 1], [0, 0, 0, 0, 0], [1, 0, 0, 0, 0]]
