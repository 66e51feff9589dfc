"""Recompute the stored trainer reference of golden fixtures from their own V0 sequences.

The trainer reference (``scenario["trainer"]``) is HF transformers scoring V0's recorded
tokens; it needs no V0 engine. When the trainer code learns something new (issue 13:
logit_bias, allowed_token_ids, min_tokens), this rewrites that field only, exactly as
``generate_fixtures.py`` would have written it, and leaves V0's outputs untouched:
    python ci/v0/refresh_trainer.py tests/golden/fixtures/wide/phi3-fp32.v0.json
Prints, per scenario, whether the field changed.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from vllm_compat.golden import fixtures as golden  # noqa: E402
from vllm_compat.golden.trainer_reference import TrainerReference  # noqa: E402


def refresh(path: Path) -> list[str]:
    fx = golden.load_fixture(path)  # validated: model hashes match the committed model files
    data = json.loads(path.read_text())
    trainer = TrainerReference(fx.model_dir(golden.GOLDEN_DIR / "models"))
    changed = []
    for sc in data["scenarios"]:
        # V0's results as stored, decoded the way the loader does (scored by token ids only).
        results = next(s for s in fx.scenarios if s["name"] == sc["name"])["results"]
        new = golden.encode_trainer(golden.trainer_scores(trainer, sc, results))
        if new != sc["trainer"]:
            changed.append(sc["name"])
            sc["trainer"] = new
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return changed


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        print(arg, "changed:", refresh(Path(arg)) or "nothing")
