"""Pure helpers: V0's processing order, reimplemented in vllm_compat.processing."""
import math

import pytest
import torch

from vllm_compat.processing import (SamplingSpec, apply_min_p, apply_penalties, apply_top_k_top_p,
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
