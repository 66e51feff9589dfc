"""Fix ``defaults``: V0's engine defaults for every entry point.

Why: V1 turns on prefix caching (after an in-flight weight update a later request can
reuse KV computed with the old weights; NeMo-RL #4018, prime-rl #1650) and async
scheduling (0.14+), and can pick the FlashInfer sampler (which skips processed logprobs)
or Model Runner V2 (Gumbel sampling keyed by a hash, no torch.Generator). V0 had none.
How: a configure hook on EngineArgs.create_engine_config sets only what the user left
unset (None / env var absent) and warns, naming the consequence, when the user chose a
V0-breaking value explicitly.
"""
from __future__ import annotations

import logging
import os

from ..registry import Fix, register

logger = logging.getLogger("vllm_compat")

# EngineArgs field -> consequence when explicitly enabled
ENGINE_FIELDS = {
    "enable_prefix_caching": "requests sent after an in-flight weight update may reuse KV cached with the old "
                             "weights (V0 had no prefix cache)",
    "async_scheduling": "the next step is scheduled before this step's tokens are known; V0 ran steps "
                        "strictly in order",
}
# Environment switch -> (V0 value, consequence when the user set another value)
ENV_SWITCHES = {
    "VLLM_USE_FLASHINFER_SAMPLER": ("0", "the FlashInfer sampler returns raw logprobs and draws differently"),
    "VLLM_USE_V2_MODEL_RUNNER": ("0", "Model Runner V2 samples with hashed Gumbel noise, not the V0 draw"),
}


def configure(engine_args) -> None:
    for name, consequence in ENGINE_FIELDS.items():
        if not hasattr(engine_args, name):
            continue  # not in this vLLM version
        value = getattr(engine_args, name)
        if value is None:
            setattr(engine_args, name, False)
        elif value:
            logger.warning("vllm-compat: %s=True kept as you set it: %s", name, consequence)
    for var, (v0_value, consequence) in ENV_SWITCHES.items():
        if var not in os.environ:
            os.environ[var] = v0_value  # engine processes inherit it
        elif os.environ[var] != v0_value:
            logger.warning("vllm-compat: %s=%s kept as you set it: %s", var, os.environ[var], consequence)


register(Fix(
    name="defaults",
    summary="V0 engine defaults: prefix caching, async scheduling, FlashInfer sampler, Model Runner V2 off",
    why="V1 enables prefix caching and async scheduling and may pick samplers that change logprobs/draws",
    how="EngineArgs.create_engine_config hook; only fields the user left unset; warns on explicit V0-breaking values",
    upstream="none (a V0-compatible preset would be the upstream form; see patches/)",
    remove_when="vLLM offers a V0/RL rollout preset",
    configure=configure,
))
