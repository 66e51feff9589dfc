"""``vllm-compat verify --plot FILE.png``: stock V1 and V1+shim side by side, per scenario.

One side is the process's own run (whatever VLLM_COMPAT selects, the shim by default); the
other side runs in a child process (``python -m vllm_compat.tools.cli verify --plot-data``) with
the opposite selection: ``VLLM_COMPAT=off`` when this process runs the shim, ``all`` when it
runs stock V1. A child because fixes are class-level patches: one process cannot hold both
selections, and flipping them in process would also keep every engine's memory. The child
writes its side as JSON (``--plot-data``); the figure is drawn from the two sides' data, and
``--plot-data`` in the parent writes both sides, so the numbers behind the figure can be read
back (``load_data``, ``scenario_arrays``).

What is drawn is what verify judges: every entry that ``golden.compare_to_reference`` compares
against the judged reference (sampled tokens, the rest of the top-k lists, prompt logprobs),
so each panel's max |Δ| is the row's ``sampled``/``topk``/``prompt`` maximum.

matplotlib is optional (``pip install 'vllm-compat[plot]'``), imported only here, Agg only.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from .runner import decode_lp, encode_lp

SCHEMA = "vllm-compat-verify-plot/1"
KINDS = ("sampled", "topk", "prompt")
KIND_COLORS = {"sampled": "tab:purple", "topk": "tab:orange", "prompt": "tab:green"}
SIDE_COLORS = {"stock": "tab:red", "shim": "tab:blue"}
SIDE_TITLES = {"stock": "stock V1", "shim": "V1+shim"}
# Histogram range of |Δ|: exact agreement (0) is counted in the first bin, inf in the last.
DELTA_LO, DELTA_HI = 1e-9, 1e2


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


class ChildFailed(RuntimeError):
    """The child process running the other fix selection failed."""


def require_matplotlib():
    """Import matplotlib (Agg backend) or raise PlotUnavailable saying how to install it."""
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(f"vllm-compat verify --plot needs matplotlib ({e}): "
                              f"pip install 'vllm-compat[plot]'") from None
    matplotlib.use("Agg")
    return matplotlib


# ------------------------------------------------------------------------------ data

def side_name(applied: list[str], engine_args: dict | None = None) -> str:
    """"shim": the run changes V1 (fixes applied, or engine arguments such as the patch series'
    compat_preset=v0); "stock": it does not."""
    return "shim" if applied or engine_args else "stock"


def side_label(applied: list[str], engine_args: dict | None = None) -> str:
    if not applied and not engine_args:
        return SIDE_TITLES["stock"]
    return " + ".join(["V1+shim" if applied else "V1"] + [f"{k}={v}" for k, v in (engine_args or {}).items()])


def _describe(side: dict) -> str:
    what = f"fixes {', '.join(side['applied'])}" if side["applied"] else "no fixes"
    if side.get("engine_args"):
        what += "; engine args " + ", ".join(f"{k}={v}" for k, v in side["engine_args"].items())
    return f"{side['label']}: {what}"


def side_data(rows, applied: list[str], engine_args: dict | None = None) -> dict:
    """One side (one fix selection) of the plot from verify's rows, JSON-serialisable."""
    import vllm

    from .. import __file__ as package_file  # the vllm_compat package, as the parent checks

    out_rows = []
    for r in rows:
        pairs = {k: [[], []] for k in KINDS}
        for kind, mine, ref in r.pairs:
            pairs[kind][0].append(encode_lp(mine))
            pairs[kind][1].append(encode_lp(ref))
        ref = r.vs[r.judged_reference]
        out_rows.append({"model": r.model, "scenario": r.scenario, "dtype": r.dtype,
                         "reference": r.judged_reference, "passed": r.passed, "failures": r.failures,
                         "limit": r.max_abs_limit(),
                         "max_abs": {k: _enc_max(ref[f"{k}_max_abs"]) for k in KINDS},
                         "pairs": pairs})
    return {"side": side_name(applied, engine_args), "label": side_label(applied, engine_args),
            "applied": list(applied), "engine_args": dict(engine_args or {}), "vllm": vllm.__version__,
            "package": str(Path(package_file).resolve().parent),
            "passed": sum(r["passed"] for r in out_rows), "total": len(out_rows), "rows": out_rows}


def _enc_max(x: float) -> float | str:
    return "inf" if math.isinf(x) else x


def _dec_max(x) -> float:
    return math.inf if x == "inf" else float(x)


