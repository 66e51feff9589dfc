"""``vllm.general_plugins`` entry point of vllm-compat.

vLLM calls it in every process it starts (engine core, workers, API server). It lives
outside the ``vllm_compat`` package on purpose: importing that package applies fixes, and
the plugin must stay inert (import nothing) unless the user activated vllm-compat, either
by importing it in the parent (which exports VLLM_COMPAT_ACTIVE) or with VLLM_COMPAT set.
vLLM logs and swallows plugin exceptions; ``vllm_compat.check(engine)`` makes a failure here
visible in the user's process.
"""
import os


def register() -> None:
    if "VLLM_COMPAT_ACTIVE" not in os.environ and "VLLM_COMPAT" not in os.environ:
        return
    import vllm_compat  # noqa: F401  (applies the selection from the environment)
    from vllm_compat import registry

    registry.mark_plugin_loaded()
