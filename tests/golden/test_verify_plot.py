"""`vllm-compat verify --plot`: the real command on the tiny model (shim in this run, stock V1 in
its child process), then the PNG and the numbers behind it. The numbers must be verify's own
(each panel's max |Δ| is the row's reported maximum), stock V1 must show deltas far past the gate
where V1's meaning differs and the shim none past it; a plot of anything else fails here."""
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from vllm_compat.golden import plot
from vllm_compat.golden.runner import encode_lp

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.cpu_only  # runs verify against the CPU V0 fixtures
MODEL = "llama-fp32"
# greedy: stock V1 passes (raw == processed); temp_0.6: stock fails by nats; top_p_min_p: stock
# keeps tokens V0 masked (-inf on one side).
SCENARIOS = ["greedy", "temp_0.6", "top_p_min_p"]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("verify-plot")
    env = dict(os.environ)
    env["VLLM_COMPAT"] = "all"  # this run: the shim; its child: VLLM_COMPAT=off
    env.pop("VLLM_COMPAT_ACTIVE", None)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
    cmd = [sys.executable, "-m", "vllm_compat_cli", "verify", "--model", MODEL,
           "--plot", str(out / "verify.png"), "--plot-data", str(out / "verify.json")]
    for s in SCENARIOS:
        cmd += ["--scenario", s]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    log_file = next(line.split("logs: ", 1)[1].split(" (-v")[0] for line in proc.stdout.splitlines()
                    if line.startswith("vLLM and engine logs: "))
    return {"png": out / "verify.png", "data": plot.load_data(out / "verify.json"), "stdout": proc.stdout,
            "log": Path(log_file).read_text(errors="replace")}


def _table(stdout: str, prefix: str) -> dict:
    """verify's printed rows (this run's, or the child's relayed with ``prefix``): scenario ->
    the sampled / topk / prompt max |Δ| columns as printed."""
    rows = {}
    for line in stdout.splitlines():
        if prefix:
            if not line.startswith(prefix):
                continue
            line = line[len(prefix):]
        parts = line.split()
        if len(parts) > 8 and parts[0] == MODEL and parts[1] in SCENARIOS:
            rows[parts[1]] = dict(zip(plot.KINDS, parts[5:8]))
    return rows


@pytest.mark.engine
def test_png_is_a_legible_figure(run):
    png = run["png"]
    width, height = _png_size(png)
    assert 1000 <= width <= 4000 and 600 <= height <= 4000, (width, height)
    from PIL import Image

    with Image.open(png) as im:
        im.verify()
    with Image.open(png) as im:
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50  # drawn, not blank
    assert png.stat().st_size > 30_000
    assert "stock V1: 1/3 passed; V1+shim: 3/3 passed" in run["stdout"]
    assert run["stdout"].rstrip().endswith("3 passed, 0 failed, 0 knife-edge positions reported")
    assert "Initializing" in run["log"] or "INFO" in run["log"]  # vLLM's logs went to the file, not away
    assert "INFO" not in run["stdout"]


@pytest.mark.engine
def test_both_sides_ran_this_checkout_with_their_selection(run):
    sides = run["data"]["sides"]
    assert set(sides) == {"stock", "shim"}
    assert sides["stock"]["applied"] == []
    assert "logprobs" in sides["shim"]["applied"] and "prompt_logprobs" in sides["shim"]["applied"]
    for side in sides.values():
        assert side["package"] == str(ROOT / "vllm_compat")  # the child imported this checkout too
        assert [(r["model"], r["scenario"]) for r in side["rows"]] == [(MODEL, s) for s in SCENARIOS]
    assert (sides["stock"]["passed"], sides["shim"]["passed"]) == (1, 3)


@pytest.mark.engine
def test_plotted_deltas_are_verifys_numbers(run):
    """Each panel's max |Δ| per kind is the row's maximum (exactly) and what verify printed for
    it (this run's table for the shim, the child's relayed table for stock V1)."""
    from vllm_compat.golden.verify import _fmt

    printed = {"shim": _table(run["stdout"], ""), "stock": _table(run["log"], "[stock V1, VLLM_COMPAT=off] ")}
    for name, side in run["data"]["sides"].items():
        assert set(printed[name]) == set(SCENARIOS), name
        for row in side["rows"]:
            arrays = plot.scenario_arrays(row)
            assert arrays["all"]["delta"].size > 100
            for kind in plot.KINDS:
                d = arrays[kind]["delta"]
                plotted = float(d.max()) if d.size else 0.0
                assert plotted == plot._dec_max(row["max_abs"][kind]), (name, row["scenario"], kind)
                assert _fmt(plotted) == printed[name][row["scenario"]][kind], (name, row["scenario"], kind)


