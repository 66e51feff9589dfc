"""Pure helpers: V0's processing order, reimplemented in vllm_compat.v0_sampling."""
import math

import pytest
import torch

from vllm_compat.v0_sampling import (SamplingSpec, apply_min_p, apply_penalties, apply_top_k_top_p,
                                    apply_top_k_top_p_sorted, bin_counts, v0_processed_logprobs, v0_rank)

INF = float("inf")


def test_top_k_keeps_ties_with_kth_value():
    out = apply_top_k_top_p(torch.tensor([[1.0, 2.0, 2.0, 3.0]]), torch.tensor([2]), torch.tensor([1.0]))
    assert torch.isinf(out).tolist() == [[True, False, False, False]]


def test_top_p_keeps_at_least_one_token():
    out = apply_top_k_top_p(torch.tensor([[0.0, 10.0]]), torch.tensor([2]), torch.tensor([1e-6]))
    assert torch.isinf(out).tolist() == [[True, False]]


def test_top_p_cuts_the_tail():
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.15), math.log(0.05)]])
    out = apply_top_k_top_p(logits, torch.tensor([4]), torch.tensor([0.75]))
    assert torch.isinf(out).tolist() == [[False, False, True, True]]


def test_min_p_relative_to_max():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.07, 0.03]]))
    out = apply_min_p(logits, torch.tensor([0.1]))
    assert torch.isinf(out).tolist() == [[False, False, False, True]]


def test_v0_applies_min_p_after_top_p_and_the_order_matters():
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1]])
    spec = SamplingSpec(temperature=1.0, top_p=0.75, min_p=0.3)
    v0 = v0_processed_logprobs(probs.log(), [spec])
    # V0: top-p on the full distribution drops 0.1; min-p (0.3 * 0.4 = 0.12) keeps the rest.
    assert torch.isinf(v0).tolist() == [[False, False, False, True]]
    # V1's order (min-p first, then top-p on the renormalised rest) drops 0.2 as well.
    v1_order = apply_top_k_top_p(apply_min_p(probs.log(), torch.tensor([0.3])), torch.tensor([4]),
                                 torch.tensor([0.75]))
    assert torch.isinf(v1_order).tolist() == [[False, False, True, True]]


def test_penalties_v0_semantics():
    logits = torch.tensor([[2.0, -2.0, 1.0, 1.0]])
    prompt, output = bin_counts([[0]], 4), bin_counts([[1, 2, 2]], 4)
    out = apply_penalties(logits, prompt, output, torch.tensor([2.0]), torch.tensor([0.5]), torch.tensor([0.25]))
    # token 0: prompt only -> 2/2; token 1: output once -> -2*2 - 0.5 - 0.25;
    # token 2: output twice -> 1/2 - 1.0 - 0.25; token 3: untouched.
    assert out.tolist() == [[1.0, -4.75, -0.75, 1.0]]


def test_temperature_and_greedy():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    hot = v0_processed_logprobs(logits, [SamplingSpec(temperature=0.5)])
    assert torch.allclose(hot, torch.log_softmax(logits / 0.5, -1))
    greedy = v0_processed_logprobs(logits, [SamplingSpec.from_params({"temperature": 0.0, "top_p": 0.5})])
    assert torch.allclose(greedy, torch.log_softmax(logits, -1))  # greedy resets filters, T -> 1


def test_bf16_parameters_are_rounded_like_v0():
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    out = v0_processed_logprobs(logits, [SamplingSpec(temperature=0.8)], param_dtype=torch.bfloat16)
    assert torch.allclose(out, torch.log_softmax(logits / 0.80078125, -1))


def test_rank_counts_strictly_greater():
    row = torch.tensor([0.5, 0.9, 0.9, 0.1])
    assert v0_rank(row, 1) == 1 and v0_rank(row, 2) == 1 and v0_rank(row, 0) == 3


