"""Faults in weight transports: a trainer that dies or stalls mid-broadcast must fail the
update within the configured timeout and change nothing, the engine keeps serving, and a new
trainer can join the same group; in-memory updates fall back from a small /dev/shm; broadcast
ranks stay unique across data-parallel replicas."""
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import vllm_compat
from vllm_compat.fixes.weights import transport
from vllm_compat.golden.fixtures import GOLDEN_DIR

MODELS = GOLDEN_DIR / "models"
BASE = MODELS / "llama-fp32/model.safetensors"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}
TIMEOUT = 5  # seconds, both ends; short so that a stall shows within the test
SLACK = 10  # seconds on top: engine RPCs, error handling, a loaded 2-core machine


# ---- rank arithmetic (no engine) -------------------------------------------------------

def config(world_size=1, dp=1, dp_index=0, backend=None):
    return SimpleNamespace(world_size=world_size, data_parallel_size=dp, data_parallel_rank=dp_index,
                           data_parallel_index=dp_index, distributed_executor_backend=backend)


def test_ranks_are_unique_across_data_parallel_replicas():
    client = config(world_size=2, dp=3)
    world = transport.broadcast_world_size(client)
    assert world == 1 + 3 * 2
    # each replica's workers see their own index; dense models get dp size/rank reset to 1/0
    # in every replica, data_parallel_index keeps the replica.
    ranks = [transport.broadcast_rank(SimpleNamespace(**{**vars(config(2, 1, i)), "data_parallel_rank": 0}), r)
             for i in range(3) for r in range(2)]
    assert sorted(ranks) == list(range(1, world))
    assert transport.broadcast_world_size(config()) == 2 and transport.broadcast_rank(config(), 0) == 1
    # external launcher: world_size and worker.rank already span the replicas
    ext = config(world_size=4, dp=2, dp_index=1, backend="external_launcher")
    assert transport.broadcast_world_size(ext) == 5 and transport.broadcast_rank(ext, 3) == 4
    # a config without data_parallel_index (older vLLM) uses data_parallel_rank
    old = SimpleNamespace(world_size=2, data_parallel_size=2, data_parallel_rank=1, distributed_executor_backend=None)
    assert transport.broadcast_rank(old, 1) == 4


# ---- in-memory updates and a small /dev/shm (no engine) --------------------------------

def small_update():
    return {"a": torch.ones(1 << 16), "b": torch.arange(10.0)}  # 256 KiB + 40 B


def read_back(spec):
    return load_file(spec.params["path"])


def test_small_shm_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    monkeypatch.setattr(transport, "_temp_dirs", lambda: [str(shm), str(tmp)])
    monkeypatch.setattr(transport, "_free_bytes", lambda d: 64 << 10 if d == str(shm) else 1 << 40)
    spec, cleanup = transport.file_spec(small_update())
    assert spec.params["path"].startswith(str(tmp)) and not list(shm.iterdir())
    assert torch.equal(read_back(spec)["a"], torch.ones(1 << 16))
    cleanup()
    assert not list(tmp.iterdir())


def test_write_error_falls_back(tmp_path, monkeypatch):
    """The free-space probe says yes, but the write fails (another process filled it): a real
    I/O error from safetensors, made with a file-size limit, must fall back too."""
    import resource

    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    monkeypatch.setattr(transport, "_temp_dirs", lambda: [str(shm), str(tmp)])
    real_save = transport._save_file

    def save_with_small_limit_in_shm(tensors, path):
        if not path.startswith(str(shm)):
            return real_save(tensors, path)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        old = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old[1]))
        try:
            return real_save(tensors, path)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old)
            signal.signal(signal.SIGXFSZ, old_handler)

    monkeypatch.setattr(transport, "_save_file", save_with_small_limit_in_shm)
    spec, cleanup = transport.file_spec(small_update())
    assert spec.params["path"].startswith(str(tmp)) and not list(shm.iterdir())  # no partial file left
    assert torch.equal(read_back(spec)["b"], torch.arange(10.0))
    cleanup()


