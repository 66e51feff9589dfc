"""Worker side of fix 3: validate an update against the checkpoint, plan it, load it in place.

V0 loaded an update with ``model.load_weights`` straight into the live parameters: each
parameter's weight loader writes its shard (q_proj into the q rows of the fused qkv_proj, a
tensor-parallel rank its slice), so any subset of the checkpoint loads and the rest stays as it
is. This module does the same wherever a layer's live parameters still hold the checkpoint
format (unquantized layers; on CPU because the ``weight_updates`` fix keeps the GEMM weight
that vLLM would drop after packing it), then re-runs that layer's post-processing (CPU
re-packing) and the attention layers' (MLA derives weights from its projections).

vLLM's own ``reload_weights`` (layerwise reload) rebuilds every layer it touches from fresh
storage and post-processes it even when only part of it was sent: a partial update of a fused
parameter then computes with uninitialised memory (NaN, measured). It is used here only for
layers whose live parameters are no longer in checkpoint format (quantized or repacked), and
only when the update holds every checkpoint tensor of such a layer; otherwise the update is
refused before anything changes, naming the missing tensors.

The plan comes from a dry run of ``model.load_weights`` with recording weight loaders and
meta tensors: it tells, without copying anything, which parameter (and shard) each checkpoint
tensor lands in.
"""
from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import transport as tp
from ... import versions

# Quant methods whose post-processing leaves parameters in checkpoint format (on CPU the GEMM
# packing keeps the weight while the weight_updates fix is active, see fixes/weights/__init__.py).
_CHECKPOINT_FORMAT_METHODS = ("UnquantizedLinearMethod", "UnquantizedEmbeddingMethod")


# ---- validation ---------------------------------------------------------------------------

def _tied(worker) -> bool:
    return bool(getattr(worker.model_config.hf_config, "tie_word_embeddings", False))


def _checkpoint_dir(worker) -> Path:
    model = worker.model_config.model
    if Path(model).is_dir():
        return Path(model)
    from huggingface_hub import snapshot_download  # a hub id: the snapshot vLLM loaded

    return Path(snapshot_download(model, revision=worker.model_config.revision, local_files_only=True,
                                  allow_patterns=["*.safetensors"],
                                  cache_dir=getattr(worker, "load_config", None) and worker.load_config.download_dir))