def write_data(path: str | Path, sides: dict) -> None:
    """``sides``: side name ("stock" / "shim") -> side_data."""
    Path(path).write_text(json.dumps({"schema": SCHEMA, "date": datetime.date.today().isoformat(),
                                      "sides": sides}))


def load_data(path: str | Path) -> dict:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a vllm-compat verify plot data file (schema {data.get('schema')!r})")
    return data


def deltas(engine, reference):
    """|engine - reference| per entry, as verify counts it (golden.abs_diff): -inf vs -inf is 0,
    -inf vs a finite value is inf."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        d = np.abs(engine - reference)
    d[engine == reference] = 0.0
    return d


def scenario_arrays(row: dict) -> dict:
    """The arrays one scenario's panels are drawn from: per kind, and "all" (concatenated),
    a dict with float64 arrays "engine", "reference" (V1 and judged-reference logprobs, -inf
    kept) and "delta" (|Δ|)."""
    import numpy as np

    out = {}
    for kind in KINDS:
        mine, ref = row["pairs"][kind]
        e = np.array([decode_lp(x) for x in mine], dtype=np.float64)
        r = np.array([decode_lp(x) for x in ref], dtype=np.float64)
        out[kind] = {"engine": e, "reference": r, "delta": deltas(e, r)}
    out["all"] = {k: np.concatenate([out[kind][k] for kind in KINDS]) for k in ("engine", "reference", "delta")}
    return out


def row_max(row: dict) -> float:
    return max(_dec_max(row["max_abs"][k]) for k in KINDS)


# ------------------------------------------------------------------------------ other side

def run_other_side(args, this_side: str, log=print) -> dict:
    """Run verify with the opposite selection in a child process; returns its side_data.
    The child's output is relayed through ``log`` with a prefix. Same vllm_compat as this
    process (its directory goes first on the child's sys.path), same python, same selection
    of models and scenarios; no --engine-arg (those belong to the side that changes V1: with
    the patch series' compat_preset=v0, the stock side is the same vLLM without it)."""
    import vllm_compat

    other = "stock" if this_side == "shim" else "shim"
    root = str(Path(vllm_compat.__file__).resolve().parent.parent)
    env = dict(os.environ)
    env.pop("VLLM_COMPAT_ACTIVE", None)  # the parent's exact selection would win over VLLM_COMPAT
    env["VLLM_COMPAT"] = "off" if other == "stock" else "all"
    with tempfile.TemporaryDirectory(prefix="vllm-compat-plot-") as tmp:
        out = Path(tmp) / "side.json"
        cmd = [sys.executable, "-c",
               "import sys; sys.path.insert(0, sys.argv.pop(1)); from vllm_compat.tools.cli import main; "
               "sys.exit(main(sys.argv[1:]))",
               root, "verify", "--fixtures", str(args.fixtures), "--models", str(args.models), "--plot-data", str(out)]
        for m in args.model or []:
            cmd += ["--model", m]
        for s in args.scenario or []:
            cmd += ["--scenario", s]
        prefix = f"[{SIDE_TITLES[other]}, VLLM_COMPAT={env['VLLM_COMPAT']}] "
        log(f"{prefix}child process for the plot: {SIDE_TITLES[other]}")
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
        for line in proc.stdout:
            log(prefix + line.rstrip("\n"))
        rc = proc.wait()
        # 0: every row passed, 1: some failed (expected of stock V1); anything else is an error.
        if rc not in (0, 1) or not out.is_file():
            raise ChildFailed(f"verify --plot: the {SIDE_TITLES[other]} child process failed (exit {rc}); "
                              f"its output is above, prefixed with {prefix.strip()}")
        side = load_data(out)["sides"][other]
    here = str(Path(vllm_compat.__file__).resolve().parent)
    if side["package"] != here:
        raise ChildFailed(f"verify --plot: the child process imported vllm_compat from {side['package']}, "
                           f"this process from {here}")
    return side


# ------------------------------------------------------------------------------ figure

def _scenario_order(sides: dict) -> list[tuple[str, str]]:
    keys = []
    for side in sides.values():
        for r in side["rows"]:
            if (r["model"], r["scenario"]) not in keys:
                keys.append((r["model"], r["scenario"]))
    return keys


def summary(sides: dict) -> str:
    return "; ".join(f"{_label(s, n)}: {s['passed']}/{s['total']} passed"
                     for n, s in sorted(sides.items(), key=lambda kv: kv[0] != "stock"))


def render(data: dict, path: str | Path, per_row: int = 2) -> dict:
    """Draw the figure from ``data`` (load_data's format) into ``path`` (PNG). Returns
    {"width": px, "height": px, "scenarios": n}."""
    require_matplotlib()
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    sides = data["sides"]
    names = [n for n in ("stock", "shim") if n in sides]
    keys = _scenario_order(sides)
    index = {n: {(r["model"], r["scenario"]): r for r in sides[n]["rows"]} for n in names}
    arrays = {n: {k: scenario_arrays(r) for k, r in index[n].items()} for n in names}

    n_rows = math.ceil(len(keys) / per_row)
    # Per scenario: one scatter per side and one |Δ| histogram; a narrow spacer between scenarios.
    group = [1.0] * len(names) + [1.25]
    widths = (group + [0.22]) * (per_row - 1) + group
    panel_in = 2.35
    width_in = panel_in * sum(widths) + 1.0
    overview_in = 3.6
    height_in = 1.9 + overview_in + 2.2 + n_rows * (panel_in + 0.75)
    fig = Figure(figsize=(width_in, height_in), dpi=90)
    FigureCanvasAgg(fig)
    top = 1 - 1.9 / height_in
    over_bottom = top - overview_in / height_in
    grid_top = over_bottom - 2.2 / height_in  # room for the overview's rotated scenario names
    vllm_versions = sorted({sides[n]["vllm"] for n in names})
    date = data.get("date") or datetime.date.today().isoformat()
    fig.suptitle(f"vllm-compat verify: V1 vs the V0 reference, per scenario   |   "
                 f"vLLM {', '.join(vllm_versions)}   |   {date}\n{summary(sides)}\n"
                 + "   |   ".join(_describe(dict(sides[n], label=_label(sides[n], n))) for n in names),
                 fontsize=15, y=1 - 0.25 / height_in, va="top")
    legend = [Line2D([], [], ls="", marker="o", color=KIND_COLORS[k], label=f"{k} logprobs") for k in KINDS]
    legend += [Line2D([], [], ls="", marker="x", color="black", label="-inf on one side only (drawn at the edge)")]
    legend += [Line2D([], [], color=SIDE_COLORS[n], lw=2, label=f"{_label(sides[n], n)} |Δ|") for n in names]
    legend += [Line2D([], [], color="black", ls="--", label="verify's gate (max |Δ|, scaled by 1/T)")]
    fig.legend(handles=legend, loc="upper center", ncol=len(legend), fontsize=10, frameon=False,
               bbox_to_anchor=(0.5, 1 - 1.25 / height_in))

    # Overview: worst |Δ| / gate for every scenario and side.
    ax = fig.add_axes((0.05, over_bottom, 0.93, top - over_bottom - 0.25 / height_in))
    x = np.arange(len(keys))
    floor, ceil = 1e-3, 1e6  # ratios outside are drawn at the edge; inf one decade above
    for n in names:
        ratio = []
        for k in keys:
            r = index[n].get(k)
            limit = r and r["limit"]
            ratio.append(np.nan if not limit else row_max(r) / limit)
        ratio = np.array(ratio, dtype=np.float64)
        shown = np.where(np.isinf(ratio), ceil * 10, np.clip(ratio, floor, ceil))
        off = -0.15 if n == "stock" else 0.15
        ax.scatter(x + off, shown, s=22, marker="o" if n == "shim" else "s", color=SIDE_COLORS[n],
                   label=f"{_label(sides[n], n)} ({sides[n]['passed']}/{sides[n]['total']} passed)", zorder=3)
    ax.axhline(1.0, color="black", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_ylim(floor / 2, ceil * 20)
    ticks = [10.0 ** e for e in range(round(math.log10(floor)), round(math.log10(ceil)) + 1)] + [ceil * 10]
    ax.set_yticks(ticks, [f"1e{round(math.log10(t))}" for t in ticks[:-1]] + ["inf"])
    ax.minorticks_off()
    ax.set_xlim(-0.7, len(keys) - 0.3)
    ax.set_xticks(x)
    ax.set_xticklabels([s for _, s in keys], rotation=90, fontsize=8)
    ax.set_ylabel("worst |Δ| / gate\n(inf at the top)", fontsize=10)
    ax.set_title("Overview: worst |Δlogprob| against the judged V0 reference, relative to verify's gate "
                 "(above the dashed line = FAIL)", fontsize=11, loc="left")
    ax.grid(axis="y", alpha=0.3)
    models = [m for m, _ in keys]
    for i, m in enumerate(models):
        if i == 0 or models[i - 1] != m:
            if i:
                ax.axvline(i - 0.5, color="grey", lw=0.8)
            ax.text(i - 0.4, floor / 1.6, m, fontsize=10, va="bottom", ha="left", color="dimgrey")
    ax.legend(loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(names), fontsize=9, frameon=False,
              borderaxespad=0.2)

    gs = fig.add_gridspec(n_rows, len(widths), width_ratios=widths, left=0.045, right=0.98,
                          top=grid_top, bottom=0.6 / height_in, hspace=0.62, wspace=0.32)
    bins = np.logspace(math.log10(DELTA_LO), math.log10(DELTA_HI), 45)
    for i, key in enumerate(keys):
        row, col = divmod(i, per_row)
        base = col * (len(group) + 1)
        per_side = {n: index[n].get(key) for n in names}
        finite = [a[f][np.isfinite(a[f])] for n in names if key in arrays[n]
                  for a in [arrays[n][key]["all"]] for f in ("engine", "reference")]
        finite = np.concatenate(finite) if finite else np.zeros(1)
        lo = float(finite.min()) if finite.size else -1.0
        hi = float(finite.max()) if finite.size else 0.0
        pad = 0.06 * max(hi - lo, 1e-3)
        edge = lo - pad  # where one-sided -inf entries are drawn
        for j, n in enumerate(names):
            ax = fig.add_subplot(gs[row, base + j])
            r = per_side[n]
            if r is None:
                ax.set_axis_off()
                continue
            a = arrays[n][key]
            for kind in reversed(KINDS):  # prompt entries are the most numerous: drawn first
                e, ref = a[kind]["engine"], a[kind]["reference"]
                ok = np.isfinite(e) & np.isfinite(ref)
                ax.scatter(ref[ok], e[ok], s=5 if kind == "prompt" else 7, alpha=0.6, color=KIND_COLORS[kind],
                           linewidths=0)
            e, ref = a["all"]["engine"], a["all"]["reference"]
            one = np.isfinite(e) != np.isfinite(ref)
            ax.scatter(np.where(np.isfinite(ref[one]), ref[one], edge), np.where(np.isfinite(e[one]), e[one], edge),
                       s=14, marker="x", color="black", linewidths=0.8)
            ax.plot([edge - pad, hi + pad], [edge - pad, hi + pad], color="grey", lw=0.6, zorder=0)
            ax.set_xlim(edge - pad, hi + pad)
            ax.set_ylim(edge - pad, hi + pad)
            ax.tick_params(labelsize=7)
            ax.set_xlabel(f"{r['reference']} logprob", fontsize=7, labelpad=1)
            if j == 0:
                ax.set_ylabel("V1 logprob", fontsize=7, labelpad=1)
            worst = row_max(r)
            verdict = "ok" if r["passed"] else "FAIL"
            ax.set_title(f"{_label(sides[n], n)}: {verdict}, max |Δ| {_g(worst)}", fontsize=8,
                         color="darkgreen" if r["passed"] else "firebrick")
            if j == 0:
                ax.text(0.0, 1.2, f"{key[0]} / {key[1]}", transform=ax.transAxes, fontsize=10,
                        fontweight="bold", va="bottom", ha="left")
            n_one = int(one.sum())
            if n_one:
                ax.text(0.97, 0.04, f"{n_one} x: -inf on one side", transform=ax.transAxes, fontsize=7,
                        ha="right")
        ax = fig.add_subplot(gs[row, base + len(names)])
        limit = None
        for n in names:
            if key not in arrays[n]:
                continue
            d = np.clip(arrays[n][key]["all"]["delta"], DELTA_LO, DELTA_HI)
            ax.hist(d, bins=bins, histtype="stepfilled" if n == "shim" else "step", alpha=0.45 if n == "shim" else 1,
                    color=SIDE_COLORS[n], lw=1.4)
            limit = limit or per_side[n]["limit"]
        if limit:
            ax.axvline(limit, color="black", ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(bottom=0.7)
        ax.set_xlim(DELTA_LO / 1.5, DELTA_HI * 1.5)
        ax.set_xticks([1e-8, 1e-6, 1e-4, 1e-2, 1e0, 1e2])
        ax.tick_params(labelsize=7)
        ax.set_xlabel("|Δ| (0 in the first bin, inf in the last)", fontsize=7, labelpad=1)
        ax.set_title("|Δlogprob| distribution", fontsize=8)
    fig.savefig(path, format="png")
    w, h = fig.canvas.get_width_height()
    return {"width": w, "height": h, "scenarios": len(keys)}


def _label(side: dict, name: str) -> str:
    return side.get("label") or SIDE_TITLES[name]


def _g(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:.2g}"
