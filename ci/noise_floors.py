"""Print the figures that justify verify's thresholds, from the committed fixtures alone
(no engine): V0 vs the trainer reference per model and head, the fp32 head's effect on V0,
and how often each filter scenario actually cut probability mass in V0's runs.

Run: python ci/noise_floors.py   (the engine-vs-engine floor, stock V1 vs V0 where raw ==
processed, comes from `vllm-compat verify` rows greedy and temp_1.0.)
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


if __name__ == "__main__":
    main()
