"""V0's draws on CPU: seeded ones reproduced bit for bit, unseeded ones from the same distribution.

V0 (vLLM 0.8.5, torch 2.6) draws a seeded request's token as ``argmax(probs / q)`` with
``q = torch.empty(vocab).exponential_(generator=g)``. On CPU, torch <= 2.6 implemented that
call with MKL: it takes ONE 32-bit draw from the request generator's mt19937, seeds an
MCG31m1 stream with it (``x0 = draw mod (2^31 - 1)``, 0 -> 1; ``x_k = x0 * 1132489760^k``)
and returns ``-log(float32(x_k / (2^31 - 1)))``. torch 2.13 computes ``exponential_``
differently and draws 32-bit numbers in other ways, so the request generator is advanced by
exactly one mt19937 step here, through its saved state (measured: 15/15 steps x 1024 values
identical to torch 2.6). The MCG31 stream is computed for all seeded rows at once.

Unseeded rows (V0: the same race, noise from the global generator; only the distribution is
defined) are drawn by inverting the cumulative distribution: one uniform per row instead of one
noise value per token. vLLM's CPU draw hashes and takes logarithms per token (2.7 ms for
32 x 32,000 on 2 cores, 17 % of a greedy decode step of the bench model); this costs a softmax,
fp32 sums of 256-token blocks and two searches.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from .v0_sampling import _fused_on_cpu

_M = 2**31 - 1
_A = 1132489760
_MT_WORDS = 624
_STATE_BYTES = 5056  # torch's CPUGeneratorImplState: seed u64, left i32, seeded, next u32, 624 x u64, ...
_KEY_OFFSET = 24


class GeneratorLayoutChanged(RuntimeError):
    pass


def _temper(y: int) -> int:
    y ^= y >> 11
    y ^= (y << 7) & 0x9D2C5680
    y ^= (y << 15) & 0xEFC60000
    return y ^ (y >> 18)


def take_u32(generator: torch.Generator) -> int:
    """Advance a CPU torch.Generator by exactly one mt19937 32-bit draw and return it."""
    state = generator.get_state().numpy()  # a fresh copy
    if state.size != _STATE_BYTES or int(state[:8].view("<u8")[0]) != generator.initial_seed():
        raise GeneratorLayoutChanged(f"unexpected torch CPU generator state ({state.size} bytes)")
    left, nxt = int(state[8:12].view("<i4")[0]), int(state[16:20].view("<u4")[0])
    if left > 1 and 0 <= nxt < _MT_WORDS:  # the next word is in the state: temper it (torch's operator())
        word = int(state[_KEY_OFFSET + 8 * nxt:_KEY_OFFSET + 8 * nxt + 4].view("<u4")[0])
        state[8:12] = np.array([left - 1], "<i4").view(np.uint8)
        state[16:20] = np.array([nxt + 1], "<u4").view(np.uint8)
        generator.set_state(torch.from_numpy(state))
        return _temper(word)
    # torch's left_ == 1: the state is regenerated first (once in 624 draws); numpy's MT19937 does it
    key = state[_KEY_OFFSET:_KEY_OFFSET + 8 * _MT_WORDS].view("<u8").astype(np.uint32)
    rs = np.random.RandomState()
    rs.set_state(("MT19937", key, _MT_WORDS if left == 1 else nxt))
    draw = int(rs.randint(0, 2**32, dtype=np.uint64))  # one 32-bit word
    _, key, pos, *_ = rs.get_state()
    state[_KEY_OFFSET:_KEY_OFFSET + 8 * _MT_WORDS] = key.astype("<u8").view(np.uint8)
    state[8:12] = np.array([_MT_WORDS + 1 - pos], "<i4").view(np.uint8)
    state[16:20] = np.array([pos], "<u4").view(np.uint8)
    generator.set_state(torch.from_numpy(state))
    return draw


@lru_cache(maxsize=8)
def _powers(n: int) -> torch.Tensor:
    out = np.empty(n, dtype=np.int64)
    x = 1
    for k in range(n):
        out[k] = x
        x = (x * _A) % _M
    return torch.from_numpy(out)


def _noise_of(products: torch.Tensor) -> torch.Tensor:
    """x0 * A^k (int64, < 2^62) -> torch 2.6's exponential noise -log(float32(x_k / M))."""
    xs = (products & _M) + (products >> 31)  # = x_k mod M, up to one M too many (2^31 = 1 mod M)
    xs = torch.where(xs >= _M, xs - _M, xs)
    return (xs.double() / _M).float().log().neg_()


