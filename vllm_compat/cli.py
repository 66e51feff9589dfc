"""Command line: ``vllm-compat verify``."""
from __future__ import annotations

import argparse
import sys

from .golden import GOLDEN_DIR


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-compat", description="V0 rollout parity for vLLM V1")
    sub = ap.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify", help="run the golden V0 scenarios on the installed vLLM and report parity")
    v.add_argument("--fixtures", default=str(GOLDEN_DIR / "fixtures"))
    v.add_argument("--models", default=str(GOLDEN_DIR / "models"))
    v.add_argument("--model", action="append", help="only this model (repeatable)")
    v.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    v.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    args = ap.parse_args(argv)
    if args.cmd == "verify":
        from .verify import main as verify_main

        return verify_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
