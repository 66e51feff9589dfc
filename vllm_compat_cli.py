"""Console script ``vllm-compat`` (``vllm_compat.tools.cli``). Outside the package on purpose:
``import vllm_compat`` applies the fixes, strictly, and refuses a vLLM release with no recorded
green verify run (``vllm_compat.versions.VERIFIED``). ``verify`` is how a release gets that
record and ``status`` reports it, so for these two commands this sets VLLM_COMPAT_UNVERIFIED=warn
(unless set) before the package is imported: a warning instead of the refusal."""
import os
import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] in ("verify", "status"):
        os.environ.setdefault("VLLM_COMPAT_UNVERIFIED", "warn")
    from vllm_compat.tools.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
