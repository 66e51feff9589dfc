"""``vllm.general_plugins`` entry point of vllm-compat.

vLLM calls it in every process it starts (engine core, workers, API server). It lives
outside the ``vllm_compat`` package on purpose: importing that package applies fixes, and
the plugin must stay inert (import nothing) unless the user activated vllm-compat, either
by importing it in the parent (which exports VLLM_COMPAT_ACTIVE) or with VLLM_COMPAT set.
vLLM only logs failures to *import* this module; an error raised by ``register()`` (for
example an unknown name in VLLM_COMPAT, or vLLM internals that moved) stops that engine
process from starting, which is what we want. ``vllm_compat.check(engine)`` catches the
remaining case, a process that quietly runs another selection.
"""
import os


def register() -> None:
    if "VLLM_COMPAT_ACTIVE" not in os.environ and "VLLM_COMPAT" not in os.environ:
        return
    import vllm_compat  # noqa: F401  (applies the selection from the environment)
    from vllm_compat import registry

    registry.mark_plugin_loaded()
