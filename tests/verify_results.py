"""Run verify in this process and write every row's verdict and raw engine results as JSON.

Used by test_patches.py in child processes (a patched vllm on PYTHONPATH, or the shim):
    python tests/verify_results.py OUT.json '{"compat_preset": "v0"}' [SCENARIO ...]
"""
import json
import sys

from vllm_compat.golden.fixtures import GOLDEN_DIR
from vllm_compat.golden.verify import verify


def main() -> None:
    out, engine_args, scenarios = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:] or None
    rows = verify(GOLDEN_DIR / "fixtures", GOLDEN_DIR / "models", only_scenarios=scenarios,
                  log=lambda s: print(s, flush=True), **engine_args)
    import vllm

    with open(out, "w") as f:
        json.dump({"vllm_file": vllm.__file__,
                   "rows": [{"model": r.model, "scenario": r.scenario, "judged": r.judged_reference,
                             "failures": r.failures, "results": r.results} for r in rows]}, f)


if __name__ == "__main__":
    main()