@pytest.mark.parametrize("k", [1, 5, 50, 300])
@pytest.mark.parametrize("p", [1.0, 0.95, 0.6, 0.1])
def test_partial_sort_path_equals_v0_full_sort(k, p):
    """The topk path (only the candidates sorted) gives V0's full-sort result exactly."""
    g = torch.Generator().manual_seed(k * 100 + int(p * 100))
    logits = torch.randn(64, 5000, generator=g) * 3
    ks, ps = torch.full((64,), k), torch.full((64,), p)
    ks[::3] = max(1, k // 2)  # rows with different k in one batch
    fast = apply_top_k_top_p(logits.clone(), ks, ps)
    assert torch.equal(fast, apply_top_k_top_p_sorted(logits.clone(), ks, ps))


def test_partial_sort_path_keeps_ties_with_the_kth_value():
    logits = (torch.randn(32, 2000, generator=torch.Generator().manual_seed(1)) * 4).round() / 4  # many ties
    ks, ps = torch.full((32,), 20), torch.ones(32)
    fast = apply_top_k_top_p(logits.clone(), ks, ps)
    assert torch.equal(fast, apply_top_k_top_p_sorted(logits.clone(), ks, ps))
    assert ((fast > -float("inf")).sum(-1) > 20).any()  # ties really kept beyond k


def _full_row_reference(logits, specs):
    """V0 literally: divide the whole row, sort the whole vocabulary, log_softmax the whole row."""
    temps = torch.tensor([s.temperature for s in specs]).unsqueeze(1)
    ks = torch.tensor([s.top_k for s in specs])
    ps = torch.tensor([s.top_p for s in specs])
    return torch.log_softmax(apply_top_k_top_p_sorted(logits / temps, ks, ps), dim=-1)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.8, 3.0])
