"""Fix ``lm_head_fp32``: the final projection in fp32, as RL trainers compute it.

Why: with a bf16/fp16 model V1 computes logits in the model dtype; the rounding of the
logits (and of the hidden state fed to them) is exactly where trainer and engine logprobs
diverge in the tails (open-instruct #1387: 2-24 nats). The migration's V0 reference ran the
head in fp32. An fp32 head on one side only is worse than none: the trainer must match.
How: vLLM >= 0.26 has it built in (``hf_overrides={"head_dtype": "float32"}``, PR #48390;
probed by ``versions.has_native_head_dtype``): the configure hook sets it unless the user chose
a head dtype. Older versions:
``LogitsProcessor._get_logits`` projects ``hidden.float() @ weight.float().T``. Both read
``lm_head.weight`` itself at every call (tied embeddings included, never changing the shared
tensor's dtype, and never a packed CPU copy), so a weight update is visible at the next
step with no cache to refresh.
Speed on CPU: both paths convert the vocab x hidden weight to fp32 at every step (torch has
no CPU ``mm(..., out_dtype=float32)``), which cost more than the projection itself. After the
model loads, an untied head's weight is therefore stored in fp32 (:func:`store_head_in_fp32`):
bf16/fp16 -> fp32 is exact, so the logits are bit for bit those of per-step conversion, and
weight loaders ``copy_`` new values into it (casting), so updates land as before. Tied heads
keep sharing the embedding's tensor, untouched; the projection uses an fp32 copy of it
(:func:`fp32_head_weight`, the same exact conversion, made once) that every weight load marks
stale (:func:`weights_changed`: called by vllm-compat's updates, after ``model.load_weights``
and after vLLM's ``reload_weights``) and that is remade at the next step. Checking it costs a
step no host sync (pointer, dtype and shape of the live weight, and a counter).
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import versions
from ..registry import Fix, register


def configure(engine_args) -> None:
    if not versions.has_native_head_dtype():
        if getattr(engine_args, "enable_lora", False):
            from .logprobs import BypassRefused

            # LogitsProcessorWithLoRA overrides _get_logits, the method this fix patches here.
            raise BypassRefused("vllm-compat: with LoRA enabled, this vLLM computes the head through "
                                "LogitsProcessorWithLoRA, which the `lm_head_fp32` fix does not reach before vLLM "
                                "0.26; disable LoRA or leave the fix out (VLLM_COMPAT=-lm_head_fp32)")
        return
    overrides = engine_args.hf_overrides
    if callable(overrides):
        user = overrides

        def overrides(config):  # noqa: F811  (compose with the user's callable)
            config = user(config)
            if getattr(config, "head_dtype", None) is None:
                config.head_dtype = "float32"
            return config
    else:
        overrides = dict(overrides or {})
        overrides.setdefault("head_dtype", "float32")
    engine_args.hf_overrides = overrides


def _watch_loads(model) -> None:
    """``model.load_weights`` (what vLLM's weight transfer and V0-era RL code call) tells
    :func:`weights_changed` afterwards."""
    original = model.load_weights

    @functools.wraps(original)
    def load_weights(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        finally:
            weights_changed(model, rebuilt=False)

    model.load_weights = load_weights


def store_head_in_fp32(model) -> bool:
    """Store an untied bf16/fp16 ``lm_head.weight`` in fp32, in place (same Parameter).
    Returns whether it did. Called after the model loads and after every weight update."""
    head = getattr(model, "lm_head", None)
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dtype == torch.float32 or not weight.is_floating_point():
        return False
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    if not isinstance(getattr(head, "quant_method", None), UnquantizedEmbeddingMethod):
        return False
    ptr = weight.data_ptr()
    sharing = [p for _, p in model.named_parameters(remove_duplicate=False) if p.numel() and p.data_ptr() == ptr]
    if len(sharing) != 1:  # tied to the embedding (or otherwise shared): never change its dtype
        return False
    weight.data = weight.data.to(torch.float32)
    return True


def weights_changed(model, rebuilt: bool = True) -> None:
    """Called after anything loaded weights into ``model``: a derived fp32 copy of the head is
    remade before its next use. ``rebuilt``: the load may have replaced the head's tensor (vLLM's
    layerwise reload rebuilds it in the model dtype): store an untied head in fp32 again. Not
    from inside a load that is still running (``model.load_weights`` under that reload)."""
    head = getattr(model, "lm_head", None)
    if head is not None:
        head._vllm_compat_fp32_generation = getattr(head, "_vllm_compat_fp32_generation", 0) + 1
    if rebuilt and getattr(model, "_vllm_compat_fp32_head", False):
        store_head_in_fp32(model)


def fp32_head_weight(head) -> torch.Tensor:
    """``head.weight`` in fp32: itself when it already is (an untied head stored in fp32), else
    a copy (a tied head: the embedding's tensor, never converted in place) kept until
    :func:`weights_changed` or a new weight tensor makes it stale. Host-sync free."""
    weight = head.weight
    if weight.dtype == torch.float32:
        return weight
    key = (weight.data_ptr(), weight.dtype, tuple(weight.shape), weight.device,
           getattr(head, "_vllm_compat_fp32_generation", 0))
    cached = getattr(head, "_vllm_compat_fp32_copy", None)
    if cached is None or cached[0] != key:
        cached = (key, weight.detach().to(torch.float32))
        head._vllm_compat_fp32_copy = None  # drop the stale copy before making the new one
        head._vllm_compat_fp32_copy = cached
    return cached[1]


def _plain_head(lm_head) -> bool:
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return isinstance(getattr(lm_head, "quant_method", None), UnquantizedEmbeddingMethod)


def _fp32_head_on(model_config) -> bool:
    if versions.has_native_head_dtype():
        return getattr(model_config, "head_dtype", None) == torch.float32
    return True  # before 0.26 this fix's _get_logits patch is the fp32 head


def patch(patcher) -> None:
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner

        def load_model(self, *args, **kwargs):
            loaded = load_original(self, *args, **kwargs)
            model = self.get_model()
            if _fp32_head_on(self.model_config) and self.model_config.dtype != torch.float32:
                model._vllm_compat_fp32_head = store_head_in_fp32(model)
                _watch_loads(model)
            return loaded

        load_original = patcher.replace(CPUModelRunner, "load_model", load_model, expect_params=["self"])
        if hasattr(CPUModelRunner, "reload_weights"):  # vLLM's own in-place reload (layerwise)
            reload_original = CPUModelRunner.reload_weights

            @functools.wraps(reload_original)  # its signature stays visible (versions.has_iterator_reload)
            def reload_weights(self, *args, **kwargs):
                try:
                    return reload_original(self, *args, **kwargs)
                finally:
                    weights_changed(self.get_model())

            patcher.replace(CPUModelRunner, "reload_weights", reload_weights, expect_params=["self"])
        if versions.has_native_head_dtype():
            from vllm.model_executor.layers.logits_processor import LogitsProcessor

            def _apply_head(self, lm_head, hidden_states, embedding_bias, *args, **kwargs):
                # vLLM converts the weight to fp32 at every step here (no CPU out_dtype matmul).
                if self.head_dtype != torch.float32 or hidden_states.dtype == torch.float32 or args or kwargs \
                        or not _plain_head(lm_head):
                    return apply_original(self, lm_head, hidden_states, embedding_bias, *args, **kwargs)
                return F.linear(hidden_states.to(torch.float32), fp32_head_weight(lm_head),
                                None if embedding_bias is None else embedding_bias.to(torch.float32))

            apply_original = patcher.replace(LogitsProcessor, "_apply_head", _apply_head,
                                             expect_params=["self", "lm_head", "hidden_states", "embedding_bias"])
    if versions.has_native_head_dtype():
        return
    from vllm.model_executor.layers.logits_processor import LogitsProcessor

    def _get_logits(self, hidden_states, lm_head, embedding_bias, *args, **kwargs):
        if hidden_states.dtype == torch.float32 or not _plain_head(lm_head):
            return original(self, hidden_states, lm_head, embedding_bias, *args, **kwargs)
        weight = fp32_head_weight(lm_head) if current_platform.is_cpu() else lm_head.weight.float()
        logits = F.linear(hidden_states.float(), weight, None if embedding_bias is None else embedding_bias.float())
        logits = self._gather_logits(logits)  # TP: vocab-sharded head, gathered like vLLM does
        return None if logits is None else logits[..., : self.org_vocab_size]

    original = patcher.replace(LogitsProcessor, "_get_logits", _get_logits,
                               expect_params=["self", "hidden_states", "lm_head", "embedding_bias"])


register(Fix(
    name="lm_head_fp32",
    summary="final projection (lm_head, tied embeddings included) in fp32",
    why="bf16 logits differ from the trainer's fp32 logits by up to nats in the tails",
    how="hf_overrides head_dtype=float32 on vLLM >= 0.26; LogitsProcessor._get_logits patch before; on CPU an "
        "untied head's weight is stored in fp32 after loading (no per-step conversion)",
    upstream="built in from 0.26 (PR #48390): hf_overrides={'head_dtype': 'float32'}",
    remove_when="users on >= 0.26 can pass head_dtype themselves; the fix then only sets the default",
    patch=patch,
    configure=configure,
))