def test_nothing_fits_is_a_clear_error(tmp_path, monkeypatch):
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir(), tmp.mkdir()
    monkeypatch.setattr(transport, "_temp_dirs", lambda: [str(shm), str(tmp)])
    monkeypatch.setattr(transport, "_free_bytes", lambda d: 1000)
    with pytest.raises(transport.NoSpaceForWeights, match=r"MiB needed.*shm: 0\.0 MiB free.*tmp: 0\.0 MiB free"):
        transport.file_spec(small_update())
    assert not list(shm.iterdir()) and not list(tmp.iterdir())


# ---- the process group's timeout (no engine) -------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_group_timeout_reaches_the_collectives():
    """Rank 0 joins and never sends: rank 1's broadcast must fail after the group's timeout, not
    torch's default (30 min for gloo; vLLM 0.18's helper would drop ours)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo
    from torch.distributed.rendezvous import rendezvous

    port, groups = free_port(), {}

    def trainer():  # plain torch, so that only rank 1 goes through vLLM (its suppress_stdout is not thread-safe)
        init_method = f"tcp://127.0.0.1:{port}"
        store, _, _ = next(rendezvous(init_method, 0, 2, timeout=timedelta(seconds=60)))
        groups[0] = ProcessGroupGloo(PrefixStore(init_method, store), 0, 2, timedelta(seconds=60))

    threads = [threading.Thread(target=trainer), threading.Thread(target=lambda: groups.__setitem__(
        1, transport._new_group("127.0.0.1", port, 1, 2, "gloo", timedelta(seconds=2))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(groups) == {0, 1}
    failed = []

    def receive():
        t0 = time.monotonic()
        try:
            transport._broadcast(groups[1], torch.zeros(1))
        except Exception as e:
            failed.append((time.monotonic() - t0, e))

    t = threading.Thread(target=receive, daemon=True)
    t.start()
    t.join(2 + SLACK)
    assert failed, "broadcast still waiting past the 2 s timeout"
    assert 1.5 < failed[0][0] < 2 + SLACK, failed
    transport._shutdown(groups[1])


# ---- a real engine and trainer processes -----------------------------------------------

TRAINER = r"""
import os, signal, sys, time
from datetime import timedelta
import torch
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster
from vllm_compat.fixes.weights import transport

host, port, mode, timeout = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
weights = load_file(sys.argv[5]) if len(sys.argv) > 5 else None
sent = [0]
real = transport._broadcast
def counting(group, tensor):  # report progress; slow down after two buckets so the kill lands mid-broadcast
    real(group, tensor)
    sent[0] += 1
    print("COLLECTIVE", sent[0], flush=True)
    if mode == "slow" and sent[0] >= 4:  # header length, header, 2 buckets
        time.sleep(0.5)
transport._broadcast = counting
print("READY", flush=True)
bc = WeightBroadcaster(host, port, num_engine_workers=1, backend="gloo", bucket_bytes=16 << 10,
                       timeout=timedelta(seconds=timeout))
print("JOINED", flush=True)
if mode == "silent":
    time.sleep(3600)
