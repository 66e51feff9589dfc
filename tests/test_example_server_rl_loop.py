"""examples/server_rl_loop.py on every CI row (the other examples run on the first row only,
tests/test_examples.py): a trainer speaking only HTTP (+ the broadcast) to a `vllm serve` it
starts, no dev mode; the example exits non-zero when a check fails."""
import pytest

from test_examples import EXAMPLES, run_example

pytestmark = pytest.mark.engine


def test_server_rl_loop():
    proc = run_example(str(EXAMPLES / "server_rl_loop.py"), "--steps", "2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "done: 2 updates over HTTP, 2 of them with requests mid-generation" in proc.stdout