def _reference(worker) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of the checkpoint the model was loaded from (cached)."""
    ref = worker.__dict__.get("_vllm_compat_reference")
    if ref is None:
        files = tp.safetensors_files(_checkpoint_dir(worker))
        if not files:
            raise RuntimeError(f"{worker.model_config.model}: no safetensors checkpoint to validate updates against")
        ref = worker.__dict__["_vllm_compat_reference"] = tp.safetensors_headers(files)
    return ref


def validate(worker, meta: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """Problems with an update for this worker's model, judged against its checkpoint:
    every name must exist with the same shape, and carry a floating-point dtype."""
    reference = _reference(worker)
    problems = []
    if not meta:
        problems.append("the update holds no tensors")
    for name, (shape, dtype) in meta.items():
        if name == "lm_head.weight" and _tied(worker) and name not in reference:
            continue  # tied head: the embedding carries it
        if name not in reference:
            problems.append(f"{name}: not a weight of this model")
        elif tuple(shape) != tuple(reference[name][0]):
            problems.append(f"{name}: shape {list(shape)} != {list(reference[name][0])}")
        elif not dtype.is_floating_point:
            problems.append(f"{name}: dtype {str(dtype).removeprefix('torch.')} is not floating point")
    return problems


# ---- the plan: where each checkpoint tensor lands -------------------------------------------

Target = tuple[str, str, str]  # (module name, parameter name, shard key)


@contextmanager
def _recording_loaders(model: torch.nn.Module, record: list):
    """Replace every parameter's weight loader by one that records (module, parameter, shard)
    and copies nothing; restored on exit."""
    owner = {}
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            owner.setdefault(id(param), (module_name, param_name))
    saved, seen = [], set()
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        # getattr, not vars(): vLLM's parameter classes keep the loader behind a property
        saved.append((param, getattr(param, "weight_loader", _ABSENT)))

        def recorder(p, loaded_weight, *args, _key=owner[id(param)], **kwargs):
            shard = repr(tuple(a for a in args if not isinstance(a, torch.Tensor))
                         + tuple(sorted((k, v) for k, v in kwargs.items() if not isinstance(v, torch.Tensor))))
            record.append((*_key, shard))
            return True if kwargs.get("return_success") else None  # MoE loaders report success

        param.weight_loader = recorder
    try:
        yield
    finally:
        for param, loader in saved:
            if loader is _ABSENT:
                delattr(param, "weight_loader")
            else:
                param.weight_loader = loader


_ABSENT = object()


def targets(model: torch.nn.Module, meta: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, set[Target]]:
    """Dry run of ``model.load_weights``: checkpoint name -> the (module, parameter, shard)
    targets it is written to (empty for tensors the model ignores, such as a tied lm_head)."""
    out: dict[str, set[Target]] = {}
    for name, (shape, dtype) in meta.items():
        record: list[Target] = []
        with _recording_loaders(model, record):
            model.load_weights([(name, torch.empty(shape, dtype=dtype, device="meta"))])
        out[name] = set(record)
    return out


def holds_checkpoint_format(module: torch.nn.Module) -> bool:
    """Whether a layer's live parameters are what its weight loaders write (so new values can
    be loaded into them directly): unquantized, and no parameter dropped after packing."""
    method = getattr(module, "quant_method", None)
    if method is not None and type(method).__name__ not in _CHECKPOINT_FORMAT_METHODS:
        return False
    return not any(p.numel() == 0 for p in module.parameters(recurse=False))


@dataclass
class Plan:
    direct: list[str] = field(default_factory=list)      # loaded into the live parameters
    layerwise: list[str] = field(default_factory=list)   # whole layers through vLLM's reload_weights
    modules: set[str] = field(default_factory=set)       # layers written directly (re-processed)
    problems: list[str] = field(default_factory=list)


def plan(worker, meta: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> Plan:
    model = worker.model_runner.get_model()
    where = targets(model, meta)
    modules = dict(model.named_modules())
    result = Plan()
    partial: dict[str, set[Target]] = {}  # layer -> targets of the update in layers that need whole loads
    for name, hits in where.items():
        layers = {m for m, _, _ in hits}
        if all(holds_checkpoint_format(modules[m]) for m in layers):
            result.direct.append(name)
            result.modules |= layers
        else:
            result.layerwise.append(name)
            for m, p, s in hits:
                partial.setdefault(m, set()).add((m, p, s))
    if partial:
        if not versions.has_iterator_reload(worker.model_runner):
            result.problems.append(
                f"this vLLM cannot update {', '.join(sorted(partial)[:3])}{' ...' if len(partial) > 3 else ''} in "
                "place: their weights were post-processed (packed or quantized) and its reload_weights() cannot "
                "take tensors (it arrived in vLLM 0.18)")
            return result
        full = _full_targets(worker)
        for layer, got in sorted(partial.items()):
            needed = {t for ts in full.values() for t in ts if t[0] == layer}
            if not needed <= got:
                missing = sorted(n for n, ts in full.items() if any(t in ts and t not in got for t in needed))
                result.problems.append(
                    f"{layer} holds post-processed (packed or quantized) weights and can only be reloaded whole: "
                    f"send {', '.join(missing)} with it")
    return result


def _full_targets(worker) -> dict[str, set[Target]]:
    """``targets`` of the whole checkpoint (cached): what a complete layer needs."""
    full = worker.__dict__.get("_vllm_compat_full_targets")
    if full is None:
        meta = {n: (shape, _safetensors_dtype(d)) for n, (shape, d) in _reference(worker).items()}
        full = worker.__dict__["_vllm_compat_full_targets"] = targets(worker.model_runner.get_model(), meta)
    return full


def _safetensors_dtype(name: str) -> torch.dtype:
    from safetensors.torch import _getdtype  # safetensors' own header-name -> torch dtype table

    return _getdtype(name)


# ---- loading ------------------------------------------------------------------------------

def load(worker, tensors: dict[str, torch.Tensor], the_plan: Plan) -> None:
    """Load a validated, planned update in place, under vLLM's current config (quantization
    methods read it while processing weights, as in vLLM's own weight-transfer path)."""
    runner = worker.model_runner
    model = runner.get_model()
    config = getattr(worker, "vllm_config", None)
    with _current_config(config):
        if the_plan.direct:
            model.load_weights([(n, tensors[n]) for n in the_plan.direct])
            reprocess(model, the_plan.modules, runner.model_config.dtype)
        if the_plan.layerwise:
            runner.reload_weights(weights_iterator=iter([(n, tensors[n]) for n in the_plan.layerwise]))
        refresh_derived(model)


def _current_config(config):
    if config is None:
        return nullcontext()
    from vllm.config import set_current_vllm_config

    return set_current_vllm_config(config)


