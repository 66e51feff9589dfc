"""The top-p path from sorted values (``processing.apply_top_k_top_p_by_value``: V0's cut from a
sort of the values alone, no index sort) compared bit for bit (``torch.equal``: kept values and
-inf mask) with V0's own index sort (``apply_top_k_top_p_sorted``) over random and adversarial
rows. Rows where a tie is cut by the boundary (or with a NaN) must go to V0's sort."""
import pytest
import torch

from vllm_compat import v0_sampling as processing
from vllm_compat.v0_sampling import (SamplingSpec, apply_min_p, apply_top_k_top_p,
                                    apply_top_k_top_p_sorted, v0_processed_logprobs)

INF = float("inf")
PS = [1e-6, 0.1, 0.5, 0.9, 0.95, 0.99, 0.999, 0.9999, 1.0]


@pytest.fixture
def sorted_rows(monkeypatch):
    """Counts the rows the values path hands to V0's index sort (to show the fast path ran)."""
    counted = []
    real = processing.apply_top_k_top_p_sorted

    def counting(logits, k, p):
        counted.append(logits.shape[0])
        return real(logits, k, p)

    monkeypatch.setattr(processing, "apply_top_k_top_p_sorted", counting)
    return counted


def check(logits, k, p):
    """apply_top_k_top_p (top-k off for some row -> the exact path) == V0's full sort, bit for bit."""
    out = apply_top_k_top_p(logits.clone(), k, p)
    ref = apply_top_k_top_p_sorted(logits.clone(), k, p)  # the real one, not the fixture's counter
    bad = (~((out == ref) | (out.isnan() & ref.isnan()))).any(-1)
    assert not bad.any(), f"rows {bad.nonzero().flatten().tolist()} differ from V0's sort"
    assert torch.equal(out, ref)
    # In place (the sampler's own logits, as vLLM's filters): the same, written into the input; the
    # rows handed to V0's sort are taken before the drop
    into = logits.clone()
    got, _ = processing.top_k_top_p_with_candidates(into, k, p, inplace=True)
    assert got.data_ptr() == into.data_ptr()
    torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True)
    return out


def rows_like_lm(rows, vocab, scale, seed, zipf=False):
    g = torch.Generator().manual_seed(seed)
    if zipf:  # log-probabilities of a Zipf law over a random permutation, plus noise
        ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(rows)]) + 1
        return -scale * ranks.float().log() + torch.randn(rows, vocab, generator=g) * 0.5
    return torch.randn(rows, vocab, generator=g) * scale


@pytest.mark.parametrize("scale", [1.0, 2.0, 4.0, 8.0])
@pytest.mark.parametrize("p", PS)
def test_random_rows_32000(sorted_rows, scale, p):
    logits = rows_like_lm(32, 32000, scale, seed=int(scale * 1000 + p * 1e4))
    check(logits, torch.full((32,), 32000), torch.full((32,), p))


@pytest.mark.parametrize("exponent,p", [(1.5, 0.9), (1.5, 0.95), (2.0, 0.99), (1.1, 0.9), (1.1, 0.99)])
def test_zipf_rows(sorted_rows, exponent, p):
    logits = rows_like_lm(64, 32000, exponent, seed=5, zipf=True)
    check(logits, torch.full((64,), 32000), torch.full((64,), p))
    if exponent > 1.1:  # nuclei of at most a few thousand tokens: a few rows at most are sorted
        assert sum(sorted_rows) <= 4, sorted_rows  # (measured: 0)


def test_typical_and_flat_rows_are_not_index_sorted(sorted_rows):
    """randn * 4 and nearly flat rows (a random model: the nucleus is most of the vocabulary) at
    p = 0.9: no row goes to V0's index sort (no tie at the cut in continuous values)."""
    logits = torch.cat([rows_like_lm(64, 32000, 4.0, seed=11), rows_like_lm(64, 32000, 0.4, seed=12)])
    check(logits, torch.full((128,), 32000), torch.full((128,), 0.9))
    assert sum(sorted_rows) == 0, sorted_rows


@pytest.mark.parametrize("p", PS)
def test_small_vocabularies(p):
    for vocab, scale in [(64, 1.0), (300, 2.0), (1000, 4.0), (257, 0.3)]:
        logits = rows_like_lm(40, vocab, scale, seed=vocab + int(p * 1e4))
        check(logits, torch.full((40,), vocab), torch.full((40,), p))


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99, 1.0])
def test_ties_at_the_boundary(sorted_rows, p):
    """Coarsely rounded logits: tie groups everywhere, also across the top-p boundary (those rows
    go to V0's sort: which of the tied tokens survive is the sort's order)."""
    for step in (0.5, 0.25, 1.0):
        logits = (rows_like_lm(48, 32000, 3.0, seed=int(step * 8 + p * 100)) / step).round() * step
        check(logits, torch.full((48,), 32000), torch.full((48,), p))
    if p < 1:  # p = 1 cuts nothing here (no probability underflows)
        assert sum(sorted_rows) > 0  # some tie was cut: V0's index sort decided which copies stay


