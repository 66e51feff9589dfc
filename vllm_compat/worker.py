"""Worker extension installed by vllm-compat (``worker_extension_cls``) when the user left
it unset. Method names carry a ``vllm_compat_`` prefix so they never clash with vLLM's own
worker methods (CPUWorker already has update_weights, start/finish_weight_update)."""
from __future__ import annotations


class CompatWorkerExtension:
    def vllm_compat_status(self) -> dict:
        """What this worker process has applied (answered by the worker, not the parent)."""
        from . import registry

        return registry.status()

    def vllm_compat_check_weights(self, path: str) -> list[str]:
        from . import weight_sync

        return weight_sync.check_weights(self, path)

    def vllm_compat_load_weights(self, path: str) -> int:
        from . import weight_sync

        return weight_sync.load_weights(self, path)
