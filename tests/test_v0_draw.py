"""Pure helper: torch 2.6's CPU exponential_ stream (what V0 drew with), reproduced here.
Expected values were printed by torch 2.6.0 in the V0 environment (ci/v0/install.sh):
    g = torch.Generator().manual_seed(seed); torch.empty(1024).exponential_(generator=g)"""
import pytest
import torch

from vllm_compat import v0_draw

INF = float("inf")

TORCH_2_6 = {  # seed -> per call: values at indices 0, 1, 511, 1023
    7: [[1.879826545715332, 0.2323874533176422, 0.5896647572517395, 0.8842908143997192],
        [0.7881654500961304, 2.4041571617126465, 0.06466549634933472, 0.05214708298444748]],
    1020: [[0.6579612493515015, 0.4095378816127777, 0.9868756532669067, 1.1153186559677124],
           [1.9262510538101196, 0.7692694067955017, 1.5792677402496338, 0.4691455066204071]],
}


@pytest.mark.parametrize("seed", sorted(TORCH_2_6))
def test_exponential_noise_matches_torch_2_6_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    for expected in TORCH_2_6[seed]:
        q = v0_draw.exponential_noise(g, 1024)
        assert q[[0, 1, 511, 1023]].tolist() == expected


def test_the_installed_torch_draws_differently():
    """Companion: this torch's own exponential_ is not V0's stream (why the emulation exists)."""
    if torch.__version__.startswith("2.6."):
        pytest.skip("torch 2.6 is V0's own torch")
    g = torch.Generator().manual_seed(7)
    assert torch.empty(1024).exponential_(generator=g)[[0, 1, 511, 1023]].tolist() != TORCH_2_6[7][0]


def test_take_u32_advances_one_mt19937_word():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    words = [v0_draw.take_u32(g) for _ in range(700)]  # crosses a state regeneration
    rs = np.random.RandomState(3)
    assert words == [int(rs.randint(0, 2**32, dtype=np.uint64)) for _ in range(700)]


def test_seeded_draw_is_the_race_over_each_rows_own_noise():
    """All seeded rows' noise is computed at once; each row's equals its own generator's stream."""
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)) * 3
    gens = {i: torch.Generator().manual_seed(50 + i) for i in (0, 2, 5)}
    twins = {i: torch.Generator().manual_seed(50 + i) for i in (0, 2, 5)}
    got = v0_draw.seeded_draw(logits, gens)
    want = {i: int((logits[i].softmax(-1) / v0_draw.exponential_noise(twins[i], 1000)).argmax()) for i in sorted(twins)}
    assert got == want


def test_unseeded_draw_samples_the_distribution_and_never_a_banned_token():
    """Inverse CDF: empirical frequencies match softmax (chi-square); -inf tokens never drawn."""
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 1.0, -float("inf"), 2.0, -1.0, -float("inf")]]).repeat(200_000, 1)
    tokens = v0_draw.unseeded_draw(logits)
    counts = torch.bincount(tokens, minlength=6).double()
    assert counts[2] == 0 and counts[5] == 0
    expected = logits[0].softmax(-1).double() * tokens.numel()
    keep = expected > 0
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < 18.5  # 3 degrees of freedom, p = 0.0003
    # the same check fails for a wrong distribution (e.g. temperature 2), so it can fail
    wrong = logits[0].div(2).softmax(-1).double() * tokens.numel()
    assert ((((counts - wrong) ** 2)[keep] / wrong[keep]).sum()) > 1000


def test_unseeded_draw_edges():
    """One finite token; the uniform at its largest; probabilities that underflow to 0."""
    row = torch.full((1, 50), -float("inf"))
    row[0, 49] = 0.0
    assert v0_draw.unseeded_draw(row).tolist() == [49]
    torch.manual_seed(1)
    logits = torch.cat([torch.zeros(1, 10), torch.full((1, 10), -200.0)], dim=1)  # exp underflows
    assert (v0_draw.unseeded_draw(logits.repeat(5000, 1)) < 10).all()
    # A uniform that rounding carried up to the total is pulled below it: the search stays on the
    # last token with mass (index 3), never past the row.
    cum = torch.tensor([[0.25, 0.5, 0.5, 1.0]], dtype=torch.float64)
    total = cum[:, -1:]
    u = v0_draw._below(total.clone(), total)
    assert bool((u < total).all()) and torch.searchsorted(cum, u, right=True).item() == 3


