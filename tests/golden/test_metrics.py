"""Pure helpers: comparison metrics of vllm_compat.golden.fixtures."""
import math

from vllm_compat.golden import fixtures as golden


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


# ------------------------------------------------------------------ verify's gates (no engine)

def _row(dtype="float32", **metrics):
    from vllm_compat.golden import verify

    ok = {"sampled_max_abs": 1e-6, "topk_max_abs": 1e-6, "prompt_max_abs": 1e-6, "mask_agreement": 1.0,
          "rank_agreement": 1.0, "token_agreement": 1.0, "compared_positions": 32, "expected_positions": 32,
          "prompt_missing": 0, "logprobs_missing": 0, "edges": 0, "edge_positions": [], "k3": 1e-12}
    row = verify.Row("m", "s", dtype, "v0", vs={"v0": {**ok, **metrics}})
    verify.judge(row, verify.THRESHOLDS[dtype], row.scale)
    return row


def test_judge_passes_a_clean_row():
    assert _row().passed and _row("bfloat16").passed


def test_judge_gates_fp32_token_identity():
    row = _row(token_agreement=15 / 16, compared_positions=31)
    assert not row.passed
    assert any(f.startswith("tokens differ from v0: agreement 0.9375 < 1") for f in row.failures), row.failures
    assert any("compared 31 of v0's 32 positions" in f for f in row.failures), row.failures


def test_judge_gates_fp32_compared_positions():
    """A run that diverges at the first token compares one position per sequence."""
    row = _row(token_agreement=1.0, compared_positions=2)
    assert row.failures == ["compared 2 of v0's 32 positions"]


def test_judge_bf16_reports_tokens_without_gating_them():
    assert _row("bfloat16", token_agreement=0.5, compared_positions=17).passed


def test_judge_gates_missing_logprobs_and_empty_comparisons():
    for dtype in ("float32", "bfloat16"):
        row = _row(dtype, prompt_missing=2)
        assert row.failures == ["prompt logprobs missing for 2 request(s) where v0 has them"], dtype
        assert not _row(dtype, logprobs_missing=1).passed
        assert any(f == "no position compared with v0" for f in _row(dtype, compared_positions=0).failures)


def test_missing_prompt_logprobs_are_counted_not_skipped():
    ref = res([1], [[[1, -0.1, 1]]], prompt=[None, [[4, -1.0, 1]]])
    mine = res([1], [[[1, -0.1, 1]]], prompt=None)
    m = golden.compare_to_reference([mine], [ref])
    assert m["prompt_missing"] == 1 and m["compared_positions"] == m["expected_positions"] == 1
    # V0 0.8.5 returns none for n > 1: nothing missing when the reference has none either.
    assert golden.compare_to_reference([mine], [mine])["prompt_missing"] == 0


def test_missing_sampled_logprobs_are_counted():
    ref = res([1, 2], [[[1, -0.1, 1]], [[2, -0.2, 1]]])
    mine = res([1, 2], None)
    m = golden.compare_to_reference([mine], [ref])
    assert m["logprobs_missing"] == 1 and m["compared_positions"] == 0 and m["expected_positions"] == 2


def test_first_token_divergence_compares_one_position():
    ref = res([1, 2, 3], [[[1, -0.1, 1], [9, -2.0, 2]], [[2, -0.2, 1]], [[3, -0.3, 1]]])
    mine = res([9, 2, 3], [[[1, -0.1, 1], [9, -2.0, 2]], [[2, -0.2, 1]], [[3, -0.3, 1]]])
    m = golden.compare_to_reference([mine], [ref])
    assert (m["compared_positions"], m["expected_positions"], m["token_agreement"]) == (1, 3, 0.0)
    from vllm_compat.golden import verify

    row = verify.Row("m", "s", "float32", "v0", vs={"v0": m})
    verify.judge(row, verify.THRESHOLDS["float32"])
    assert not row.passed and "compared 1 of v0's 3 positions" in row.failures


# ------------------------------------------------------------------ knife edges

