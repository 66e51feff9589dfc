"""How new weights reach the engine's workers. A transport has two ends:

- the *client end* (the process that calls ``update_weights``) turns the user's ``weights``
  argument into a ``TransportSpec``: a transport name plus plain parameters, because the
  spec crosses process boundaries through ``collective_rpc`` (msgpack on vLLM's MP paths);
- the *worker end* (``WorkerTransport`` subclass, inside every vLLM worker) receives the
  tensors and hands them over as a ``Received`` batch, still unloaded. weight_sync then
  validates the batch and loads it, or drops it.

Built in:
- ``file``: a safetensors file or directory (an in-memory dict or (name, tensor) pairs is
  written once to a RAM-backed temp file first: tensors do not survive an RPC as tensors);
- ``process_group``: a broadcast from a trainer over a torch process group (trainer =
  rank 0, engine workers = ranks 1..N; gloo on CPU, NCCL on GPU). The trainer end is
  ``WeightBroadcaster``; the engine joins with ``join_weight_broadcast``.

Your own transport: subclass ``WorkerTransport`` in a module the engine processes can import,
and pass ``TransportSpec("your.module:YourTransport", {...})`` as ``weights``.
"""
from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable

import torch


@dataclass(frozen=True)
class TransportSpec:
    """What the workers are told: ``name`` is a built-in transport or "module:Class"."""
    name: str
    params: dict = field(default_factory=dict)

    def as_rpc_args(self) -> tuple:
        return (self.name, dict(self.params))


@dataclass
class Received:
    """A batch of weights on one worker, received but not loaded. ``meta``: name ->
    (shape, dtype) as the sender described them, available before any data is trusted."""
    meta: dict[str, tuple[tuple[int, ...], torch.dtype]]
    tensors: dict[str, torch.Tensor]
    nbytes: int = 0


class WorkerTransport:
    """Worker end of a transport. ``receive`` must take part in every collective the sender
    starts even when the batch will be refused (the sender cannot know), and must not touch
    the model."""

    def __init__(self, worker, **params):
        self.worker = worker
        self.params = params

    def receive(self) -> Received:
        raise NotImplementedError