def test_draw_mixes_seeded_and_unseeded_rows():
    logits = torch.full((4, 8), -float("inf"))
    logits[:, 3] = 0.0  # one possible token per row
    logits[2, 6] = 0.0
    gens = {2: torch.Generator().manual_seed(9)}
    twin = torch.Generator().manual_seed(9)
    tokens = v0_draw.draw(logits, gens).tolist()
    assert tokens[0] == tokens[1] == tokens[3] == 3
    assert tokens[2] == v0_draw.seeded_draw(logits, {2: twin})[2]
    assert v0_draw.draw(logits[:1], {0: torch.Generator().manual_seed(2)}).tolist() == [3]
    # with candidates (every finite token among them): the seeded rows' tokens do not change
    wide = torch.randn(6, 3000, generator=torch.Generator().manual_seed(3))
    top = wide.topk(30, -1)
    wide = wide.masked_fill(wide < top.values[:, -1:], -INF)
    seeded = {1: 11, 4: 44, 5: 55}
    plain = v0_draw.draw(wide, {r: torch.Generator().manual_seed(s) for r, s in seeded.items()})
    among = v0_draw.draw(wide, {r: torch.Generator().manual_seed(s) for r, s in seeded.items()}, top.indices)
    assert among[[1, 4, 5]].tolist() == plain[[1, 4, 5]].tolist()
    assert bool(wide.gather(1, among.unsqueeze(1)).isfinite().all())


def _dense_race(probs, x0):
    return probs.div(v0_draw._noise(torch.tensor(x0), probs.shape[1])).argmax(dim=1)


def test_race_on_filtered_rows_equals_the_dense_race_including_zero_noise():
    """With filters the noise is computed only where it matters; the result is the dense race's,
    also where a noise value is 0 (float32(x / M) == 1): 0 / 0 = NaN at a zero probability wins
    V0's argmax, and p / 0 = -inf at the only positive probability loses to the zeros."""
    n, m = 1000, v0_draw._M
    powers = v0_draw._powers(n)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, n, generator=g) * 3
    logits = logits.masked_fill(logits < logits.topk(20, -1).values[:, -1:], -INF)
    logits[4] = -INF
    logits[4, 500] = 0.0  # one possible token
    probs = logits.softmax(-1)
    # seeds whose noise is 0 at a chosen k: x0 = (M - 1) / A^k mod M
    x0 = [12345, int((m - 1) * pow(int(powers[7]), m - 2, m) % m), 777,
          int((m - 3) * pow(int(powers[999]), m - 2, m) % m), int((m - 1) * pow(int(powers[500]), m - 2, m) % m), 1]
    assert v0_draw._noise(torch.tensor(x0), n)[[1, 3, 4], [7, 999, 500]].eq(0).all()
    got, want = v0_draw._race(probs, x0), _dense_race(probs, x0)
    assert torch.equal(got, want)
    candidates = logits.topk(25, -1).indices  # a top-k's candidates: every finite token and more
    assert torch.equal(v0_draw._race(probs, x0, candidates), want)
    assert want[1] == 7 or probs[1, 7] > 0  # NaN at a zero probability: V0 drew a filtered token
    assert want[4] == 0  # the only possible token's noise is 0: -inf, the zeros win (first index)


def test_race_sparse_and_dense_agree_on_random_filtered_rows():
    g = torch.Generator().manual_seed(1)
    for trial in range(20):
        logits = torch.randn(16, 4000, generator=g) * 3
        logits = logits.masked_fill(logits < logits.topk(1 + trial * 7, -1).values[:, -1:], -INF)
        x0 = torch.randint(1, v0_draw._M, (16,), generator=g).tolist()
        probs = logits.softmax(-1)
        assert torch.equal(v0_draw._race(probs, x0), _dense_race(probs, x0))
        candidates = logits.topk(1 + trial * 7 + trial % 3, -1).indices
        assert torch.equal(v0_draw._race(probs, x0, candidates), _dense_race(probs, x0))


def test_race_among_candidates_needs_every_positive_one():
    """Companion: candidates that miss a positive probability give another winner somewhere (the
    draw relies on the top-k path handing over all of them)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 4000, generator=g)
    logits = logits.masked_fill(logits < logits.topk(10, -1).values[:, -1:], -INF)
    x0 = torch.randint(1, v0_draw._M, (64,), generator=g).tolist()
    probs = logits.softmax(-1)
    short = logits.topk(5, -1).indices
    assert not torch.equal(v0_draw._race(probs, x0, short), _dense_race(probs, x0))


def test_unseeded_draw_among_candidates():
    """draw() with candidates: only their tokens, in the proportions of the full row's softmax."""
    g = torch.Generator().manual_seed(6)
    row = torch.randn(5000, generator=g) * 2
    top = row.topk(40)
    row = row.masked_fill(row < top.values[-1], -INF)
    row[top.indices[3]] = -INF  # a dropped candidate (top-p): never drawn
    torch.manual_seed(7)
    reps = 200_000
    tokens = v0_draw.draw(row.repeat(reps, 1), {}, top.indices.repeat(reps, 1))
    counts = torch.bincount(tokens, minlength=5000).double()
    expected = row.softmax(-1).double() * reps
    keep = expected > 0
    assert counts[~keep].sum() == 0
    dof = int(keep.sum()) - 1
    assert (((counts - expected) ** 2)[keep] / expected[keep]).sum() < dof + 6 * (2 * dof) ** 0.5


