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
from vllm_compat import transport
from vllm_compat.golden import GOLDEN_DIR

MODELS = GOLDEN_DIR / "models"
BASE = MODELS / "llama-fp32/model.safetensors"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}
TIMEOUT = 5  # seconds, both ends; short so that a stall shows within the test
SLACK = 10  # seconds on top: engine RPCs, error handling, a loaded 2-core machine


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