print("SENT", bc.send(weights), flush=True)
bc.close()
"""


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    before = vllm_compat.applied()
    vllm_compat.apply()
    engine = LLM(model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512)
    yield engine
    del engine
    vllm_compat.apply(include=before)


def greedy_logprobs(llm):
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=5), use_tqdm=False)[0]
    return [{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs]


class Trainer:
    """A trainer subprocess; its stdout lines are collected by a thread (vLLM logs there too)."""

    def __init__(self, port, mode, *weights):
        self.proc = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), mode, str(TIMEOUT),
                                      *map(str, weights)], stdout=subprocess.PIPE, text=True)
        self.lines, self.cond = [], threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()

    def wait_for(self, prefix, timeout=120):
        with self.cond:
            assert self.cond.wait_for(lambda: any(l.startswith(prefix) for l in self.lines) or
                                      self.proc.poll() is not None, timeout), f"trainer: no {prefix!r}"
            assert any(l.startswith(prefix) for l in self.lines), f"trainer exited: {self.lines[-20:]}"

    def kill(self):
        self.proc.kill()
        self.proc.wait()


def join(llm, port, trainer):
    trainer.wait_for("READY")  # the engine side's join waits only TIMEOUT for the trainer's store
    return vllm_compat.join_weight_broadcast(llm, "127.0.0.1", port, timeout=timedelta(seconds=TIMEOUT),
                                             name="faults")


@pytest.mark.engine
def test_trainer_killed_mid_broadcast_changes_nothing_and_a_new_trainer_takes_over(llm):
    before = greedy_logprobs(llm)
    vllm_compat.update_weights(llm, UPDATE)
    expected = greedy_logprobs(llm)  # the update through the file transport
    vllm_compat.update_weights(llm, BASE)
    assert greedy_logprobs(llm) == before

    port = free_port()
    trainer = Trainer(port, "slow", UPDATE)
    killed = []

    def kill_after_two_buckets():
        trainer.wait_for("COLLECTIVE 4")
        trainer.proc.send_signal(signal.SIGKILL)
        killed.append(time.monotonic())

    try:
        group = join(llm, port, trainer)
        threading.Thread(target=kill_after_two_buckets, daemon=True).start()
        with pytest.raises(vllm_compat.WeightUpdateError, match="'faults'.*receive failed.*bucket") as e:
            vllm_compat.update_weights(llm, group)
        failed_after = time.monotonic() - killed[0]
    finally:
        trainer.kill()
    print(f"\nSIGKILL -> WeightUpdateError: {failed_after:.2f} s ({e.value})")
    assert failed_after < TIMEOUT + SLACK
    at, of = map(int, re.search(r"bucket (\d+) of (\d+)", str(e.value)).groups())
    assert 3 <= at < of  # the kill landed mid-broadcast, after two buckets
    assert greedy_logprobs(llm) == before  # nothing committed, and it still serves

    # The broken group fails fast and says to rejoin, instead of waiting on a dead peer.
    t0 = time.monotonic()
    with pytest.raises(vllm_compat.WeightUpdateError, match="broken.*rejoin"):
        vllm_compat.update_weights(llm, group)
    assert time.monotonic() - t0 < 5
    assert greedy_logprobs(llm) == before

    # A new trainer process joins the same group name on a new port; a complete update
    # gives exactly what the file transport gives.
    port = free_port()
    trainer = Trainer(port, "fast", UPDATE)
    try:
        group = join(llm, port, trainer)
        result = vllm_compat.update_weights(llm, group)
        trainer.wait_for("SENT")
    finally:
        trainer.kill()
    assert result.tensors == len(load_file(str(UPDATE)))
    assert greedy_logprobs(llm) == expected
    vllm_compat.update_weights(llm, BASE)
    assert greedy_logprobs(llm) == before


@pytest.mark.engine
def test_silent_trainer_fails_within_the_timeout(llm):
    before = greedy_logprobs(llm)
    port = free_port()
    trainer = Trainer(port, "silent")
    try:
        group = join(llm, port, trainer)
        trainer.wait_for("JOINED")
        t0 = time.monotonic()
        with pytest.raises(vllm_compat.WeightUpdateError, match="'faults'.*receive failed.*the header"):
            vllm_compat.update_weights(llm, group)
        elapsed = time.monotonic() - t0
        # A timed-out group is out of step with its trainer (which may still send later): the
        # next update must not wait another timeout, or read the late data as a header.
        t0 = time.monotonic()
        with pytest.raises(vllm_compat.WeightUpdateError, match="broken.*rejoin"):
            vllm_compat.update_weights(llm, group)
        again = time.monotonic() - t0
    finally:
        trainer.kill()
    print(f"\nsilent trainer -> WeightUpdateError: {elapsed:.2f} s, then {again:.2f} s")
    assert TIMEOUT * 0.8 < elapsed < TIMEOUT + SLACK  # it was the configured timeout that fired
    assert again < 2
    assert greedy_logprobs(llm) == before