def worker_transport(worker, name: str, params: dict) -> WorkerTransport:
    if name in BUILT_IN:
        cls = BUILT_IN[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        cls = getattr(importlib.import_module(module), attr)
        if not (isinstance(cls, type) and issubclass(cls, WorkerTransport)):
            raise TypeError(f"{name} is not a vllm_compat.fixes.weights.transport.WorkerTransport subclass")
    else:
        raise ValueError(f"unknown weight transport {name!r} (built in: {sorted(BUILT_IN)}; or 'module:Class')")
    return cls(worker, **params)


# ---- file transport -------------------------------------------------------------------

def safetensors_files(path: str | os.PathLike) -> list[Path]:
    p = Path(path)
    return sorted(p.glob("*.safetensors")) if p.is_dir() else [p]


def safetensors_headers(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, safetensors dtype name), read from the headers only."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():
                sl = h.get_slice(name)
                out[name] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


class FileTransport(WorkerTransport):
    """Opens a safetensors file or directory at receive time. ``load_file`` memory-maps
    (safetensors 0.8.0 reads 176 MB in 2 ms, pages come in during the load): the file must
    not be rewritten in place until the update returns (README, in-flight updates)."""

    def receive(self) -> Received:
        from safetensors.torch import load_file

        files = safetensors_files(self.params["path"])
        if not files:
            raise FileNotFoundError(f"{self.params['path']}: no .safetensors files")
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            tensors.update(load_file(str(f)))
        meta = {n: (tuple(t.shape), t.dtype) for n, t in tensors.items()}
        return Received(meta, tensors, sum(t.numel() * t.element_size() for t in tensors.values()))


class NoSpaceForWeights(OSError):
    """No temp directory could hold an in-memory update (the message says what and where)."""


def _temp_dirs() -> list[str]:
    """Where in-memory updates are written, in order: RAM first (no disk round trip), then the
    normal temp dir, because /dev/shm is 64 MB in a default container (docker --shm-size)."""
    dirs = ["/dev/shm"] if os.path.isdir("/dev/shm") else []
    return dirs + [d for d in [tempfile.gettempdir()] if d not in dirs]


def _free_bytes(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _save_file(tensors: dict, path: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, path)


def _write_temp(tensors: dict[str, torch.Tensor]) -> str:
    """Write ``tensors`` to a fresh temp dir; -> the dir. Skips a dir whose free space is
    below the bytes to write, and falls back when writing fails (ENOSPC can still happen:
    others write there too)."""
    from safetensors import SafetensorError

    # data + the JSON header (~150 bytes a tensor) + page rounding
    needed = sum(t.numel() * t.element_size() for t in tensors.values()) + 256 * len(tensors) + (1 << 20)
    tried = []
    for d in _temp_dirs():
        try:
            free = _free_bytes(d)
        except OSError as e:
            tried.append(f"{d}: {e}")
            continue
        if free < needed:
            tried.append(f"{d}: {free / 2**20:.1f} MiB free")
            continue
        try:
            tmp = tempfile.mkdtemp(prefix="vllm-compat-weights-", dir=d)
        except OSError as e:
            tried.append(f"{d}: {e}")
            continue
        try:
            _save_file(tensors, os.path.join(tmp, "update.safetensors"))
            return tmp
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            # safetensors reports a failed write (ENOSPC ...) as SafetensorError "I/O error"
            if not (isinstance(e, OSError) or isinstance(e, SafetensorError) and "I/O error" in str(e)):
                raise
            tried.append(f"{d}: {e}")
    raise NoSpaceForWeights(errno.ENOSPC, f"no temp directory can hold the weight update "
                            f"({needed / 2**20:.1f} MiB needed); tried " + "; ".join(tried)
                            + ". Pass a safetensors path instead, or free space there")


def file_spec(weights) -> tuple[TransportSpec, Callable[[], None]]:
    """Client end: (spec, cleanup). Paths are used as they are; tensors are written once to
    a temp safetensors file, in /dev/shm where it has room (RAM, no disk round trip), else in
    the normal temp dir."""
    if isinstance(weights, (str, os.PathLike)):
        path = Path(weights)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file or directory")
        return TransportSpec("file", {"path": str(path)}), lambda: None

    tensors = dict(weights.items() if isinstance(weights, dict) else weights)
    bad = [n for n, t in tensors.items() if not isinstance(t, torch.Tensor)]
    if bad:
        raise TypeError(f"not tensors: {bad[:5]}")
    cpu, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.data_ptr() in seen:  # tied weights share storage; safetensors wants distinct tensors
            t = t.clone()
        seen.add(t.data_ptr())
        cpu[name] = t
    tmp = _write_temp(cpu)
    path = os.path.join(tmp, "update.safetensors")
    return TransportSpec("file", {"path": path}), lambda: shutil.rmtree(tmp, ignore_errors=True)


# ---- process-group transport ------------------------------------------------------------
# Wire format of one update: an int64 tensor [header length], the header (UTF-8 JSON as
# uint8: names, dtypes, shapes, bucket and byte offset of each tensor, bucket sizes), then
# each bucket as one flat uint8 tensor. Byte buckets carry every dtype (gloo has no bf16
# broadcast in every torch) and keep the number of collectives small.

WIRE_VERSION = 1
DEFAULT_BUCKET_BYTES = 256 << 20


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


# Per collective (the header, then each bucket), and for joining: a dead or stalled peer
# fails the update after this long instead of torch's default (30 min gloo, 10 min NCCL),
# during which a paused engine serves nothing. One 256 MiB bucket takes ~3 s over gloo on
# a 1 Gbit/s link and far less over NCCL, so 60 s is ~20x headroom; it also bounds how far
# apart the trainer's send() and the engine's update_weights() may start.
DEFAULT_TIMEOUT = timedelta(seconds=60)


def _new_group(host: str, port: int, rank: int, world_size: int, backend: str, timeout: timedelta):
    # vLLM's helper builds a process group without touching torch.distributed's global
    # state, which vLLM's own workers already use.
    import inspect

    from vllm.distributed import utils

    init = utils.stateless_init_torch_distributed_process_group
    if "timeout" in inspect.signature(init).parameters:  # vLLM > 0.18
        return init(host, port, rank, world_size, backend, timeout=timeout)
    # vLLM <= 0.18's helper ignores any timeout (torch's default applies): its same steps,
    # with ours passed to the store and to the backend, which applies it to every collective.
    from torch.distributed import PrefixStore
    from torch.distributed.rendezvous import rendezvous

    init_method = utils.get_tcp_uri(host, port)
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    prefix_store = PrefixStore(init_method, store)
    if backend == "gloo":
        return utils.init_gloo_process_group(prefix_store, rank, world_size, timeout)
    from vllm.platforms import current_platform

    return current_platform.stateless_init_device_torch_dist_pg(
        backend=backend, prefix_store=prefix_store, group_rank=rank, group_size=world_size, timeout=timeout)


def _shutdown(group) -> None:
    try:
        group.shutdown()
    except Exception:  # older torch / some backends: no shutdown(); the group is dropped
        pass


def _broadcast(group, tensor: torch.Tensor, timeout: timedelta | None = None) -> None:
    work = group.broadcast(tensor, 0)
    work.wait(timeout) if timeout is not None else work.wait()


class WeightBroadcaster:
    """Trainer end (rank 0) of the process-group transport.

    ``WeightBroadcaster(host, port, num_engine_workers)`` blocks until the engine side has
    joined (``join_weight_broadcast``); then every ``send(named_tensors)`` broadcasts one
    update, which the engine side receives in ``update_weights(engine, group)``: call both
    at the same time (e.g. the trainer process sends while the rollout process updates).
    ``num_engine_workers``: ``broadcast_world_size(engine's parallel_config) - 1``, every
    worker of every data-parallel replica.
    ``backend``: "gloo" (CPU tensors) or "nccl" (CUDA tensors); default from CUDA's presence.
    ``timeout``: for joining and for each collective (the header, each bucket); the engine
    side's ``join_weight_broadcast`` takes its own and should be given the same.
    """

    def __init__(self, host: str, port: int, num_engine_workers: int, backend: str | None = None,
                 timeout: timedelta = DEFAULT_TIMEOUT, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 device: torch.device | str | None = None):
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.device = torch.device(device or ("cuda" if self.backend == "nccl" else "cpu"))
        self.bucket_bytes = bucket_bytes
        self.group = _new_group(host, port, 0, 1 + num_engine_workers, self.backend, timeout)

    def send(self, named_tensors) -> int:
        """Broadcast one update; returns the bytes sent (headers excluded)."""
        items = list(named_tensors.items() if isinstance(named_tensors, dict) else named_tensors)
        entries, buckets, filled = [], [], None
        for name, t in items:
            nbytes = t.numel() * t.element_size()
            if filled is None or (filled and filled + nbytes > self.bucket_bytes):
                buckets.append([])
                filled = 0
            entries.append([name, str(t.dtype), list(t.shape), len(buckets) - 1, filled, nbytes])
            buckets[-1].append(t)
            filled += nbytes
        header = json.dumps({"version": WIRE_VERSION, "tensors": entries,
                             "buckets": [sum(t.numel() * t.element_size() for t in b) for b in buckets]}).encode()
        _broadcast(self.group, torch.tensor([len(header)], dtype=torch.int64, device=self.device))
        _broadcast(self.group, torch.frombuffer(bytearray(header), dtype=torch.uint8).to(self.device))
        sent = 0
        for bucket in buckets:
            flat = torch.cat([t.detach().to(self.device).contiguous().reshape(-1).view(torch.uint8)
                              for t in bucket]) if bucket else torch.empty(0, dtype=torch.uint8, device=self.device)
            _broadcast(self.group, flat)
            sent += flat.numel()
        return sent

    def close(self) -> None:
        if getattr(self, "group", None) is not None:
            _shutdown(self.group)
            self.group = None


def broadcast_world_size(parallel_config) -> int:
    """Size of the broadcast group for an engine with this (client-side) parallel config: the
    trainer plus every worker of every data-parallel replica. ``join_weight_broadcast`` must
    use it."""
    return 1 + _replicas(parallel_config) * parallel_config.world_size


def broadcast_rank(parallel_config, worker_rank: int) -> int:
    """A worker's rank in the broadcast group (the trainer is 0): replicas take consecutive
    blocks, so workers of different data-parallel replicas, which share ``worker.rank``, do not
    collide. ``parallel_config`` is the worker's own."""
    if parallel_config.distributed_executor_backend == "external_launcher":
        return 1 + worker_rank  # world_size and worker.rank already span the replicas
    # data_parallel_index: the replica's index, kept where vLLM resets data_parallel_rank/size to
    # 0/1 in each replica of a dense model; older configs only have data_parallel_rank.
    index = getattr(parallel_config, "data_parallel_index", None)
    if index is None:
        index = parallel_config.data_parallel_rank
    return 1 + index * parallel_config.world_size + worker_rank


def _replicas(parallel_config) -> int:
    if parallel_config.distributed_executor_backend == "external_launcher":
        return 1  # vLLM multiplies world_size by data_parallel_size itself
    return parallel_config.data_parallel_size


@dataclass
class _Joined:
    group: object
    device: torch.device
    timeout_s: float
    broken: str | None = None  # why the last receive failed; the group cannot be reused


def join_group_on_worker(worker, name: str, host: str, port: int, world_size: int, backend: str | None,
                         timeout_s: float = DEFAULT_TIMEOUT.total_seconds()) -> int:
    """Worker end of ``join_weight_broadcast``; rank: ``broadcast_rank``. Joining again under
    the same name replaces (and shuts down) the old group, so a new trainer process can take
    over without restarting the engine."""
    device = getattr(worker, "device", None) or torch.device("cpu")  # None on 0.18.1 CPU workers
    backend = backend or ("nccl" if torch.device(device).type == "cuda" else "gloo")
    parallel_config = worker.vllm_config.parallel_config
    rank = broadcast_rank(parallel_config, int(getattr(worker, "rank", 0)))
    if rank >= world_size:
        raise RuntimeError(
            f"weight broadcast group {name!r}: this worker's rank {rank} does not fit world size {world_size} "
            f"(data_parallel_size={parallel_config.data_parallel_size}, "
            f"world_size per replica={parallel_config.world_size}); the client must size the group with "
            "vllm_compat.fixes.weights.transport.broadcast_world_size")
    groups = worker.__dict__.setdefault("_vllm_compat_groups", {})
    old = groups.pop(name, None)
    if old is not None:
        _shutdown(old.group)
    group = _new_group(host, port, rank, world_size, backend, timedelta(seconds=timeout_s))
    groups[name] = _Joined(group, torch.device(device) if backend == "nccl" else torch.device("cpu"), timeout_s)
    return rank


class BroadcastGroupBroken(RuntimeError):
    """A receive on a weight broadcast group failed; the group must be joined again."""


class ProcessGroupTransport(WorkerTransport):
    def receive(self) -> Received:
        group_name = self.params["group"]
        joined = self.worker.__dict__.get("_vllm_compat_groups", {}).get(group_name)
        if joined is None:
            raise RuntimeError(f"this worker has not joined weight broadcast group {group_name!r}")
        if joined.broken:
            raise BroadcastGroupBroken(
                f"weight broadcast group {group_name!r} is broken since an earlier update ({joined.broken}); rejoin: "
                f"start a new WeightBroadcaster and call join_weight_broadcast(..., name={group_name!r}) again")
        self.step = "the header"
        try:
            header, buckets = self._receive(joined.group, joined.device)
        except Exception as e:
            # The trainer and this worker no longer agree on which collective comes next (or
            # the peer is gone): the group cannot be trusted again.
            joined.broken = f"{type(e).__name__} while receiving {self.step}: {e}"
            raise BroadcastGroupBroken(
                f"weight broadcast group {group_name!r}: receive failed ({joined.broken}); the trainer died, stalled "
                f"past the {joined.timeout_s:g} s timeout, or sent something else. Rejoin: start a new "
                f"WeightBroadcaster and call join_weight_broadcast(..., name={group_name!r}) again") from e
        meta, tensors = {}, {}  # every collective is done: an error from here on leaves the group usable
        for name, dtype_name, shape, bucket, offset, nbytes in header["tensors"]:
            dtype = _dtype_from_name(dtype_name)
            meta[name] = (tuple(shape), dtype)
            tensors[name] = buckets[bucket][offset:offset + nbytes].view(dtype).reshape(shape)
        return Received(meta, tensors, sum(header["buckets"]))

    def _receive(self, group, device) -> tuple[dict, list[torch.Tensor]]:
        # update_weights(timeout=...) bounds each collective too, where it is below the group's
        timeout = timedelta(seconds=self.params["timeout_s"]) if self.params.get("timeout_s") else None
        length = torch.zeros(1, dtype=torch.int64, device=device)
        _broadcast(group, length, timeout)
        raw = torch.empty(int(length.item()), dtype=torch.uint8, device=device)
        _broadcast(group, raw, timeout)
        header = json.loads(bytes(raw.cpu().numpy()))
        if header.get("version") != WIRE_VERSION:
            raise RuntimeError(f"weight broadcast wire version {header.get('version')} != {WIRE_VERSION}")
        buckets = []
        for i, size in enumerate(header["buckets"]):  # receive everything, even if it will be refused
            self.step = f"bucket {i + 1} of {len(header['buckets'])}"
            buf = torch.empty(size, dtype=torch.uint8, device=device)
            _broadcast(group, buf, timeout)
            # Staged in host memory until the commit: the accelerator holds one bucket at a time
            # (a whole second copy of the weights there would not fit beside a large model).
            buckets.append(buf if buf.device.type == "cpu" else buf.cpu())
        return header, buckets


BUILT_IN: dict[str, type[WorkerTransport]] = {"file": FileTransport, "process_group": ProcessGroupTransport}

