"""Report how peaky the tiny models are and how well bf16 is conditioned.

Run:  python ci/model_stats.py   (needs torch + transformers; uses HF only, no vLLM)

For each model: sample 8 prompts x 32 tokens at T=1 (fp32), and at every step report
  * the probability mass each filter of the golden scenarios removes, and the fraction
    of steps where it removes at least 1 % of the mass ("cuts");
  * for bf16 models: max |logit(bf16 model) - logit(fp32 upcast)| on the same sequences.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from vllm_compat.v0_sampling import apply_top_k_top_p, apply_min_p  # noqa: E402

MODELS = ["llama-fp32", "llama-bf16", "qwen2-tied-bf16"]
FILTERS = {"top_k=8": dict(top_k=8), "top_p=0.8": dict(top_p=0.8), "min_p=0.1": dict(min_p=0.1)}


def main() -> None:
    g = torch.Generator().manual_seed(0)
    for name in MODELS:
        path = ROOT / "tests/golden/models" / name
        m32 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = torch.randint(3, 1024, (8, 6), generator=g)
        with torch.no_grad():
            for _ in range(32):
                probs = torch.softmax(m32(ids).logits[:, -1].float(), -1)
                ids = torch.cat([ids, torch.multinomial(probs, 1, generator=g)], 1)
            logits = m32(ids).logits[:, 5:-1].reshape(-1, 1024).float()
        probs = torch.softmax(logits, -1)
        ent = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
        line = [f"{name}: top1 mean {probs.max(-1).values.mean():.2f}, entropy mean {ent.mean():.2f} nats,"
                f" distinct sampled tokens {ids[:, 6:].unique().numel()}/{ids[:, 6:].numel()}"]
        for label, kw in FILTERS.items():
            if "min_p" in kw:
                kept = apply_min_p(logits.clone(), torch.full((len(logits),), kw["min_p"]))
            else:
                kept = apply_top_k_top_p(logits.clone(),
                                         torch.full((len(logits),), kw.get("top_k", 1024)),
                                         torch.full((len(logits),), kw.get("top_p", 1.0)))
            removed = (probs * torch.isinf(kept)).sum(-1)
            line.append(f"  {label}: cuts >=1% mass on {(removed >= 0.01).float().mean():.0%} of steps,"
                        f" mean mass removed {removed.mean():.2f}, mean kept {(~torch.isinf(kept)).sum(-1).float().mean():.1f}")
        if "bf16" in name:
            mb = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
            with torch.no_grad():
                lb = mb(ids).logits[:, 5:-1].reshape(-1, 1024).float()
            d = (lb - logits).abs()
            line.append(f"  bf16 vs fp32 logits: max {d.max():.3f}, mean {d.mean():.4f} (logit std {logits.std():.2f})")
        print("\n".join(line))


if __name__ == "__main__":
    main()
