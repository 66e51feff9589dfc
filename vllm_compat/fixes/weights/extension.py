"""The worker extension vllm-compat installs (``worker_extension_cls``): what ``check()`` and
``update_weights`` call on every worker through ``collective_rpc``.

Method names carry a ``vllm_compat_`` prefix so they never clash with vLLM's own worker
methods (CPUWorker already has update_weights, start/finish_weight_update).

RL frameworks pass their own extension (verl, OpenRLHF, NeMo-RL, TRL's server). vLLM takes one
class, named by a qualified name that each worker process resolves; so a user's class is
combined with this one under the name ``vllm_compat.fixes.weights.extension.<with:...>``, which
this module's ``__getattr__`` builds in the worker: a subclass of both, so the user's methods
keep working next to vllm-compat's.
"""
from __future__ import annotations

import importlib
from functools import lru_cache

_COMBINED = "with:"  # a name no Python identifier starts with; dots of the user's name become ":"


class CompatWorkerExtension:
    def vllm_compat_status(self) -> dict:
        """What this worker process has applied (answered by the worker, not the parent), and
        whether it holds a staged weight update (it must not, between updates)."""
        from ... import registry

        runner = type(getattr(self, "model_runner", None))
        return {**registry.status(), "staged_update": "_vllm_compat_staged" in self.__dict__,
                "model_runner": f"{runner.__module__}.{runner.__qualname__}"}

    def vllm_compat_join_broadcast(self, name, host, port, world_size, backend, timeout_s) -> int:
        from . import transport

        return transport.join_group_on_worker(self, name, host, port, world_size, backend, timeout_s)

    def vllm_compat_stage_weights(self, transport_name: str, params: dict) -> dict:
        from . import worker

        return worker.stage(self, transport_name, params)

    def vllm_compat_update_weights(self, transport_name: str, params: dict, timeout_s: float | None) -> dict:
        from . import worker

        return worker.stage_and_commit(self, transport_name, params, timeout_s)

    def vllm_compat_drop_weights(self) -> None:
        from . import worker

        worker.drop(self)

    def vllm_compat_commit_weights(self) -> dict:
        from . import worker

        return worker.commit(self)


QUALNAME = f"{__name__}.{CompatWorkerExtension.__name__}"


def qualname_with(user_extension) -> str:
    """The ``worker_extension_cls`` that gives the workers the user's extension (a qualified
    name or a class) and vllm-compat's; ours alone for None."""
    if not user_extension:
        return QUALNAME
    if isinstance(user_extension, type):
        user_extension = f"{user_extension.__module__}.{user_extension.__qualname__}"
    if user_extension == QUALNAME or user_extension.startswith(f"{__name__}.{_COMBINED}"):
        return user_extension
    return f"{__name__}.{_COMBINED}{user_extension.replace('.', ':')}"


@lru_cache(maxsize=None)
def _combined(user_qualname: str) -> type:
    module, _, attr = user_qualname.rpartition(".")  # how vLLM resolves worker_extension_cls
    user = getattr(importlib.import_module(module), attr)
    return type(f"{user.__name__}WithVllmCompat", (user, CompatWorkerExtension), {"__module__": __name__})


def __getattr__(name: str):
    if name.startswith(_COMBINED):
        return _combined(name[len(_COMBINED):].replace(":", "."))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