def _edge_position(gap, lse_shift=0.0):
    """A top-k position: tokens 1, 2 kept on both sides, token 3 the boundary token, ``gap`` below
    token 2 in scaled logits; V1 keeps token 3, V0 masks it (its other logprobs shift by token 3's
    mass, ``lse_shift``)."""
    v1 = [[1, -0.5, 1], [2, -1.0, 2], [3, -1.0 - gap, 3]]
    v0 = [[1, -0.5 + lse_shift, 1], [2, -1.0 + lse_shift, 2], [3, "-inf", 3]]
    return v1, v0


def test_knife_edge_is_recognised_and_excluded():
    from vllm_compat.golden import verify

    floor = verify.edge_floor("float32")
    v1, v0 = _edge_position(2e-6, lse_shift=0.3)  # ~2 fp32 ulps apart; every logprob shifts by 0.3
    mine, ref = res([1], [v1]), res([1], [v0])
    assert golden.knife_edge_gap(golden.as_dict(v1), golden.as_dict(v0)) < floor
    m = golden.compare_to_reference([mine], [ref], edge_floor=floor)
    assert m["edges"] == 1 and m["edge_positions"] == [[0, 0, 0, m["edge_positions"][0][3]]]
    assert m["sampled_max_abs"] == m["topk_max_abs"] == 0.0 and m["mask_agreement"] is None
    assert m["compared_positions"] == 1  # compared (and reported), not hidden
    row = verify.Row("m", "s", "float32", "v0", vs={"v0": m})
    verify.judge(row, verify.THRESHOLDS["float32"])
    assert row.passed and verify.edges(row) == 1 and "1 knife-edge positions reported" in verify.summary_line([row])
    assert format(verify.format_row(row)).split()[10] == "1"  # the edges column
    # Without the floor (bf16, or a caller that does not ask) the same position counts in full.
    m = golden.compare_to_reference([mine], [ref])
    assert m["edges"] is None and m["mask_agreement"] < 1.0 and m["topk_max_abs"] == math.inf


def test_a_real_mask_mismatch_is_not_excused():
    from vllm_compat.golden import verify

    floor = verify.edge_floor("float32")
    v1, v0 = _edge_position(0.5, lse_shift=0.3)  # token 3 half a nat below the boundary: not noise
    m = golden.compare_to_reference([res([1], [v1])], [res([1], [v0])], edge_floor=floor)
    assert m["edges"] == 0 and m["mask_agreement"] < 1.0
    row = verify.Row("m", "s", "float32", "v0", vs={"v0": m})
    verify.judge(row, verify.THRESHOLDS["float32"])
    assert not row.passed and any(f.startswith("mask_agreement") for f in row.failures)
    assert any(f.startswith("sampled_max_abs") for f in row.failures)


def test_knife_edge_on_a_prompt_position_and_at_the_min_p_cut():
    from vllm_compat.golden import verify

    floor = verify.edge_floor("float32")
    v1, v0 = _edge_position(2e-6)
    m = golden.compare_to_reference([res([1], [[[1, -0.5, 1]]], prompt=[None, v1])],
                                    [res([1], [[[1, -0.5, 1]]], prompt=[None, v0])], edge_floor=floor)
    assert m["edges"] == 1 and m["edge_positions"][0][:3] == [0, "prompt", 1] and m["prompt_max_abs"] == 0.0
    # min-p 0.1: the cut sits at lp(top) + log(0.1); token 3 is 1e-6 above it on V1's side and
    # far (> floor) from its neighbours, so only the min-p margin makes it an edge.
    cut = -0.5 + math.log(0.1)
    v1 = [[1, -0.5, 1], [2, -1.0, 2], [3, cut + 1e-6, 3]]
    v0 = [[1, -0.4, 1], [2, -0.9, 2], [3, "-inf", 3]]
    assert golden.knife_edge_gap(golden.as_dict(v1), golden.as_dict(v0)) > floor
    assert golden.knife_edge_gap(golden.as_dict(v1), golden.as_dict(v0), min_p=0.1) < floor
    m = golden.compare_to_reference([res([1], [v1])], [res([1], [v0])], edge_floor=floor, params=[{"min_p": 0.1}])
    assert m["edges"] == 1


