"""`vllm-compat rl-parity` end to end on real engines: stock V1 and V1+shim, 4 GSPO steps.

The checks that matter: the shim's mismatch KL between trainer and rollout logprobs is far
below stock V1's, and the same absolute limit the shim passes fails for stock (so the test
can fail); and with the task's LoRA-style updates (q_proj and v_proj only) stock V1's native
reload breaks the engine (NaN logprobs from the first update on) while the shim's does not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KEYS = ("mismatch_kl", "clip_fraction", "abs_log_ratio", "entropy", "reward")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("matplotlib")
    tmp = tmp_path_factory.mktemp("rl")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("VLLM_COMPAT", None)
    proc = subprocess.run([sys.executable, "-m", "vllm_compat.tools.cli", "rl-parity", "--steps", "4",
                           "--arms", "stock,shim,shim-support-replay", "--seeds", "0", "--json", str(tmp / "r.json"),
                           "--plot", str(tmp / "r.png")], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc, json.loads((tmp / "r.json").read_text()), tmp / "r.png"


def test_schema(report):
    proc, doc, png = report
    assert set(doc["arms"]) == {"stock", "shim", "shim-support-replay"}
    assert doc["trained"] == ["self_attn.q_proj.weight", "self_attn.v_proj.weight"]
    for arm, records in doc["arms"].items():
        assert len(records) == 4
        for k, rec in enumerate(records):
            assert rec["step"] == k
            # Stock's engine is broken from step 1 on (below): no sequence with finite logprobs, no
            # mismatch metrics (null, not a made-up number); reward and entropy are still defined.
            for key in KEYS if arm != "stock" or k == 0 else ("entropy", "reward"):
                assert isinstance(rec[key], float), (arm, k, key)
            assert 0.0 <= rec["reward"] <= 1.0
            assert rec["clip_fraction"] is None or 0.0 <= rec["clip_fraction"] <= 1.0
        # From step 1 on every request is mid-generation when the new weights land.
        assert all(n == 16 for rec in records[1:] for n in rec["in_flight"])
    assert all(v in (True, False, None) for v in doc["gates"].values())
    assert doc["gates"]["shim_mismatch_kl_below_limit"] is True
    assert doc["gates"]["stock_mismatch_kl_far_above_shim"] is True
    assert doc["gates"]["shim_inside_v0_band:mismatch_kl"] is None  # no V0 arm: not evaluated, no band made up
    assert png.stat().st_size > 10_000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "not evaluated" in proc.stdout


def test_shim_mismatch_far_below_stock(report):
    _, doc, _ = report
    from vllm_compat.golden.rl_parity import SHIM_KL_LIMIT

    def worst(arm):
        return max(rec["mismatch_kl"] for rec in doc["arms"][arm] if rec["mismatch_kl"] is not None)

    # The same check on both arms: the shim passes it, stock V1 fails it (at step 0, before any
    # update: raw logprobs, no temperature, no top-k/top-p).
    assert worst("shim") <= SHIM_KL_LIMIT
    stock0 = doc["arms"]["stock"][0]
    assert stock0["mismatch_kl"] > SHIM_KL_LIMIT and stock0["mismatch_kl"] > 10 * worst("shim")
    # Stock's raw logprobs also push GSPO's ratio outside the clip.
    assert stock0["clip_fraction"] > 0.25 and all(r["clip_fraction"] == 0.0 for r in doc["arms"]["shim"])


def test_partial_update_breaks_native_reload_only(report):
    """The update sends q_proj and v_proj only; vLLM's native reload rebuilds the fused qkv_proj and
    leaves its k rows uninitialised: NaN logprobs after the first in-flight update (step 1: the
    tokens after the update; later steps: all). The shim loads the shards in place: all finite."""
    _, doc, _ = report
    shim, stock = doc["arms"]["shim"], doc["arms"]["stock"]
    assert all(rec["nonfinite_logprobs"] == 0.0 and rec["broken"] == [False] for rec in shim)
    assert stock[0]["nonfinite_logprobs"] == 0.0 and stock[0]["broken"] == [False]
    assert all(rec["nonfinite_logprobs"] > 0.0 and rec["broken"] == [True] for rec in stock[1:])
    assert stock[-1]["nonfinite_logprobs"] == 1.0


def test_support_replay_removes_the_trainers_boundary_flips(report):
    """The shim's trainer re-decides top-k/top-p on its own (HF bf16) logits and, at some positions,
    drops the token the engine sampled (mask_flips; the task's trainer then keeps it by hand, a real
    trainer would get -inf). With support replay it uses the engine's kept sets: no flip, finite."""
    _, doc, _ = report
    shim, replay = doc["arms"]["shim"], doc["arms"]["shim-support-replay"]
    assert sum(rec["per_seed"]["0"]["mask_flips"] for rec in shim) > 0  # seed 0: 9 in 4 steps (2026-12-01)
    assert all(rec["per_seed"]["0"]["mask_flips"] == 0 for rec in replay)
    assert all(rec["nonfinite_logprobs"] == 0.0 and rec["mismatch_kl"] is not None for rec in replay)