def _noise(x0: torch.Tensor, n: int) -> torch.Tensor:
    """[rows] MCG31 seeds -> [rows, n]: each row's torch 2.6 exponential noise."""
    return _noise_of(x0.unsqueeze(1) * _powers(n))


@lru_cache(maxsize=8)
def _sorted_powers(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    powers = _powers(n)
    order = powers.argsort()
    return powers[order], order


def _zero_noise_positions(x0: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, k) of every k < n whose noise is 0 (float32(x_k / M) rounds to 1: x_k >= M - 63;
    M - 64 and up are taken): x0 * A^k = t mod M <=> A^k = t / x0, looked up among the powers."""
    values, order = _sorted_powers(n)
    inverse = torch.tensor([pow(x, -1, _M) for x in x0])  # modular inverses (M is prime)
    targets = inverse.unsqueeze(1) * torch.arange(_M - 64, _M) % _M  # [rows, 64], A^k to look for
    at = torch.searchsorted(values, targets).clamp_(max=n - 1)
    row, j = (values[at] == targets).nonzero(as_tuple=True)
    return row, order[at[row, j]]


def exponential_noise(generator: torch.Generator, n: int) -> torch.Tensor:
    """What torch 2.6 ``torch.empty(n).exponential_(generator=generator)`` returns on CPU."""
    return _noise(torch.tensor([take_u32(generator) % _M or 1]), n)[0]


def seeded_draw(logits: torch.Tensor, generators: dict[int, torch.Generator],
                candidates: torch.Tensor | None = None) -> dict[int, int]:
    """V0's exponential race for the seeded rows of already-processed logits. ``candidates``
    ([rows, c] indices, optional): every token of positive probability is among them."""
    rows = sorted(generators)
    every_row = len(rows) == logits.shape[0]  # rows == [0, 1, ...]: no copy
    logits = logits if every_row else logits[rows]
    x0 = [take_u32(generators[i]) % _M or 1 for i in rows]
    if candidates is not None:
        candidates = candidates if every_row else candidates[rows]
        won = _race_on_candidates(logits, x0, candidates)
        if won is not None:
            return dict(zip(rows, won.tolist()))
    # V0's probabilities: the softmax of the whole row
    return dict(zip(rows, _race(logits.softmax(dim=-1, dtype=torch.float32), x0, candidates).tolist()))


_LEAD = 1e-5  # relative lead of a race's winner that no rounding of the probabilities can undo


def _race_on_candidates(logits: torch.Tensor, x0: list[int], candidates: torch.Tensor) -> torch.Tensor | None:
    """The race's winners from the softmax of the candidates alone, where that is provably V0's
    winner; None otherwise (then the whole rows' softmax runs). V0 took the softmax of the whole
    row: the same ``exp(x - max)`` per token (the rest of the row is -inf, which adds exact zeros),
    over a sum that in another order differs in its last bits. That is one scale for the whole row,
    which moves no score past another; each score's own roundings (an ulp or two, ~2e-7 each) can,
    so a winner whose score leads the runner-up by more than ``_LEAD`` (relative) is V0's winner.
    None also where some noise is 0 (0 / 0 = NaN would win at a dropped token) or a row is NaN."""
    n = logits.shape[1]
    if len(_zero_noise_positions(x0, n)[0]):
        return None
    probs = logits.gather(1, candidates).softmax(dim=-1, dtype=torch.float32)
    scores = probs / _noise_of(torch.tensor(x0).unsqueeze(1) * _powers(n)[candidates])
    if candidates.shape[1] == 1:
        return candidates[:, 0] if bool((scores > 0).all()) else None
    best, at = scores.topk(2, dim=-1)
    if not bool((best[:, 0] > best[:, 1] * (1 + _LEAD)).all()):  # also False for NaN
        return None
    return candidates.gather(1, at[:, :1]).squeeze(1)


def _race(probs: torch.Tensor, x0: list[int], candidates: torch.Tensor | None = None) -> torch.Tensor:
    """``argmax(probs / noise)`` per row, bit for bit, for rows with MCG31 seeds ``x0``. A
    probability of 0 gives 0 there unless its noise is 0 too (0 / 0: NaN, which argmax takes),
    so where most probabilities are 0 (filters) the noise is computed only at the positive ones
    (``candidates``, or found here) and at the rare zero noise."""
    n = probs.shape[1]
    if candidates is not None:
        r = torch.arange(probs.shape[0]).unsqueeze(1).expand_as(candidates).reshape(-1)
        k = candidates.reshape(-1)
        whole_rows = bool(probs[r, k].isnan().any())  # a NaN row (a broken model) is NaN everywhere
    else:
        positive = probs > 0
        whole_rows = (int(positive.sum(dtype=torch.int32)) * 4 > positive.numel()
                      or bool(probs.sum(dim=-1).isnan().any()))
        r, k = (None, None) if whole_rows else positive.nonzero(as_tuple=True)
    if not whole_rows:
        zr, zk = _zero_noise_positions(x0, n)
        r, k = torch.cat([r, zr]), torch.cat([k, zk])
        scores = probs[r, k] / _noise_of(torch.tensor(x0)[r] * _powers(n)[k])
        winners = _first_argmax(r, k, scores, probs.shape[0], n)
        if winners is not None:
            return winners
    # Mostly positive, a NaN row (V0's argmax takes its first NaN), or a zero of the race won: whole rows.
    scores = probs.div(_noise(torch.tensor(x0), n))
    return torch.from_numpy(np.argmax(scores.numpy(), axis=1))  # torch's argmax: 5x slower, same answer


def _first_argmax(r: torch.Tensor, k: torch.Tensor, scores: torch.Tensor, rows: int, n: int) -> torch.Tensor | None:
    """torch's ``argmax(dim=1)`` of ``[rows, n]`` rows that are 0 except ``scores`` at ``(r, k)``:
    each row's first NaN, else its first maximum; None if in some row no score is > 0 or NaN (a
    positive probability meets a zero noise, -0.0: p / -0.0 = -inf), where the zeros elsewhere win."""
    nan = scores.isnan()
    nan_rows = torch.zeros(rows, dtype=torch.bool).index_fill_(0, r[nan], True)
    key = torch.where(nan_rows[r], nan.to(scores.dtype), scores)  # in a row with a NaN, only NaNs count
    best = torch.full((rows,), -float("inf"), dtype=scores.dtype).scatter_reduce_(0, r, key, "amax")
    if bool((best <= 0).any()):
        return None
    at = torch.where(key == best[r], k, n)
    return torch.full((rows,), n, dtype=k.dtype).scatter_reduce_(0, r, at, "amin")


_BLOCK = 256  # the unseeded draw finds a block of this many tokens first, then the token in it


def _below(x: torch.Tensor, limit: torch.Tensor) -> torch.Tensor:
    return torch.minimum(x, limit.nextafter(torch.zeros_like(limit)))


@_fused_on_cpu
def _block_masses(body: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """fp32 sums of ``exp(x - top)`` over each ``_BLOCK`` tokens of ``body`` ([rows, blocks *
    _BLOCK]). Fused on CPU: no [rows, vocab] softmax is written (a fresh 4 MB each step for
    32 x 32,000; the draw took 0.9 ms with it, 0.6 ms without)."""
    return (body - top).exp().view(body.shape[0], -1, _BLOCK).sum(dim=-1)


def unseeded_draw(logits: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """A token per row from softmax(logits), by inverse CDF, uniforms from the global generator:
    the block of ``_BLOCK`` tokens whose cumulative mass passes the uniform, then the token in it
    (a sequential ``cumsum`` over the whole row costs more than the rest of the draw). The
    search lands only where a sum grows, so tokens of probability 0 (-inf) are never drawn. A NaN
    row (a broken model) gets some token, as from vLLM's draw, and nothing raises.
    ``weights`` (optional, [rows, vocab], >= 0): proportional to softmax(logits), e.g. a softmax
    already computed with 0 where a filter dropped the token; used instead of ``exp`` over the row."""
    rows, vocab = logits.shape
    whole = vocab - vocab % _BLOCK
    if weights is None:
        top = logits.amax(dim=-1, keepdim=True)
        masses = [_block_masses(logits[:, :whole], top)] if whole else []
        tail = (logits[:, whole:] - top).exp()
    else:
        masses = [weights[:, :whole].reshape(rows, -1, _BLOCK).sum(dim=-1)] if whole else []
        tail = weights[:, whole:]
    if whole < vocab:  # the last, shorter block
        masses.append(tail.sum(dim=-1, keepdim=True))
    masses = torch.cat(masses, dim=1) if len(masses) > 1 else masses[0]
    ends = masses.double().cumsum(dim=-1)  # [rows, blocks]; fp32 sums: 7x faster than fp64
    total = ends[:, -1:]
    u = _below(torch.rand(total.shape, dtype=torch.float64, device=logits.device) * total, total)
    block = torch.searchsorted(ends, u, right=True).clamp_(max=ends.shape[1] - 1)  # ends[block] > u: it holds mass
    start = torch.where(block > 0, ends.gather(1, (block - 1).clamp(min=0)), 0.0)
    tokens = block * _BLOCK + torch.arange(_BLOCK, device=logits.device)  # [rows, _BLOCK]
    inside = (logits.gather(1, tokens.clamp(max=vocab - 1)).sub(top).exp() if weights is None
              else weights.gather(1, tokens.clamp(max=vocab - 1))).masked_fill(tokens >= vocab, 0.0)
    inside = inside.cumsum(dim=-1, dtype=torch.float64)
    # The block's own cumsum may end a rounding below ends[block] - start: stay inside it.
    at = torch.searchsorted(inside, _below(u - start, inside[:, -1:]), right=True).clamp_(max=_BLOCK - 1)
    return (block * _BLOCK + at).squeeze(1).clamp_(max=vocab - 1)  # clamps: reached by NaN rows only


def draw(logits: torch.Tensor, generators: dict[int, torch.Generator],
         candidates: torch.Tensor | None = None, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Every row's token: V0's seeded race for the rows in ``generators``, the others unseeded.
    ``candidates`` ([rows, c] indices, optional): every token of positive probability is among
    them (a top-k's candidates); the draws then look at those alone. ``weights`` (optional):
    for the unseeded rows, as in ``unseeded_draw``; seeded rows race on ``logits`` as V0 did."""
    rows = logits.shape[0]
    if len(generators) == rows:
        sampled = torch.empty(rows, dtype=torch.long, device=logits.device)
    elif candidates is not None:
        sampled = candidates.gather(1, unseeded_draw(logits.gather(1, candidates)).unsqueeze(1)).squeeze(1)
    else:
        sampled = unseeded_draw(logits, weights)
    if generators:
        seeded = seeded_draw(logits, generators, candidates)
        sampled[list(seeded)] = torch.tensor(list(seeded.values()), dtype=sampled.dtype)
    return sampled