@pytest.mark.parametrize("weights", [False, True], ids=["from logits", "from weights"])
def test_unseeded_draw_across_blocks(weights):
    """700 tokens (3 blocks, the last one padded), a third banned: chi-square over every token.
    With ``weights`` (min-p hands over its softmax, 0 where it dropped) the draw follows those: here
    they are the row's softmax while the logits passed along are the row at another temperature."""
    g = torch.Generator().manual_seed(4)
    row = torch.randn(700, generator=g) * 1.5
    row[torch.rand(700, generator=g) < 0.33] = -INF
    torch.manual_seed(5)
    rows = row.repeat(400_000, 1)
    tokens = (v0_draw.unseeded_draw(rows * 0.5, rows.softmax(-1)) if weights else v0_draw.unseeded_draw(rows))
    counts = torch.bincount(tokens, minlength=700).double()
    assert counts[row.isinf()].sum() == 0
    expected = row.softmax(-1).double() * tokens.numel()
    keep = expected > 0
    dof = int(keep.sum()) - 1
    chi2 = (((counts - expected) ** 2)[keep] / expected[keep]).sum()
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)
    wrong = row.mul(1.05).softmax(-1).double() * tokens.numel()  # 5 % off in temperature: caught
    assert (((counts - wrong) ** 2)[keep] / wrong[keep]).sum() > dof + 6 * (2 * dof) ** 0.5


def test_nan_and_all_banned_rows_raise_nothing():
    """A broken model's NaN row, or a row with every token banned: a token comes back (seeded: the
    dense race's, V0's first NaN), nothing raises (an exception here would kill the engine core)."""
    logits = torch.randn(4, 700, generator=torch.Generator().manual_seed(0))
    logits = logits.masked_fill(logits < logits.topk(5, -1).values[:, -1:], -INF)
    logits[1, 3] = float("nan")
    logits[2] = -INF
    tokens = v0_draw.draw(logits, {})
    assert tokens.shape == (4,) and bool(((tokens >= 0) & (tokens < 700)).all())
    x0 = [11, 22, 33, 44]
    probs = logits.softmax(-1)
    assert torch.equal(v0_draw._race(probs, x0), _dense_race(probs, x0))
    assert v0_draw.draw(logits, {i: torch.Generator().manual_seed(i) for i in range(4)}).shape == (4,)


def test_race_on_candidates_alone_gives_the_dense_race_or_defers():
    """Seeded rows race on the softmax of their candidates alone where the winner's lead makes the
    whole row's softmax unnecessary; where it returns a winner it is the dense race's."""
    g = torch.Generator().manual_seed(9)
    decided = 0
    for trial in range(30):
        logits = torch.randn(32, 3000, generator=g) * (1 + trial % 4)
        top = logits.topk(1 + trial * 3, -1)
        logits = torch.full_like(logits, -INF).scatter_(1, top.indices, top.values)
        x0 = torch.randint(1, v0_draw._M, (32,), generator=g).tolist()
        won = v0_draw._race_on_candidates(logits, x0, top.indices)
        decided += won is not None
        if won is not None:
            assert torch.equal(won, _dense_race(logits.softmax(-1), x0))
    assert decided >= 25


def test_race_on_candidates_defers_a_thin_lead():
    """Two tokens of equal probability whose noise values differ by less than 1e-6 (relative): the
    winner then depends on roundings of the whole row's softmax, so the candidates alone decide
    nothing (the full race decides)."""
    n = 4000
    g = torch.Generator().manual_seed(8)
    for _ in range(50):
        x0 = torch.randint(1, v0_draw._M, (4096,), generator=g)
        q, order = v0_draw._noise(x0, 40).sort(-1)
        hits = ((q[:, 1:] - q[:, :-1]) < 1e-6 * q[:, 1:]).nonzero()
        if len(hits):
            break
    row, j = hits[0].tolist()
    k1, k2 = int(order[row, j]), int(order[row, j + 1])
    logits = torch.full((1, n), -INF)
    logits[0, [k1, k2]] = 0.0
    logits[0, 45] = -3.0
    seeds = [int(x0[row])]
    candidates = torch.tensor([[k1, k2, 45]])
    assert v0_draw._race_on_candidates(logits, seeds, candidates) is None
    probs = logits.softmax(-1)
    assert torch.equal(v0_draw._race(probs, seeds, candidates), _dense_race(probs, seeds))