def test_in_place_rows_sorted_by_v0_see_the_rows_as_they_came_in():
    """Why the in-place path hands V0's sort its rows before the drop: dropping first (into the same
    tensor) and sorting afterwards gives the tie rows another answer."""
    logits = (rows_like_lm(48, 32000, 3.0, seed=3) / 0.5).round() * 0.5
    k, p = torch.full((48,), 32000), torch.full((48,), 0.9)
    ref = apply_top_k_top_p_sorted(logits.clone(), k, p)
    into = logits.clone()
    processing.drop_below_(into, ref.masked_fill(ref.isinf(), INF).amin(dim=-1, keepdim=True))  # the drop first
    assert not torch.equal(apply_top_k_top_p_sorted(into, k, p), ref)


def test_nan_rows_get_v0s_answer(sorted_rows):
    """A broken model's NaN row: V0's sort decides (it keeps the row as it is); others unaffected."""
    logits = rows_like_lm(6, 32000, 2.0, seed=7)
    logits[1, 5] = float("nan")
    logits[4] = float("nan")
    k, p = torch.full((6,), 32000), torch.full((6,), 0.9)
    out = apply_top_k_top_p(logits.clone(), k, p)
    torch.testing.assert_close(out, apply_top_k_top_p_sorted(logits.clone(), k, p), rtol=0, atol=0, equal_nan=True)
    assert sorted_rows == [2]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_logit_dtypes(dtype):
    """The values are sorted through fp32 where numpy has no sort for the dtype (exact both ways)."""
    logits = rows_like_lm(16, 32000, 4.0, seed=3).to(dtype)
    check(logits, torch.full((16,), 32000), torch.full((16,), 0.9))


@pytest.mark.parametrize("p", PS)
def test_flat_and_peaked_rows(p):
    vocab = 32000
    flat = torch.zeros(4, vocab)
    flat[1] = 1.5
    flat[2] = -7.0
    flat[3, :] = 3.0
    flat[3, 17] = 3.0 + 1e-6  # one slightly larger, the rest tied
    peaked = rows_like_lm(4, vocab, 1.0, seed=3)
    peaked[0, 5] = 40.0
    peaked[1, 5] = 15.0
    peaked[2, :3] = 30.0  # tied maxima
    peaked[3, 7] = 200.0  # everything else underflows
    two_level = torch.where(torch.rand(4, vocab, generator=torch.Generator().manual_seed(1)) < 0.01, 5.0, 0.0)
    logits = torch.cat([flat, peaked, two_level])
    check(logits, torch.full((12,), vocab), torch.full((12,), p))


@pytest.mark.parametrize("p", [0.5, 0.9, 0.99, 1.0])
def test_rows_with_minus_inf_and_huge_range(p):
    vocab = 32000
    g = torch.Generator().manual_seed(int(p * 100))
    logits = rows_like_lm(16, vocab, 4.0, seed=int(p * 1000))
    logits[torch.rand(16, vocab, generator=g) < 0.3] = -INF  # banned tokens
    logits[3, :-2] = -INF  # two finite values
    logits[4, 1:] = -INF  # one finite value
    logits[5, ::2] -= 120.0  # half the row underflows in exp
    logits[6, :100] = -90.0  # a few subnormal probabilities
    logits[7] = torch.linspace(-150.0, 0.0, vocab)  # a ramp through the whole fp32 exp range
    check(logits, torch.full((16,), vocab), torch.full((16,), p))


@pytest.mark.parametrize("p", [0.9, 0.95, 0.99])
def test_bf16_logits_and_parameters(p):
    """bf16-rounded logits (many ties) and p as V0 materialised it for a bf16 model (1 - p in bf16)."""
    logits = rows_like_lm(48, 32000, 4.0, seed=int(p * 100)).bfloat16().float()
    check(logits, torch.full((48,), 32000), torch.full((48,), p).bfloat16())
    check(logits, torch.full((48,), 32000), torch.full((48,), p))


def test_mixed_top_k_and_top_p_rows(sorted_rows):
    """Rows with and without top-k in one batch, top-k above 1024 and near the vocabulary."""
    vocab = 32000
    logits = rows_like_lm(64, vocab, 3.0, seed=21)
    ks = torch.tensor([vocab, 5, 50, 1500, 2000, 5000, vocab - 1, 20000] * 8)
    ps = torch.tensor([0.9, 1.0, 0.95, 0.99, 0.5, 0.9, 0.999, 1.0] * 8).roll(3)
    check(logits, ks, ps)
    check((logits * 2).round() / 2, ks, ps)  # with ties at the k-th value too


