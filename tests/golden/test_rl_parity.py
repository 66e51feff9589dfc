"""`vllm-compat rl-parity` end to end on real engines: stock V1 and V1+shim, 4 GSPO steps.

The check that matters: the shim's mismatch KL between trainer and rollout logprobs is far
below stock V1's, and the same absolute limit the shim passes fails for stock (so the test
can fail)."""
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
                           "--arms", "stock,shim", "--seeds", "0", "--json", str(tmp / "r.json"),
                           "--plot", str(tmp / "r.png")], env=env, cwd=tmp, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode in (0, 1), proc.stdout + proc.stderr
    return proc, json.loads((tmp / "r.json").read_text()), tmp / "r.png"


def test_schema(report):
    proc, doc, png = report
    assert set(doc["arms"]) == {"stock", "shim"}
    for arm, records in doc["arms"].items():
        assert len(records) == 4
        for k, rec in enumerate(records):
            assert rec["step"] == k
            for key in KEYS:
                assert isinstance(rec[key], float), (arm, k, key)
            assert 0.0 <= rec["reward"] <= 1.0 and 0.0 <= rec["clip_fraction"] <= 1.0
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
        return max(rec["mismatch_kl"] for rec in doc["arms"][arm])

    # The same check on both arms: the shim passes it, stock V1 fails it.
    assert worst("shim") <= SHIM_KL_LIMIT
    assert worst("stock") > SHIM_KL_LIMIT
    assert min(rec["mismatch_kl"] for rec in doc["arms"]["stock"]) > 10 * worst("shim")
    # Stock's raw logprobs (no temperature, no top-k/top-p) also push GSPO's ratio outside the clip.
    assert sum(r["clip_fraction"] for r in doc["arms"]["stock"]) > sum(r["clip_fraction"] for r in doc["arms"]["shim"])


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
