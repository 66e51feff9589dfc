"""``vllm-compat verify``: replay the golden V0 scenarios on the installed V1 engine and
compare with every reference (V0, V0 with an fp32 head, the trainer).

The engine is created the way a user creates it (``LLM(model=..., dtype=...)``), with
vLLM's own defaults otherwise, so whatever vllm_compat changes (or not) is what gets
measured. Pass/fail uses the thresholds below; each is justified by a measured noise
floor (README, "Thresholds").
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import golden
from .runner import run_scenario

# Pass/fail limits per model dtype; None = reported but not gated. Each number sits above a
# measured noise floor between two correct implementations at T = 1 (README, "Thresholds");
# logit noise is divided by the temperature, so the max-|Δ| limits are divided by the
# scenario's lowest temperature below 1 (greedy counts as 1), and the k3 limits (k3 ~ Δ²/2)
# by its square.
#   float32: V0 vs trainer 1.3e-5, V1+shim vs V0 1.5e-5.
#   bfloat16: stock V1 vs V0 where raw == processed (greedy, T=1): max 0.44, k3 1.2e-3;
#   V1+shim vs the fp32-head V0: 0.48 on short prompts, 0.75 on the 160-token prompt of the
#   update scenario (the updated Qwen2 weights are less well conditioned). Two bf16 bodies (V0 eager vs V1 compiled, or vLLM
#   vs HF) round differently, which flips top-p/min-p boundaries and near-tied ranks, so
#   masks, ranks and the trainer comparison (HF bf16 body) cannot be exact even for V0
#   itself; they are reported only.
THRESHOLDS = {
    "float32": {"max_abs_vs_v0": 1e-4, "k3_vs_v0": 1e-8, "max_abs_vs_trainer": 1e-4,
                "k3_vs_trainer": 1e-8, "min_agreement": 1.0},
    "bfloat16": {"max_abs_vs_v0": 1.0, "k3_vs_v0": 5e-3, "max_abs_vs_trainer": None,
                 "k3_vs_trainer": None, "min_agreement": None},
}


@dataclass
class Row:
    model: str
    scenario: str
    dtype: str
    judged_reference: str
    vs: dict = field(default_factory=dict)  # reference name -> metrics
    failures: list[str] = field(default_factory=list)
    results: list[dict] = field(default_factory=list, repr=False)  # the engine's raw outputs
    # Every compared (kind, V1 logprob, judged-reference logprob) entry (golden.Tally.pairs).
    pairs: list[tuple[str, float, float]] = field(default_factory=list, repr=False)
    scale: float = 1.0  # temperature_scale of the scenario: the max-|Δ| limits are multiplied by it

    def max_abs_limit(self) -> float | None:
        limit = THRESHOLDS[self.dtype]["max_abs_vs_v0"]
        return None if limit is None else limit * self.scale

    @property
    def passed(self) -> bool:
        return not self.failures


def _dtype(model_dir: Path) -> str:
    return json.loads((model_dir / "config.json").read_text())["torch_dtype"]


def fp32_head_active(llm=None) -> bool:
    """Whether the engine computes the lm_head in fp32 (the lm_head_fp32 fix, or the patch
    series' ``lm_head_dtype="float32"``), so that the fp32-head V0 reference is the one to meet."""
    from . import registry

    if "lm_head_fp32" in registry.applied():
        return True
    model_config = getattr(getattr(llm, "llm_engine", None), "model_config", None)
    return getattr(model_config, "lm_head_dtype", None) == "float32"


def make_engine(model_dir: Path, dtype: str, engine_args: dict, **overrides):
    from vllm import LLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # else the CPU KV cache takes half the RAM
    # In-process engine core: each LLMEngine.step() is then exactly one scheduler step, so
    # "update after step k" means what it meant in V0. (A multiprocess core keeps stepping
    # on its own between client calls.) The multiprocess path has tests of its own.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # The update scenarios send a closure through collective_rpc; engine processes read this
    # at start, so it must be set before the engine exists.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    args = {k: engine_args[k] for k in ("seed", "max_model_len", "max_logprobs") if k in engine_args}
    return LLM(model=str(model_dir), dtype=dtype, skip_tokenizer_init=True, **{**args, **overrides})


def load_update(llm, weights_dir: Path) -> None:
    """With the shim: vllm_compat.update_weights (validated, V0 style); stock: vLLM's own
    in-place reload."""
    from . import registry, update_weights

    if registry.applied():
        update_weights(llm, weights_dir / "model.safetensors")
    else:
        native_load_update(llm, weights_dir)


def native_load_update(llm, weights_dir: Path) -> None:
    """Stock V1 in-place reload between two steps (what users do without the shim): vLLM's
    reload_weights where it takes tensors (0.18+); before, the model's load_weights and each
    loaded layer's post-processing. No derived-state refresh."""
    from safetensors.torch import load_file

    from . import versions

    weights = load_file(str(weights_dir / "model.safetensors"))

    def reload(worker):
        runner = worker.model_runner
        if versions.has_iterator_reload(runner):
            runner.reload_weights(weights_iterator=iter(weights.items()))
            return
        from .fixes.weights.worker import reprocess

        model = runner.get_model()
        loaded = model.load_weights(weights.items())
        reprocess(model, {n.rpartition(".")[0] for n in loaded}, runner.model_config.dtype)

    llm.collective_rpc(reload)


def temperature_scale(scenario: dict) -> float:
    """1 / (lowest temperature below 1 among the scenario's requests); greedy counts as 1."""
    reqs = scenario["requests"] + ((scenario.get("update") or {}).get("late_requests") or [])
    temps = [r["params"].get("temperature", 1.0) for r in reqs]
    lowest = min([t for t in temps if t > 0] + [1.0])
    return 1.0 / lowest


def judge(row: Row, limits: dict, scale: float = 1.0) -> None:
    """``scale`` multiplies the max-|Δ| limits and its square the k3 limits (temperature_scale)."""
    factor = {"max_abs": scale, "k3": scale * scale}
    limits = {k: (v * factor.get(k.split("_vs_")[0], 1.0) if v is not None else v) for k, v in limits.items()}

    def over(value, limit, what):
        if limit is not None and value is not None and value > limit:
            row.failures.append(f"{what} {value:.3g} > {limit:.3g}")

    ref, name = row.vs[row.judged_reference], row.judged_reference
    for key in ("sampled_max_abs", "topk_max_abs", "prompt_max_abs"):
        over(ref[key], limits["max_abs_vs_v0"], f"{key} vs {name}")
    over(ref["k3"], limits["k3_vs_v0"], f"k3 vs {name}")
    if limits["min_agreement"] is not None:
        for key in ("mask_agreement", "rank_agreement"):
            if ref[key] is not None and ref[key] < limits["min_agreement"]:
                row.failures.append(f"{key} vs {name} {ref[key]:.4f} < {limits['min_agreement']}")
    tr = row.vs.get("trainer_processed")
    if tr is not None:
        for key in ("sampled_max_abs", "prompt_max_abs"):
            over(tr[key], limits["max_abs_vs_trainer"], f"{key} vs trainer")
        over(tr["k3"], limits["k3_vs_trainer"], "k3 vs trainer")


def verify(fixtures_dir: Path, models_dir: Path, only_models=None, only_scenarios=None, log=print,
           load=None, **engine_overrides) -> list[Row]:
    """Replay the fixtures' scenarios; ``engine_overrides`` go to ``LLM(...)`` (e.g.
    tensor_parallel_size); ``load(llm, weights_dir)`` replaces ``load_update``."""
    fixtures = golden.load_all(fixtures_dir, models_dir)
    by_model: dict[str, dict[str, golden.Fixture]] = {}
    for f in fixtures:
        by_model.setdefault(f.model, {})[f.reference] = f
    rows: list[Row] = []
    for model, refs in sorted(by_model.items()):
        if only_models and model not in only_models:
            continue
        mdir = models_dir / model
        llm = make_engine(mdir, _dtype(mdir), refs["v0"].data["generator"]["engine_args"], **engine_overrides)
        rows += verify_on(llm, model, refs, models_dir, only_scenarios, log, load)
        del llm
        import gc

        gc.collect()
    return rows


def selected(fixtures_dir: Path, models_dir: Path, only_models=None, only_scenarios=None) -> list[tuple[str, str]]:
    """The (model, scenario) pairs ``verify`` would run, without starting an engine."""
    return [(f.model, sc["name"]) for f in golden.load_all(fixtures_dir, models_dir) if f.reference == "v0"
            if not only_models or f.model in only_models
            for sc in f.scenarios if not only_scenarios or sc["name"] in only_scenarios]


def verify_on(llm, model: str, refs: dict, models_dir: Path, only_scenarios=None, log=print, load=None) -> list[Row]:
    """Replay one model's scenarios on an engine the caller made (``make_engine``)."""
    from .trainer_reference import TrainerReference

    mdir = models_dir / model
    dtype = _dtype(mdir)
    judged = "v0_fp32_head" if fp32_head_active(llm) and "v0_fp32_head" in refs else "v0"
    load = load or load_update
    trainer = TrainerReference(mdir)
    rows = []
    for sc in refs["v0"].scenarios:
        if only_scenarios and sc["name"] not in only_scenarios:
            continue
        results = run_scenario(llm, sc, lambda name: load(llm, models_dir / name))
        row = Row(model, sc["name"], dtype, judged, results=results, scale=temperature_scale(sc))
        for ref_name, fx in refs.items():
            ref_sc = next(s for s in fx.scenarios if s["name"] == sc["name"])
            row.vs[ref_name] = golden.compare_to_reference(results, ref_sc["results"],
                                                           pairs=row.pairs if ref_name == judged else None)
        if not sc.get("update"):
            scores = golden.trainer_scores(trainer, sc, results)
            row.vs["trainer_processed"] = golden.compare_to_trainer(results, scores, "processed")
            row.vs["trainer_scaled"] = golden.compare_to_trainer(results, scores, "scaled")
        judge(row, THRESHOLDS[dtype], row.scale)
        rows.append(row)
        log(format_row(row))
    return rows


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (math.isinf(x) or x >= 1e3):
        return "inf" if math.isinf(x) else f"{x:.0f}"
    return f"{x:.2g}" if isinstance(x, float) else str(x)


HEADER = (f"{'model':<16} {'scenario':<26} {'ref':<13} {'tokens':>6} {'sampled':>8} {'topk':>8} {'prompt':>8} "
          f"{'mask':>5} {'rank':>5} {'k3_v0':>8} {'trainer':>8} {'k3_tr':>8}  result")


def format_row(row: Row) -> str:
    r = row.vs[row.judged_reference]
    tr = row.vs.get("trainer_processed") or {}
    res = "ok" if row.passed else "FAIL: " + "; ".join(row.failures)
    return (f"{row.model:<16} {row.scenario:<26} {row.judged_reference:<13} {_fmt(r['token_agreement']):>6} "
            f"{_fmt(r['sampled_max_abs']):>8} {_fmt(r['topk_max_abs']):>8} {_fmt(r['prompt_max_abs']):>8} "
            f"{_fmt(r['mask_agreement']):>5} {_fmt(r['rank_agreement']):>5} {_fmt(r['k3']):>8} "
            f"{_fmt(tr.get('sampled_max_abs')):>8} {_fmt(tr.get('k3')):>8}  {res}")


def to_json(rows: list[Row]) -> dict:
    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {"thresholds": THRESHOLDS,
            "passed": all(r.passed for r in rows),
            "rows": [{"model": r.model, "scenario": r.scenario, "dtype": r.dtype,
                      "judged_reference": r.judged_reference, "passed": r.passed, "failures": r.failures,
                      "references": clean(r.vs)} for r in rows]}


def parse_engine_args(items: list[str]) -> dict:
    """``KEY=VALUE`` strings -> LLM(...) keyword arguments; VALUE is JSON if it parses
    (numbers, true/false, objects), else a string."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.isidentifier():
            raise SystemExit(f"vllm-compat verify: --engine-arg wants KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def main(args) -> int:
    plot_png, plot_data = getattr(args, "plot", None), getattr(args, "plot_data", None)
    if plot_png:
        from . import plot

        try:
            plot.require_matplotlib()  # before anything slow
        except plot.PlotUnavailable as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    import vllm

    quiet = args.json
    log = (lambda s: print(s, file=sys.stderr)) if quiet else print
    log(f"vLLM {vllm.__version__}; fixtures {args.fixtures}")
    engine_args = parse_engine_args(args.engine_arg or [])
    other = None
    if plot_png:
        if not selected(Path(args.fixtures), Path(args.models), args.model, args.scenario):
            print("no scenario matched", file=sys.stderr)  # before starting a child for nothing
            return 2
        # The other fix selection first, in a child process (plot.run_other_side), before this
        # process has grown by its own engines.
        try:
            other = plot.run_other_side(args, plot.side_name(_applied(), engine_args), log=log)
        except plot.ChildFailed as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    log(HEADER)
    rows = verify(Path(args.fixtures), Path(args.models), args.model, args.scenario, log=log, **engine_args)
    if not rows:
        print("no scenario matched", file=sys.stderr)
        return 2
    n_fail = sum(not r.passed for r in rows)
    if plot_png or plot_data:
        from . import plot

        this = plot.side_data(rows, _applied(), engine_args)
        sides = {this["side"]: this}
        if other is not None:
            sides[other["side"]] = other
        if plot_data:
            plot.write_data(plot_data, sides)
        if plot_png:
            info = plot.render({"date": datetime.date.today().isoformat(), "sides": sides}, plot_png)
            log(f"plot: {plot_png} ({info['width']}x{info['height']} px, {info['scenarios']} scenarios; "
                f"{plot.summary(sides)})")
    if args.json:
        print(json.dumps(to_json(rows), indent=1))
    else:
        print(f"{len(rows) - n_fail} passed, {n_fail} failed")
    return 1 if n_fail else 0


def _applied() -> list[str]:
    from . import registry

    return registry.applied()
