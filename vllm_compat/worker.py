"""Worker extension installed by vllm-compat (``worker_extension_cls``) when the user left
it unset. Method names carry a ``vllm_compat_`` prefix so they never clash with vLLM's own
worker methods (CPUWorker already has update_weights, start/finish_weight_update)."""
from __future__ import annotations


class CompatWorkerExtension:
    def vllm_compat_status(self) -> dict:
        """What this worker process has applied (answered by the worker, not the parent)."""
        from . import registry

        return registry.status()

    def vllm_compat_join_broadcast(self, name, host, port, world_size, backend, timeout_s) -> int:
        from . import transport

        return transport.join_group_on_worker(self, name, host, port, world_size, backend, timeout_s)

    def vllm_compat_stage_weights(self, transport_name: str, params: dict) -> list[str]:
        from . import weight_sync

        return weight_sync.stage(self, transport_name, params)

    def vllm_compat_drop_weights(self) -> None:
        from . import weight_sync

        weight_sync.drop(self)

    def vllm_compat_commit_weights(self) -> dict:
        from . import weight_sync

        return weight_sync.commit(self)