def test_edge_floor_follows_the_temperature_and_is_off_for_bf16():
    from vllm_compat.golden import verify

    assert verify.edge_floor("bfloat16") is None
    assert math.isclose(verify.edge_floor("float32", 1 / 0.6), verify.THRESHOLDS["float32"]["edge_floor"] / 0.6)


# ------------------------------------------------------------------ report pieces

def test_progress_bar_and_header():
    import io

    from vllm_compat.tools import cli
    from vllm_compat.golden import verify

    out = io.StringIO()
    bar = cli.Progress(4, stream=out, width=8, tty=False)
    bar("m", "a")
    bar("m", "b")
    assert out.getvalue().splitlines() == ["[........] 0/4 m a", "[##......] 1/4 m b"]
    tty = io.StringIO()
    bar = cli.Progress(2, stream=tty, width=4, tty=True)
    bar("x")
    bar.finish()
    assert tty.getvalue().startswith("\r\x1b[K[....] 0/2 x") and tty.getvalue().endswith("[####] 2/2 done\n")
    lines = verify.header_lines("0.32.0", ["logprobs"], {}, [("a", "s1"), ("b", "s1"), ("a", "s2")], "/tmp/x.log")
    assert "vLLM 0.32.0; fixes: logprobs" in lines[0]
    assert lines[1].startswith("3 scenarios on 2 model(s): a, b")
    assert lines[2] == "vLLM and engine logs: /tmp/x.log (-v to show them here)"
    assert "fixes: none (stock V1)" in verify.header_lines("0.32.0", [], {}, [("a", "s")])[0]


def test_boundary_margin_from_full_logits():
    import torch

    from vllm_compat.golden import verify

    x = torch.tensor([5.0, 4.0, 3.0, 3.0 - 2e-6, 1.0, 0.0])  # 3rd and 4th 2e-6 apart
    assert verify.boundary_margin(x, {"temperature": 1.0, "top_k": 3}) < 1e-5
    assert math.isclose(verify.boundary_margin(x, {"temperature": 1.0, "top_k": 2}), 1.0, rel_tol=1e-6)
    assert math.isclose(verify.boundary_margin(x, {"temperature": 0.5, "top_k": 2}), 2.0, rel_tol=1e-6)
    assert verify.boundary_margin(x, {"temperature": 1.0}) == math.inf
    # top-p: the mass above token 2 is exactly p (a cut right at the boundary) vs far from it.
    p = float(torch.softmax(x, 0)[:2].sum())
    assert verify.boundary_margin(x, {"temperature": 1.0, "top_p": p + 1e-7}) < 1e-5
    assert verify.boundary_margin(x, {"temperature": 1.0, "top_p": p + 0.05}) > 1e-3
    # min-p: token 1 sits at probability min_p * max.
    assert verify.boundary_margin(x, {"temperature": 1.0, "min_p": math.exp(-1.0) * (1 + 1e-7)}) < 1e-5
    assert verify.boundary_margin(x, {"temperature": 1.0, "min_p": math.exp(-1.5)}) > 0.4


def test_invisible_flip_is_an_edge_only_when_the_reference_is_on_the_boundary():
    """A flip outside the returned lists: masks agree, every logprob shifts by the flipped
    token's mass; the trainer's full logits (``boundary``) decide."""
    from vllm_compat.golden import verify

    floor = verify.edge_floor("float32")
    mine = res([1], [[[1, -0.5, 1], [2, -1.0, 2]]])
    ref = res([1], [[[1, -0.2, 1], [2, -0.7, 2]]])
    seen = []

    def on_edge(where):
        seen.append(where)
        return 2e-6

    m = golden.compare_to_reference([mine], [ref], edge_floor=floor, suspect=1e-4, boundary=on_edge)
    assert seen == [(0, 0, 0)] and m["edges"] == 1 and m["sampled_max_abs"] == 0.0
    m = golden.compare_to_reference([mine], [ref], edge_floor=floor, suspect=1e-4, boundary=lambda w: 0.5)
    assert m["edges"] == 0 and math.isclose(m["sampled_max_abs"], 0.3)
    # Within the gate: the boundary is not even asked.
    m = golden.compare_to_reference([ref], [ref], edge_floor=floor, suspect=1e-4, boundary=lambda w: 1 / 0)
    assert m["edges"] == 0


