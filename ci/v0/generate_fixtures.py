"""Generate the golden V0 fixtures with the real vLLM 0.8.5 V0 engine (CPU).

Run inside the V0 environment made by ci/v0/install.sh (see ci/v0/generate.sh, which sets
the environment variables and checks reproducibility):
    VLLM_USE_V1=0 VLLM_CPU_KVCACHE_SPACE=1 python ci/v0/generate_fixtures.py [--out DIR] [MODEL ...]

Writes one file per (model, reference) to tests/golden/fixtures/<model>.<reference>.json:
  v0            stock V0 (lm_head in the model dtype, sampling parameters in the logits dtype)
  v0_fp32_head  V0 with the final projection computed in fp32 (the migration report's V0)
plus, in every file, the trainer-side reference (HF transformers, fp32 head) on V0's
sequences. The in-flight update scenarios load the second weight set between two engine
steps with ``model.load_weights`` and no cache reset, as V0-era RL code did.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vllm_compat.golden import fixtures as golden, scenarios  # noqa: E402
from vllm_compat.golden.runner import run_scenario  # noqa: E402
from vllm_compat.golden.trainer_reference import TrainerReference  # noqa: E402

MODELS_DIR = ROOT / "tests/golden/models"
ENGINE_ARGS = dict(device="cpu", skip_tokenizer_init=True, seed=0, max_model_len=512,
                   enable_prefix_caching=False, max_logprobs=20)


def use_fp32_head() -> None:
    """Compute V0's lm_head projection in fp32 (tied embeddings included: the weight is
    upcast on the fly, the shared embedding tensor is untouched). The sampler then sees fp32
    logits, so it also materialises the sampling parameters in fp32 (exact values)."""
    import torch
    import torch.nn.functional as F
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    def apply_fp32(self, layer, x, bias=None):
        return F.linear(x.to(torch.float32), layer.weight.to(torch.float32),
                        None if bias is None else bias.to(torch.float32))

    UnquantizedEmbeddingMethod.apply = apply_fp32


def generate(model: str, reference: str, out_dir: Path) -> Path:
    import torch
    import transformers
    import vllm
    from safetensors.torch import load_file
    from vllm import LLM

    assert os.environ.get("VLLM_USE_V1") == "0", "run with VLLM_USE_V1=0 (V0 engine)"
    if reference == "v0_fp32_head":
        use_fp32_head()
    mdir = MODELS_DIR / model
    # dtype explicitly: "auto" downcasts fp32 checkpoints to half precision.
    engine_args = dict(ENGINE_ARGS, dtype=json.loads((mdir / "config.json").read_text())["torch_dtype"])
    if (mdir / "tokenizer.json").is_file():
        # V0 checks logit_bias / allowed_token_ids against the tokenizer's vocabulary.
        engine_args["skip_tokenizer_init"] = False
    llm = LLM(model=str(mdir), **engine_args)
    assert type(llm.llm_engine).__module__ == "vllm.engine.llm_engine", "not the V0 engine"

    def load_update(name: str) -> None:
        weights = load_file(str(MODELS_DIR / name / "model.safetensors"))
        # V0 style: between two engine steps, on the (only) worker, no cache reset.
        llm.collective_rpc(lambda worker: worker.model_runner.model.load_weights(weights.items()))

    update_set = scenarios.MODELS[model]
    specs = scenarios.scenarios_for(model)
    trainer = TrainerReference(mdir)
    out = []
    for sc in specs:
        results = run_scenario(llm, sc, load_update)
        sc = dict(sc, results=results,
                  trainer=golden.encode_trainer(golden.trainer_scores(trainer, sc, results)))
        out.append(sc)
        print(f"  {model} {reference} {sc['name']}: {[c['token_ids'][:6] for r in results for c in r['completions']][:2]}")
    data = {
        "schema": golden.SCHEMA,
        "reference": reference,
        "model": {"name": model, "files": golden.model_hashes(mdir),
                  "update_weights": None if update_set is None else
                  {update_set: golden.model_hashes(MODELS_DIR / update_set)}},
        "generator": {
            "vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "engine": "V0 (VLLM_USE_V1=0)",
            "engine_args": engine_args, "lm_head": "fp32" if reference == "v0_fp32_head" else "model dtype",
            "trainer": "HF transformers, model dtype body, fp32 lm_head",
            "command": "bash ci/v0/generate.sh",
        },
        "scenarios": out,
    }
    if model in scenarios.WIDE_MODELS:
        # A subfolder: `vllm-compat verify` and the suite's all-fixture tests read only the
        # top level; the wide list is replayed with --fixtures tests/golden/fixtures/wide.
        out_dir = out_dir / scenarios.WIDE_DIR
        out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{model}.{reference}.json"
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "tests/golden/fixtures"))
    # One reference per process: the fp32-head patch must not leak into the stock run.
    ap.add_argument("--reference", choices=golden.REFERENCES, required=True)
    ap.add_argument("model", choices=list(scenarios.MODELS))
    args = ap.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    print(generate(args.model, args.reference, Path(args.out)))


if __name__ == "__main__":
    main()