def reprocess(model: torch.nn.Module, module_names: set[str], act_dtype: torch.dtype) -> None:
    """Re-run the post-processing vLLM runs after loading (model_loader.utils.
    process_weights_after_loading) for the layers that received weights, then for the attention
    layers, which may derive weights from their projections (MLA)."""
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    for name in sorted(module_names):
        module = model.get_submodule(name)
        method = getattr(module, "quant_method", None)
        if method is not None and hasattr(method, "process_weights_after_loading"):
            method.process_weights_after_loading(module)
    for module in model.modules():
        if isinstance(module, AttentionLayerBase) and callable(getattr(module, "process_weights_after_loading", None)):
            module.process_weights_after_loading(act_dtype)


def refresh_derived(model) -> None:
    """A tied lm_head shares the embedding's weight, but on CPU its packed GEMM copy is made
    from it once: re-pack it. The lm_head_fp32 fix's fp32 copy of a tied head is remade at the
    next step, and an untied head it stored in fp32 stays fp32 (vLLM's layerwise reload may
    rebuild it in the model dtype)."""
    from ... import registry
    from .. import lm_head

    if "lm_head_fp32" in registry.applied():
        lm_head.weights_changed(model)
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is None or embed is None or head is embed or getattr(head, "weight", None) is not embed.weight:
        return
    method = getattr(head, "quant_method", None)
    if method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)


# ---- the RPCs ----------------------------------------------------------------------------
# Several workers: stage on all, then commit on all only if none found a problem (a refusal on
# one worker must stop every worker). One worker: ``stage_and_commit`` does both in one RPC,
# still validating and planning everything before the first tensor is touched.

@dataclass
class Staged:
    received: tp.Received
    plan: Plan


def stage(worker, transport_name: str, params: dict) -> dict:
    """Receive, validate and plan; keep the batch for ``commit`` when there is no problem.
    -> {"problems": [...], "names": [the update's tensor names]}."""
    worker.__dict__.pop("_vllm_compat_staged", None)
    try:
        received = tp.worker_transport(worker, transport_name, params).receive()
    except Exception as e:  # unreadable / corrupt / missing input, a dead sender: a refusal, not a crash
        return {"problems": [f"{type(e).__name__}: {e}"], "names": []}
    names = sorted(received.meta)
    try:
        problems = validate(worker, received.meta)
        if problems:
            return {"problems": problems, "names": names}
        meta = dict(received.meta)
        if _tied(worker):
            meta.pop("lm_head.weight", None)
        the_plan = plan(worker, meta)
    except Exception as e:  # no checkpoint to judge against, a model whose loader the dry run cannot drive
        return {"problems": [f"cannot validate or plan the update: {type(e).__name__}: {e}"], "names": names}
    if not the_plan.problems:
        worker.__dict__["_vllm_compat_staged"] = Staged(received, the_plan)
    return {"problems": the_plan.problems, "names": names}


def drop(worker) -> None:
    worker.__dict__.pop("_vllm_compat_staged", None)


def commit(worker) -> dict:
    staged: Staged | None = worker.__dict__.pop("_vllm_compat_staged", None)
    if staged is None:
        raise RuntimeError("vllm_compat: commit without a staged update")
    runner = worker.model_runner
    in_flight = {rid: len(state.output_token_ids) for rid, state in getattr(runner, "requests", {}).items()}
    load(worker, staged.received.tensors, staged.plan)
    # The policy version the `support` fix stamps on each sampled token (updates committed so far).
    runner.vllm_compat_weight_version = getattr(runner, "vllm_compat_weight_version", 0) + 1
    return {"tensors": len(staged.plan.direct) + len(staged.plan.layerwise), "bytes": staged.received.nbytes,
            "in_flight": in_flight}


def stage_and_commit(worker, transport_name: str, params: dict, timeout_s: float | None = None) -> dict:
    """The update in one RPC, for an engine with a single worker: ``stage`` (receive, validate,
    plan), then ``commit`` only if staging found no problem and ended within ``timeout_s``
    (seconds from the RPC's arrival). Nothing is loaded otherwise, and no staged copy outlives
    the call. -> stage's report plus "timed_out", "commit" (commit's result, None when nothing
    was loaded), "load_error" (commit's exception as text: weights may be mixed) and "seconds"
    (this worker's receive_validate and load times)."""
    start = time.perf_counter()
    try:
        report = stage(worker, transport_name, params)
        staged = time.perf_counter()
        report.update(timed_out=timeout_s is not None and staged - start > timeout_s, commit=None, load_error=None,
                      seconds={"receive_validate": staged - start, "load": 0.0})
        if report["timed_out"] or report["problems"]:
            return report
        try:
            report["commit"] = commit(worker)
        except Exception as e:  # after validation: the load itself failed part-way
            report["load_error"] = f"{type(e).__name__}: {e}"
        report["seconds"]["load"] = time.perf_counter() - staged
        return report
    finally:
        drop(worker)