def test_trainer_boundary_scores_the_reference_sequence_at_the_right_row():
    import torch

    from vllm_compat.golden import verify

    class FakeTrainer:
        calls = []

        def logits(self, tokens):
            self.calls.append(list(tokens))
            rows = torch.tensor([[5.0, 4.0, 3.0, 1.0]]).repeat(len(tokens), 1)
            rows[len(tokens) - 1 - 1, 2] = 4.0 - 1e-6  # the row predicting the last token: a near-tie
            return rows

    sc = {"requests": [{"prompt_token_ids": [7, 8, 9], "params": {"temperature": 1.0, "top_k": 2}}]}
    ref = [{"completions": [{"token_ids": [1, 2, 3]}]}]
    trainer = FakeTrainer()
    boundary = verify.trainer_boundary(trainer, sc, ref)
    assert boundary((0, 0, 2)) < 1e-5  # row len(prompt) - 1 + 2 predicts completion token 2
    assert boundary((0, 0, 1)) == 1.0
    assert trainer.calls == [[7, 8, 9, 1, 2, 3]]  # one pass per sequence
    assert boundary((0, "prompt", 1)) == 1.0 and boundary((0, "prompt", 0)) is None
    assert verify.trainer_boundary(trainer, {**sc, "update": {"after_step": 6}}, ref)((0, 0, 2)) is None


def test_logit_ties_counts_positions_with_equal_finite_entries():
    tied = [[1, -0.5, 1], [2, -0.5, 2], [3, -2.0, 3]]
    distinct = [[1, -0.5, 1], [2, -0.6, 2], [3, "-inf", 3], [4, "-inf", 4]]  # -inf ties do not count
    single = [[1, -0.5, 1]]  # logprobs=0: nothing to compare
    r = res([1, 2, 3], [tied, distinct, single], prompt=[None, distinct, tied])
    assert golden.logit_ties([r]) == {"positions": 4, "tied": 2, "fraction": 0.5}
    assert golden.logit_ties([res([1], [single])])["fraction"] is None


def test_logit_ties_separate_the_heads_in_the_v0_fixtures():
    """The floor and the gate of verify's bf16-head signature, from V0 itself: with its bf16 head
    every scenario has tied lists at >= 10.9 % of its positions; with an fp32 head (and on the fp32
    models) no position in any scenario. The gate lies between."""
    from vllm_compat.golden.verify import THRESHOLDS

    gate = THRESHOLDS["bfloat16"]["max_tie_fraction"]
    for f in golden.load_all():
        for sc in f.scenarios:
            m = golden.logit_ties(sc["results"])
            if f.reference == "v0" and f.model.endswith("bf16"):
                assert m["fraction"] >= 0.109 > 5 * gate, (f.model, sc["name"], m)
            else:
                assert m["tied"] == 0 and m["positions"] >= 49, (f.model, f.reference, sc["name"], m)


def test_judge_gates_the_bf16_head_signature():
    from vllm_compat.golden import verify

    for fraction, passed in ((0.0, True), (0.02, True), (0.021, False), (None, True)):
        row = _row("bfloat16")
        row.failures.clear()
        row.ties = {"positions": 64, "tied": 0, "fraction": fraction}
        verify.judge(row, verify.THRESHOLDS["bfloat16"], row.scale)
        assert row.passed == passed, fraction
    assert row.failures == [] and not verify.THRESHOLDS["float32"]["max_tie_fraction"]
    row = _row("bfloat16")
    row.failures.clear()
    row.ties = {"positions": 64, "tied": 9, "fraction": 9 / 64}
    verify.judge(row, verify.THRESHOLDS["bfloat16"], row.scale)
    assert row.failures == ["bf16-head signature: exact logprob ties at 0.141 of positions > 0.02 "
                            "(V0 with an fp32 head: 0)"]