def _runs(values_by_seed: list[list[float]], metric="mismatch_kl"):
    base = {"mismatch_kl": 1e-3, "clip_fraction": 0.0, "abs_log_ratio": 0.03, "entropy": 1.8, "reward": 0.4}
    return [{"seed": s, "records": [dict(base, **{metric: v}) for v in vals]} for s, vals in enumerate(values_by_seed)]


def test_gates_band_rules():
    """The gate arithmetic on made-up curves (no engine): V0's band, one-sided for mismatch metrics,
    not evaluated (None) without a V0 arm."""
    from vllm_compat.golden.rl_parity import gates

    v0 = _runs([[1e-3, 2e-3], [2e-3, 3e-3]])
    shim_low = _runs([[1e-4, 1e-4]])     # below V0's band: fine for a mismatch metric
    shim_high = _runs([[1e-3, 9e-3]])    # above V0's max + slack at step 1
    stock = _runs([[0.03, 0.04]])
    g, _ = gates({"v0": v0, "shim": shim_low, "stock": stock})
    assert g["shim_inside_v0_band:mismatch_kl"] is True and g["stock_leaves_v0_band:mismatch_kl"] is True
    g, _ = gates({"v0": v0, "shim": shim_high, "stock": stock})
    assert g["shim_inside_v0_band:mismatch_kl"] is False
    g, details = gates({"shim": shim_low, "stock": stock, "shim-minus-defaults": _runs([[1e-4, 2e-4]])})
    assert g["shim_inside_v0_band:reward"] is None and "not evaluated" in details["shim_inside_v0_band:reward"]
    assert g["stock_mismatch_kl_far_above_shim"] is True and g["ablation_moves:defaults:mismatch_kl"] is False


def test_gates_broken_and_paired():
    """Broken steps (NaN logprobs, a dead engine) and the paired lm_head_fp32 gate, on made-up curves."""
    from vllm_compat.golden.rl_parity import PAIRED_FRACTION, gates

    shim = _runs([[1e-3] * 10, [2e-3] * 10])
    v0 = _runs([[1e-3] * 10, [3e-3] * 10])
    # Above the shim at the same (seed, step) in 17 of 20 pairs, though its seed means overlap the shim's.
    head = _runs([[1.2e-3] * 9 + [0.9e-3], [2.4e-3] * 8 + [1.9e-3] * 2])
    g, d = gates({"shim": shim, "shim-minus-lm_head_fp32": head})
    assert 17 / 20 >= PAIRED_FRACTION and g["ablation_moves_paired:lm_head_fp32:mismatch_kl"] is True, d
    flat = _runs([[1e-3] * 10, [2e-3] * 10])
    g, _ = gates({"shim": shim, "shim-minus-lm_head_fp32": flat})  # equal everywhere: never above
    assert g["ablation_moves_paired:lm_head_fp32:mismatch_kl"] is False
    # Engines that returned NaN logprobs (seed 1, step 3: its metrics null there) or died (seed 0,
    # from step 5) count as moved, seed by seed; the same break in the shim fails the shim's gates.
    dead = _runs([[1e-3] * 10, [2e-3] * 10])
    dead[1]["records"][3].update(mismatch_kl=None, nonfinite_logprobs=0.5)
    g, d = gates({"shim": shim, "shim-minus-weight_updates": dead})
    assert g["ablation_moves:weight_updates:mismatch_kl"] is False  # seed 0 neither broke nor moved
    for rec in dead[0]["records"][5:]:
        rec.update({k: None for k in rec}, engine_failed="IndexError: ...")
    g, d = gates({"shim": shim, "shim-minus-weight_updates": dead})
    why = d["ablation_moves:weight_updates:mismatch_kl"]
    assert g["ablation_moves:weight_updates:mismatch_kl"] is True, why
    assert "seed 0 broke at step 5 (engine dead from step 5)" in why and "seed 1 broke at step 3" in why
    g, _ = gates({"shim": shim, "shim-minus-weight_updates": _runs([[1e-3] * 10, [2e-3] * 10])})
    assert g["ablation_moves:weight_updates:mismatch_kl"] is False
    g, d = gates({"v0": v0, "shim": dead})
    assert g["shim_mismatch_kl_below_limit"] is False and g["shim_inside_v0_band:reward"] is False
