"""vllm-compat: make vLLM V1 reproduce V0 rollout behaviour for online RL.

``import vllm_compat`` before creating an engine applies the selection in VLLM_COMPAT
(default: all default fixes). See README for the fixes and the API.
"""
from __future__ import annotations

import inspect

from . import fixes as _fixes  # noqa: F401  (registers the fixes)
from .registry import InternalsMoved, apply, apply_from_env, applied, parse_selection, status  # noqa: F401
from .versions import UnsupportedVersion  # noqa: F401
from .fixes.support import sampled_support  # noqa: F401
from .trainer import SampledSupport  # noqa: F401
from .fixes.weights.transport import TransportSpec, WeightBroadcaster, WorkerTransport  # noqa: F401
from .fixes.weights import (BroadcastGroup, EngineFenced, WeightUpdateError, WeightUpdateIncomplete,  # noqa: F401
                            WeightUpdateResult, WeightUpdateTimeout, join_weight_broadcast, last_update,
                            update_weights)

__version__ = "0.1.0.dev0"


class CompatCheckError(RuntimeError):
    """An engine process does not run the fixes the user's process applied."""


# Model Runner V2 (vllm/v1/worker/gpu/) samples with its own Triton sampler: the sampler fixes patch
# the V1 runner's, so where another feature forces V2 they would be reported active but bypassed.
_RUNNER_V2 = "vllm.v1.worker.gpu."
_SAMPLER_FIXES = ("logprobs", "prompt_logprobs", "v0_bf16_params")


def _compare(expected: list[str], reports: list[dict]) -> list[dict]:
    bad = [r for r in reports if r.get("applied") != expected]
    if bad:
        lines = [f"pid {r.get('pid')}: applied {r.get('applied')}, skipped {r.get('skipped')}" for r in bad]
        raise CompatCheckError(f"vllm-compat: engine processes differ from this process ({expected}):\n  "
                               + "\n  ".join(lines))
    bypassed = [r for r in reports if str(r.get("model_runner", "")).startswith(_RUNNER_V2)]
    if bypassed and set(expected) & set(_SAMPLER_FIXES):
        raise CompatCheckError(
            f"vllm-compat: pid {bypassed[0].get('pid')} runs Model Runner V2 ({bypassed[0]['model_runner']}), which "
            f"bypasses {sorted(set(expected) & set(_SAMPLER_FIXES))}; something forced it despite "
            f"VLLM_USE_V2_MODEL_RUNNER=0 (e.g. watermarking): turn that off")
    return reports


def check(engine):
    """Ask every worker of ``engine`` (LLM or AsyncLLM) which fixes it runs; raise
    CompatCheckError on any difference from this process. For AsyncLLM, await the result."""
    expected = applied()
    try:
        result = engine.collective_rpc("vllm_compat_status")
    except Exception as e:
        raise _no_extension(e) from e
    if inspect.isawaitable(result):
        async def finish():
            try:
                reports = await result
            except Exception as e:
                raise _no_extension(e) from e
            return _compare(expected, reports)
        return finish()
    return _compare(expected, result)


def _no_extension(e: Exception) -> CompatCheckError:
    return CompatCheckError(
        f"vllm-compat: the engine's workers cannot report their fixes ({type(e).__name__}: {e}). Create the engine "
        f"after `import vllm_compat`.")


# The one import-time side effect: apply what the environment asks for.
apply_from_env()