def test_top_k_above_1024_with_top_p():
    vocab = 32000
    for k in (1025, 2048, 3000, 8000):
        logits = rows_like_lm(32, vocab, 2.0, seed=k)
        for p in (0.5, 0.9, 0.99, 1.0):
            check(logits, torch.full((32,), k), torch.full((32,), p))


def test_decisions_exactly_at_one_minus_p():
    """1 - p equal to one of V0's own cumulative sums (and one ulp either side): V0 drops a token
    whose cumulative probability is <= 1 - p. p in float64 makes 1 - p exactly that sum."""
    vocab = 32000
    logits = rows_like_lm(24, vocab, 4.0, seed=99)
    srt = logits.sort(dim=-1).values
    cums = srt.softmax(-1).cumsum(-1)  # V0's probs_sum
    j = torch.tensor([vocab - 2 - (5 * i) % 400 for i in range(24)])
    c = cums.gather(1, j.unsqueeze(1)).squeeze(1)
    for target in (c, torch.nextafter(c, torch.ones(())), torch.nextafter(c, torch.zeros(()))):
        p = 1 - target.double()
        assert torch.equal(1 - p, target.double())
        check(logits, torch.full((24,), vocab), p)


def test_v0_processed_logprobs_top_p_only_equals_the_full_sort():
    """Top-p without top-k through v0_processed_logprobs: the same tensor as V0's full sort."""
    vocab = 32000
    logits = rows_like_lm(16, vocab, 4.0, seed=8)
    specs = [SamplingSpec(temperature=t, top_p=p) for t, p in zip([0.7, 1.0, 1.3, 0.5] * 4, [0.9, 0.95, 0.99, 0.5] * 4)]
    out = v0_processed_logprobs(logits, specs)
    temps = torch.tensor([s.temperature for s in specs]).unsqueeze(1)
    ref = torch.log_softmax(apply_top_k_top_p_sorted(logits / temps, torch.full((16,), vocab),
                                                     torch.tensor([s.top_p for s in specs])), -1)
    assert torch.equal(out, ref)


class _Ops(torch.overrides.TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_no_index_sort_on_the_fast_path_and_min_p_sorts_nothing():
    logits = rows_like_lm(8, 32000, 4.0, seed=2)
    with _Ops() as ops:
        apply_top_k_top_p(logits, torch.full((8,), 32000), torch.full((8,), 0.9))
    assert not {"sort", "argsort"} & set(ops.names)  # the values are sorted by numpy on CPU
    with _Ops() as ops:
        out = apply_min_p(logits, torch.full((8,), 0.05))
    assert not {"sort", "argsort", "topk"} & set(ops.names)
    # min-p exactly: probability < min_p * max probability, from the row's own softmax
    probs = logits.softmax(-1)
    assert torch.equal(out.isinf(), probs < 0.05 * probs.max(-1, keepdim=True).values)


def test_host_reads_one_per_call(monkeypatch):
    reads = []
    real = processing._host
    monkeypatch.setattr(processing, "_host", lambda t: reads.append(t) or real(t))
    logits = rows_like_lm(16, 32000, 4.0, seed=4)
    apply_top_k_top_p(logits, torch.full((16,), 32000), torch.full((16,), 0.9), k_max=32000, k_min=32000)
    assert len(reads) == 1
    reads.clear()
    apply_top_k_top_p(logits, torch.full((16,), 32000), torch.full((16,), 0.99), k_max=32000, k_min=32000)
    assert len(reads) == 1  # however deep the cut


def test_top_k_path_at_one_minus_p_equal_to_v0_sums():
    """The top-k <= 1024 path (candidates only) at V0's own cumulative sums, one ulp either side."""
    vocab, rows, k = 32000, 24, 500
    logits = rows_like_lm(rows, vocab, 4.0, seed=0)
    srt = logits.sort(dim=-1).values
    srt = srt.masked_fill(srt < srt[:, vocab - k:vocab - k + 1], -INF)
    cums = srt.softmax(-1).cumsum(-1)
    c = cums.gather(1, torch.tensor([vocab - 2 - (7 * i) % 300 for i in range(rows)]).unsqueeze(1)).squeeze(1)
    for target in (c, torch.nextafter(c, torch.ones(())), torch.nextafter(c, torch.zeros(()))):
        p = 1 - target.double()
        out = apply_top_k_top_p(logits.clone(), torch.full((rows,), k), p, k_max=k)
        assert torch.equal(out, apply_top_k_top_p_sorted(logits.clone(), torch.full((rows,), k), p))