@pytest.mark.engine
def test_stock_past_the_gate_shim_within(run):
    sides = run["data"]["sides"]
    stock = {r["scenario"]: r for r in sides["stock"]["rows"]}
    shim = {r["scenario"]: r for r in sides["shim"]["rows"]}
    for s in SCENARIOS:
        d = plot.scenario_arrays(shim[s])["all"]["delta"]
        assert shim[s]["passed"] and d.max() <= shim[s]["limit"], s
    assert stock["greedy"]["passed"]
    assert plot.scenario_arrays(stock["greedy"])["all"]["delta"].max() <= stock["greedy"]["limit"]
    for s in ("temp_0.6", "top_p_min_p"):
        d = plot.scenario_arrays(stock[s])["all"]["delta"]
        assert not stock[s]["passed"]
        assert (d > 100 * stock[s]["limit"]).sum() >= 10, s  # many entries, not one outlier
    # Tokens V1 keeps and V0 masked: -inf on one side only, drawn as such (shim: none).
    a = plot.scenario_arrays(stock["top_p_min_p"])["all"]
    assert (np.isinf(a["reference"]) != np.isinf(a["engine"])).sum() > 0
    a = plot.scenario_arrays(shim["top_p_min_p"])["all"]
    assert (np.isinf(a["reference"]) != np.isinf(a["engine"])).sum() == 0


def _side(name, rows):
    return {"side": name, "applied": [] if name == "stock" else ["logprobs"], "vllm": "0.0", "package": "",
            "passed": sum(r["passed"] for r in rows), "total": len(rows), "rows": rows}


def _row(scenario, engine, reference, passed, limit=1e-4):
    d = [abs(a - b) if a != b else 0.0 for a, b in zip(engine, reference)]
    enc = [[encode_lp(x) for x in engine], [encode_lp(x) for x in reference]]
    return {"model": "m", "scenario": scenario, "dtype": "float32", "reference": "v0", "passed": passed,
            "failures": [], "limit": limit, "max_abs": {"sampled": max(d), "topk": 0.0, "prompt": 0.0},
            "pairs": {"sampled": enc, "topk": [[], []], "prompt": [[], []]}}


def test_render_edge_cases(tmp_path):
    """No engine: exact zeros, one-sided -inf, both -inf, a scenario only one side has, and the
    figure grows with the number of scenarios."""
    inf = -math.inf
    stock = [_row("a", [-1.0, -2.0, inf, -0.5], [-1.0, -2.5, -3.0, inf], False),
             _row("b", [-1.0, inf], [-1.0, inf], True)]
    shim = [_row("a", [-1.0, -2.0 + 1e-6, inf, inf], [-1.0, -2.0, inf, inf], True)]
    data = {"date": "2026-01-01", "sides": {"stock": _side("stock", stock), "shim": _side("shim", shim)}}
    a = plot.scenario_arrays(stock[0])["sampled"]
    assert list(a["delta"]) == [0.0, 0.5, math.inf, math.inf]
    assert plot.scenario_arrays(stock[1])["sampled"]["delta"].tolist() == [0.0, 0.0]
    small = plot.render(data, tmp_path / "small.png")
    assert small["scenarios"] == 2 and _png_size(tmp_path / "small.png") == (small["width"], small["height"])
    many = {"date": "x", "sides": {"stock": _side("stock", [dict(stock[0], scenario=f"s{i}") for i in range(9)])}}
    big = plot.render(many, tmp_path / "big.png")
    assert big["height"] > small["height"] + 3 * 200


def test_missing_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    from vllm_compat.tools import cli

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    with pytest.raises(plot.PlotUnavailable, match=r"pip install 'vllm-compat\[plot\]'"):
        plot.require_matplotlib()
    # The command stops before starting anything.
    assert cli.main(["verify", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install 'vllm-compat[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_no_matching_scenario_starts_no_child(tmp_path, capsys, monkeypatch):
    from vllm_compat.tools import cli

    def no_child(*a, **k):
        raise AssertionError("child process started")

    monkeypatch.setattr(plot, "run_other_side", no_child)
    assert cli.main(["verify", "--scenario", "no-such-scenario", "--plot", str(tmp_path / "x.png")]) == 2
    assert "no scenario matched" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_sides_of_the_patch_series_route():
    """`VLLM_COMPAT=off verify --engine-arg compat_preset=v0` (a patched vLLM) is the side that
    changes V1; its child runs stock V1 (no fixes, no engine arguments)."""
    assert plot.side_name([], {}) == "stock" and plot.side_label([], {}) == "stock V1"
    assert plot.side_name(["logprobs"]) == "shim" and plot.side_label(["logprobs"]) == "V1+shim"
    assert plot.side_name([], {"compat_preset": "v0"}) == "shim"
    assert plot.side_label([], {"compat_preset": "v0"}) == "V1 + compat_preset=v0"
