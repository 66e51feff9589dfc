"""Print the figures that justify verify's thresholds, from the committed fixtures alone
(no engine): V0 vs the trainer reference per model and head, the fp32 head's effect on V0,
and how often each filter scenario actually cut probability mass in V0's runs.

Run: python ci/noise_floors.py   (the engine-vs-engine floor, stock V1 vs V0 where raw ==
processed, comes from `vllm-compat verify` rows greedy and temp_1.0.)
     python ci/noise_floors.py --bf16   also the bf16 floor behind verify's bf16 gates: V0 with an
     fp32 head vs the trainer reference on V0's sequences, every list entry (HF forward passes, ~20 s).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from vllm_compat.golden import fixtures as golden  # noqa: E402

FILTER_SCENARIOS = ["top_k", "top_p", "min_p", "top_k_top_p", "top_p_min_p", "all_filters"]


def worst(metrics: list[dict], key: str) -> float:
    vals = [m[key] for m in metrics if m.get(key) is not None]
    return max(vals) if vals else float("nan")


def main() -> None:
    fixtures = {(f.model, f.reference): f for f in golden.load_all()}
    print("V0 vs trainer (processed), over all non-update scenarios:")
    for (model, ref), f in sorted(fixtures.items()):
        ms = [golden.compare_to_trainer(s["results"], golden.decode_trainer(s["trainer"]), "processed")
              for s in f.scenarios if not s.get("update")]
        print(f"  {model:<16} {ref:<13} sampled {worst(ms, 'sampled_max_abs'):.3g}  "
              f"prompt {worst(ms, 'prompt_max_abs'):.3g}  k3 {worst(ms, 'k3'):.3g}")
    print("Effect of the fp32 head on V0 (v0 vs v0_fp32_head):")
    for model in sorted({m for m, r in fixtures if r == "v0_fp32_head"}):
        a, b = fixtures[(model, "v0")], fixtures[(model, "v0_fp32_head")]
        ms = [golden.compare_to_reference(x["results"], y["results"]) for x, y in zip(a.scenarios, b.scenarios)]
        print(f"  {model:<16} sampled {worst(ms, 'sampled_max_abs'):.3g}  topk {worst(ms, 'topk_max_abs'):.3g}  "
              f"prompt {worst(ms, 'prompt_max_abs'):.3g}  k3 {worst(ms, 'k3'):.3g}")
    print("Filter scenarios: fraction of V0's sampled steps where the filter removed >= 1% of the mass")
    print("  (processed minus temperature-scaled logprob of the sampled token = -log(kept mass))")
    for (model, ref), f in sorted(fixtures.items()):
        if ref != "v0":
            continue
        cells = []
        for s in f.scenarios:
            if s["name"] not in FILTER_SCENARIOS:
                continue
            cut = n = 0
            for tr in golden.decode_trainer(s["trainer"]):
                for c in tr["completions"]:
                    for p, q in zip(c["processed"], c["scaled"]):
                        if math.isfinite(p):
                            n += 1
                            cut += (p - q) >= -math.log(0.99)
            cells.append(f"{s['name']} {cut / n:.0%}")
        print(f"  {model:<16} " + ", ".join(cells))


def trainer_as_engine(trainer, scenario: dict, reference: list[dict], late_trainer=None) -> list[dict | None]:
    """The trainer reference dressed as an engine's results on the reference's own sequences:
    for every entry of the reference's lists, the trainer's processed logprob and V0 rank of
    that token (so golden.compare_to_reference measures exactly what verify measures). Update
    scenarios: the late requests (sent after the update, computed with the new weights only)
    via ``late_trainer``; the in-flight requests, computed with two weight sets, None."""
    requests = scenario["requests"]
    late = (scenario.get("update") or {}).get("late_requests") or []
    out = []
    for i, ref in enumerate(reference):
        if scenario.get("update") and i < len(requests):
            out.append(None)
            continue
        tr = late_trainer if i >= len(requests) else trainer
        req = (requests + late)[i]
        prompt, params = req["prompt_token_ids"], req["params"]
        res = {"prompt_logprobs": None, "completions": []}
        for c in ref["completions"]:
            rows = tr.processed_rows(prompt, c["token_ids"], params, param_dtype=getattr(tr, "param_dtype", None))

            def lists(row, entries):
                return None if entries is None else [
                    [e[0], float(row[e[0]]), int((row > row[e[0]]).sum()) + 1] for e in entries]

            if res["prompt_logprobs"] is None and ref["prompt_logprobs"] is not None:
                res["prompt_logprobs"] = [None] + [lists(rows[p - 1], e) for p, e in
                                                   enumerate(ref["prompt_logprobs"]) if p > 0]
            res["completions"].append({"token_ids": c["token_ids"], "logprobs": None if c.get("logprobs") is None else
                                       [lists(rows[len(prompt) - 1 + t], e) for t, e in enumerate(c["logprobs"])]})
        out.append(res)
    return out


def finite_floor(pairs: list) -> dict:
    """Largest |Δ| per kind over entries finite on both sides, and the number of masked-set flips
    (finite on one side only: a boundary that two correct bf16 bodies put on different sides)."""
    out = {"sampled": 0.0, "topk": 0.0, "prompt": 0.0, "flips": 0}
    for kind, a, b in pairs:
        if math.isinf(a) or math.isinf(b):
            out["flips"] += math.isinf(a) != math.isinf(b)
        else:
            out[kind] = max(out[kind], abs(a - b))
    return out


def bf16_head_trainer(model_dir, weights=None):
    """The trainer reference with V0's stock bf16 head: logits F.linear in bf16 (vLLM's
    UnquantizedEmbeddingMethod), sampling parameters materialised in bf16 (V0 with bf16 logits)."""
    import torch
    import torch.nn.functional as F
    from vllm_compat.golden.trainer_reference import TrainerReference

    class BF16Head(TrainerReference):
        param_dtype = torch.bfloat16

        @torch.no_grad()
        def logits(self, token_ids):
            hidden = self.model.model(input_ids=torch.tensor([token_ids])).last_hidden_state[0]
            return F.linear(hidden, self.model.get_output_embeddings().weight)

    return BF16Head(model_dir, weights)


def bf16_floors() -> None:
    """Two correct implementations of "V0 with an fp32 head" on a bf16 model, compared exactly as
    verify compares V1 with V0: vLLM 0.8.5 V0 (fixture v0_fp32_head: vLLM's bf16 body, fp32 head,
    V0's sampler) against the trainer reference (HF transformers' bf16 body, fp32 head, V0's
    processing in vllm_compat.v0_sampling) on V0's own sequences, every entry of V0's lists.
    Maxima in T = 1 units (divided by verify's temperature scale, k3 by its square)."""
    from vllm_compat.golden import scenarios, verify
    from vllm_compat.golden.trainer_reference import TrainerReference

    models = golden.GOLDEN_DIR / "models"
    fixtures = {(f.model, f.reference): f for f in golden.load_all()}
    for model, ref_name in sorted((m, r) for m, r in fixtures if m.endswith("bf16")):
        head = "fp32" if ref_name == "v0_fp32_head" else "bf16"
        print(f"bf16 floor: V0 ({ref_name}) vs trainer (HF bf16 body, {head} head), V0's lists, T = 1 units")
        make = TrainerReference if head == "fp32" else bf16_head_trainer
        trainer = make(models / model)
        update = scenarios.MODELS.get(model)
        late = make(models / model, weights=models / update) if update else None
        worst = {"sampled": (0.0, ""), "topk": (0.0, ""), "prompt": (0.0, ""), "k3": (0.0, "")}
        flips = ranks = rank_n = 0
        for sc in fixtures[(model, ref_name)].scenarios:
            ref = sc["results"]
            mine = trainer_as_engine(trainer, sc, ref, late)
            keep = [i for i, m in enumerate(mine) if m is not None]
            pairs: list = []
            m = golden.compare_to_reference([mine[i] for i in keep], [ref[i] for i in keep], pairs=pairs)
            scale = verify.temperature_scale(sc)
            f = finite_floor(pairs)
            for kind in ("sampled", "topk", "prompt"):
                if f[kind] / scale > worst[kind][0]:
                    worst[kind] = (f[kind] / scale, sc["name"])
            if m["k3"] is not None and math.isfinite(m["k3"]) and m["k3"] / scale ** 2 > worst["k3"][0]:
                worst["k3"] = (m["k3"] / scale ** 2, sc["name"])
            flips += f["flips"]
            if m["rank_agreement"] is not None:
                ranks += 1 - m["rank_agreement"]
                rank_n += 1
            print(f"  {model:<16} {head} {sc['name']:<26} sampled {f['sampled']:.3g} topk {f['topk']:.3g} "
                  f"prompt {f['prompt']:.3g} k3 {m['k3'] if m['k3'] is None else format(m['k3'], '.3g')} "
                  f"flips {f['flips']} rank {m['rank_agreement']:.3f} tokens compared {m['compared_positions']}")
        print(f"  {model:<16} {head} WORST " + ", ".join(f"{k} {v:.3g} ({n})" for k, (v, n) in worst.items())
              + f"; masked-set flips {flips}")


if __name__ == "__main__":
    main()
    if "--bf16" in sys.argv:
        bf16_floors()