def test_candidate_logprobs_equal_the_full_row_computation(temperature, ties):
    """With top-k set (and no min-p), the processed logprobs come from the candidates alone:
    same kept set, same values up to the rounding of the normalising sum."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(48, 4000, generator=g) * 3
    if ties:  # ties with the k-th value, also past the candidates
        logits = (logits * 2).round() / 2
    specs = [SamplingSpec(temperature=temperature, top_k=k, top_p=p)
             for k, p in zip([50, 5, 200] * 16, [0.95, 1.0, 0.6, 0.9] * 12)]
    out = v0_processed_logprobs(logits, specs)
    ref = _full_row_reference(logits, specs)
    if ties:
        # Which of several tied tokens a top-p cut drops follows the sort's order of equal values,
        # which V0 left to torch (its CPU sort is not stable); how many are kept, and their
        # values, do not depend on it.
        assert ((~torch.isinf(out[1::3])).sum(-1) > 5).any()  # rows with k=5 kept ties beyond k
        out, ref = out.sort(dim=-1).values, ref.sort(dim=-1).values
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(out[kept], ref[kept], rtol=0, atol=2e-6)


def test_division_by_temperature_can_create_ties_at_the_kth_value():
    """x / T is monotonic but not strictly: two raw values can round to one after division;
    the candidate path must then keep both, like the full-row division does."""
    a = torch.tensor(1.5)
    b = torch.nextafter(a, torch.tensor(0.0))  # b < a, but b / 0.7 == a / 0.7 in fp32
    assert b < a and b / 0.7 == a / 0.7
    logits = torch.tensor([[2.0, a.item(), b.item(), -1.0, -2.0]])
    spec = SamplingSpec(temperature=0.7, top_k=2)
    out = v0_processed_logprobs(logits, [spec])
    assert (~torch.isinf(out)).sum().item() == 3
    assert torch.allclose(out, _full_row_reference(logits, [spec]), rtol=0, atol=1e-6)


def test_fused_cpu_kernels_equal_their_eager_steps():
    """The compiled compare/select kernels (rank count, top-p and min-p masks) give eager torch's
    answer bit for bit, -inf and NaN included, and did run compiled."""
    from vllm_compat.fixes.logprobs import v0_ranks
    from vllm_compat.v0_sampling import (_drop_both_below_, apply_min_p_keeping_probs_, count_greater, drop_below,
                                         drop_below_, drop_where_below, drop_where_below_)

    g = torch.Generator().manual_seed(3)
    for rows in (1, 2, 37):
        x = torch.randn(rows, 3000, generator=g)
        x[:, ::7] = -INF  # processed rows: -inf outside the kept set
        x[0, 5] = float("nan")
        values = torch.cat([x[:, :1], x[:, 7:8], torch.full((rows, 1), -INF)])[torch.randperm(3 * rows)[:rows]]
        assert torch.equal(v0_ranks(x, values), (x > values).sum(-1) + 1)
        assert torch.allclose(drop_below(x, values), x.masked_fill(x < values, -INF), rtol=0, atol=0, equal_nan=True)
        probs = x.softmax(-1)
        assert torch.allclose(drop_where_below(x, probs, values.exp()),
                              x.masked_fill(probs < values.exp(), -INF), rtol=0, atol=0, equal_nan=True)
        for in_place, fresh, args in ((drop_below_, drop_below, (values,)),
                                      (drop_where_below_, drop_where_below, (probs, values.exp()))):
            into = x.clone()
            assert in_place(into, *args).data_ptr() == into.data_ptr()  # written into its input
            assert torch.allclose(into, fresh(x, *args), rtol=0, atol=0, equal_nan=True)
        into = x.clone()
        assert apply_min_p(into, torch.full((rows,), 0.1), inplace=True).data_ptr() == into.data_ptr()
        want = apply_min_p(x, torch.full((rows,), 0.1))
        assert torch.allclose(into, want, rtol=0, atol=0, equal_nan=True)
        # The sampler's min-p: the same logits, and the softmax it compared with 0 where it dropped.
        into = x.clone()
        weights = apply_min_p_keeping_probs_(into, torch.full((rows,), 0.1))
        assert torch.allclose(into, want, rtol=0, atol=0, equal_nan=True)
        dropped = probs < 0.1 * probs.amax(dim=-1, keepdim=True)
        assert torch.allclose(weights, probs.masked_fill(dropped, 0.0), rtol=0, atol=0, equal_nan=True)
    for fused in (count_greater, drop_below, drop_where_below, drop_below_, drop_where_below_, _drop_both_below_):
        assert fused.fused(), fused.__name__


def _v0_processors_reference(row: torch.Tensor, params: dict, n_outputs: int, eos: set) -> torch.Tensor:
    """V0 0.8.5 written out: ``logit_bias_logits_processor`` (``logits[t] += bias`` per token,
    clamped bias), ``AllowedTokenIdsLogitsProcessor`` (masked_fill of the rest),
    ``_apply_min_tokens_penalty`` (all_stop_token_ids = stop ids + the EOS ids)."""
    row = row.clone()
    for t, b in (params.get("logit_bias") or {}).items():
        row[int(t)] += min(100.0, max(-100.0, b))
    if params.get("allowed_token_ids") is not None:
        mask = torch.ones(row.shape[-1], dtype=torch.bool)
        mask[params["allowed_token_ids"]] = False
        row.masked_fill_(mask, -INF)
    if n_outputs < params.get("min_tokens", 0):
        row[sorted(set(params.get("stop_token_ids", [])) | eos)] = -INF
    return row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_processors_and_min_tokens_match_v0_written_out(dtype):
    """Bit-exact against V0's own per-token code, in the model dtype (bf16: the bias is added in
    fp32 op-math and rounded, as ``x += float`` does), then through the whole processing."""
    from vllm_compat.v0_sampling import apply_logits_processors

    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(5, 64, generator=g) * 3).to(dtype)
    params = [
        {"logit_bias": {"3": 0.3, 7: -100.0, 9: 250.0, 11: 1.7}},  # 250 -> clamped to 100; 0.3: not a bf16 value
        {"allowed_token_ids": [1, 5, 9, 40]},
        {"min_tokens": 3, "stop_token_ids": [4, 6]},
        {"min_tokens": 3, "stop_token_ids": [4, 6]},  # 3 outputs already: nothing held
        {"logit_bias": {5: 2.5, 60: 1.1}, "allowed_token_ids": [5, 6, 7, 60], "min_tokens": 1,
         "stop_token_ids": [6], "temperature": 0.7, "top_p": 0.9},
    ]
    outputs = [[1], [], [2, 3], [8, 8, 8], []]
    eos = {2}
    specs = [SamplingSpec.from_params(p, eos_token_ids=eos) for p in params]
    mine = apply_logits_processors(logits, specs, [len(o) for o in outputs])
    ref = torch.stack([_v0_processors_reference(logits[i], p, len(o), eos)
                       for i, (p, o) in enumerate(zip(params, outputs))])
    assert mine.dtype == dtype and torch.equal(mine, ref)
    assert float(mine[2, 2]) == -INF and float(mine[3, 2]) != -INF  # EOS held only below min_tokens
    full = v0_processed_logprobs(logits, specs, [[0]] * 5, outputs, param_dtype=dtype)
    plain = v0_processed_logprobs(ref, [SamplingSpec.from_params({k: v for k, v in p.items() if k in (
        "temperature", "top_p")}) for p in params], [[0]] * 5, outputs, param_dtype=dtype)
    assert torch.equal(full, plain)


def test_greedy_keeps_processors_and_prompt_rows_drop_them():
    spec = SamplingSpec.from_params({"temperature": 0.0, "top_k": 3, "logit_bias": {1: 2.0},
                                     "allowed_token_ids": [1, 2], "min_tokens": 2, "stop_token_ids": [2]},
                                    eos_token_ids=[0])
    assert spec.greedy and spec.top_k == -1 and spec.logit_bias == ((1, 2.0),)
    assert spec.allowed_token_ids == (1, 2) and spec.min_tokens_ids == (0, 2)
    prompt = spec.for_prompt()
    assert not prompt.has_processors and not prompt.has_penalties and prompt.temperature == 0.0


@pytest.mark.parametrize("k, p", [(8, 0.9), (50, 1.0), (2048, 0.9), (2048, 1.0)])
@pytest.mark.parametrize("rows", ["all_nan", "one_nan_row", "some_nan_entries"])
def test_nan_rows_get_v0s_result_instead_of_an_error(rows, k, p):
    """A broken model (e.g. weights left uninitialised by a partial reload) gives NaN logits: V0's
    sort returned NaN for such rows; the partial paths must do the same, not raise (an exception
    here kills the engine step)."""
    x = torch.randn(3, 2048, generator=torch.Generator().manual_seed(0))
    if rows == "all_nan":
        x[:] = float("nan")
    elif rows == "one_nan_row":
        x[1] = float("nan")
    else:
        x[1, :5] = float("nan")
    ks, ps = torch.full((3,), k), torch.full((3,), p)
    out, ref = apply_top_k_top_p(x, ks, ps), apply_top_k_top_p_sorted(x, ks, ps)
    assert torch.equal(out.nan_to_num(1.5), ref.nan_to_num(1.5))
    spec = SamplingSpec.from_params({"temperature": 0.7, "top_k": min(k, 2047), "top_p": p})
    assert v0_processed_logprobs(x, [spec] * 3).shape == x.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_topk_values_by_blocks_equal_torch_topk(dtype):
    """The two-pass top-k gives torch.topk's values; its indices hold those values (rows with ties,
    -inf, a NaN, the largest values packed into one block, a vocabulary not a multiple of 64)."""
    from vllm_compat.v0_sampling import topk_values

    g = torch.Generator().manual_seed(5)
    for vocab in (32000, 32003, 5000):
        x = torch.randn(12, vocab, generator=g).to(dtype)
        x[1] = (x[1] * 2).round()  # many ties
        x[2, :3000] = -INF
        x[3, 77] = float("nan")
        x[4, 128:192] = 50.0 + torch.arange(64, dtype=dtype)  # the top values all in one block
        x[5, -3:] = 99.0  # ... or in the tail
        if dtype == torch.float64:  # block maxima equal in fp32, not in fp64
            x[6, 40] = 60.0
            x[6, 1000:1060] = 60.0 + 1e-12 * torch.arange(1, 61, dtype=dtype)
        for k in (1, 6, 21, 51):
            vals, idx = topk_values(x, k)
            want = x.topk(k, dim=-1).values
            assert torch.allclose(vals, want, rtol=0, atol=0, equal_nan=True), (vocab, k)
            assert torch.allclose(x.gather(1, idx), vals, rtol=0, atol=0, equal_nan=True)
            assert bool((idx.sort(-1).values.diff(dim=-1) > 0).all())  # distinct positions
