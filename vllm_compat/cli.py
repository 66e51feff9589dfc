"""Command line: ``vllm-compat status | verify | bench``."""
from __future__ import annotations

import argparse
import os
import sys

from .golden import GOLDEN_DIR


def plugin_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value.startswith("vllm_compat_plugin") for ep in entry_points(group="vllm.general_plugins"))


def print_status(as_json: bool) -> int:
    import json

    import vllm_compat
    from vllm_compat.registry import ENV_REQUEST, FIXES

    st = vllm_compat.status()
    st["plugin_registered"] = plugin_registered()
    if as_json:
        print(json.dumps(st, indent=1))
        return 0
    print(f"vLLM {st['vllm']} ({'supported' if st['supported'] else 'NOT supported'}; "
          f"vllm-compat supports {st['supported_range']})")
    print(f"selection from {ENV_REQUEST}={os.environ.get(ENV_REQUEST, 'all')!r}; "
          f"plugin {'registered' if st['plugin_registered'] else 'NOT registered'} (vllm.general_plugins)")
    for name, fix in FIXES.items():
        state = "active" if name in st["applied"] else st["skipped"].get(name, "off")
        print(f"  {name:<16} {state:<8} {fix.summary}")
        print(f"  {'':<16} why: {fix.why}; how: {fix.how}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-compat", description="V0 rollout parity for vLLM V1")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="vLLM version, which fixes apply and why, plugin registration")
    st.add_argument("--json", action="store_true")
    v = sub.add_parser("verify", help="run the golden V0 scenarios on the installed vLLM and report parity")
    v.add_argument("--fixtures", default=str(GOLDEN_DIR / "fixtures"))
    v.add_argument("--models", default=str(GOLDEN_DIR / "models"))
    v.add_argument("--model", action="append", help="only this model (repeatable)")
    v.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    v.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    b = sub.add_parser("bench", help="side-by-side measurements printed as ratios (see vllm_compat/bench.py)")
    b.add_argument("--section", action="append", choices=["throughput", "weight_update"], help="only this section (repeatable)")
    b.add_argument("--repeats", type=int, default=3, help="runs (weight_update) / alternating rounds (throughput)")
    b.add_argument("--hidden", type=int, default=512)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--vocab", type=int, default=32000)
    b.add_argument("--workdir", help="where the benchmark model is built (default: TMPDIR/vllm-compat-bench)")
    b.add_argument("--v0-python", help="python of a vLLM 0.8.5 environment (ci/v0/install.sh) for the V0 comparison "
                                        "(default: $VLLM_COMPAT_V0_PYTHON)")
    b.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.cmd == "status":
        return print_status(args.json)
    if args.cmd == "verify":
        from .verify import main as verify_main

        return verify_main(args)
    if args.cmd == "bench":
        from .bench import main as bench_main

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
