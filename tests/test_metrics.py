"""Pure helpers: comparison metrics of vllm_compat.golden."""
import math

from vllm_compat import golden


def res(tokens, positions, prompt=None):
    return {"prompt_logprobs": prompt,
            "completions": [{"index": 0, "token_ids": tokens, "logprobs": positions}]}


def test_abs_diff_and_k3():
    assert golden.abs_diff(-math.inf, -math.inf) == 0.0
    assert golden.abs_diff(-math.inf, -1.0) == math.inf
    assert golden.k3(-1.0, -1.0) == 0.0
    assert math.isclose(golden.k3(math.log(0.5), 0.0), (0.5 - 1) - math.log(0.5))
    assert golden.k3(-math.inf, -1.0) == math.inf


def test_identical_results_compare_clean():
    pos = [[[1, -0.1, 1], [2, -2.5, 2], [3, "-inf", 3]]]
    r = res([1], pos, prompt=[None, [[4, -1.0, 1]]])
    m = golden.compare_to_reference([r], [r])
    assert m["sampled_max_abs"] == m["topk_max_abs"] == m["prompt_max_abs"] == 0.0
    assert m["mask_agreement"] == m["rank_agreement"] == m["token_agreement"] == 1.0
    assert m["k3"] == 0.0


def test_differences_are_measured_per_kind():
    mine = res([1, 5], [[[1, -0.2, 1], [2, -2.0, 2]], [[5, -0.1, 1]]], prompt=[None, [[4, -1.5, 1]]])
    ref = res([1, 5], [[[1, -0.1, 1], [2, "-inf", 2]], [[5, -0.1, 1]]], prompt=[None, [[4, -1.0, 1]]])
    m = golden.compare_to_reference([mine], [ref])
    assert math.isclose(m["sampled_max_abs"], 0.1, abs_tol=1e-12)
    assert m["topk_max_abs"] == math.inf  # finite vs -inf: a masking disagreement
    assert math.isclose(m["prompt_max_abs"], 0.5)
    assert m["mask_agreement"] < 1.0


def test_comparison_stops_after_first_divergence():
    mine = res([1, 7, 9], [[[1, -0.1, 1]], [[7, -0.5, 1]], [[9, -9.0, 1]]])
    ref = res([1, 8, 9], [[[1, -0.1, 1]], [[8, -0.3, 1]], [[9, -0.1, 1]]])
    m = golden.compare_to_reference([mine], [ref])
    assert m["compared_positions"] == 2 and m["token_agreement"] == 1 / 3
    assert m["sampled_max_abs"] == 0.0  # position 2 (other context) is not compared


def test_compare_to_trainer():
    r = res([3], [[[3, -0.5, 1]]], prompt=[None, [[4, -1.0, 1]]])
    tr = [{"prompt_tokens": [0, 4], "prompt": {"processed": [None, -1.25]},
           "completions": [{"processed": [-0.5]}]}]
    m = golden.compare_to_trainer([r], tr, "processed")
    assert m["sampled_max_abs"] == 0.0 and math.isclose(m["prompt_max_abs"], 0.25) and m["k3"] == 0.0
