"""Fix ``support``: support replay -- the engine returns, per sampled token, the set it sampled from.

Why: with top-k, top-p or min-p a trainer that re-applies the filters to its own logits decides
the kept set again on logits that differ by numerical noise; near a boundary it masks a token the
engine sampled (-inf log-probability, infinite ratio). Measured by ``vllm-compat verify`` on the
bf16 scenarios: 4 of 38 had such a token. vLLM's ``return_sampling_mask`` (0.28+) is
engine-wide, needs top_k > 0, reflects V1's filter order and is produced by Model Runner V2 only.
How (opt-in per request: ``SamplingParams(extra_args={"vllm_compat_support": True})``):
  * worker: ``GPUModelRunner.sample_tokens`` tells the sampler which batch rows asked; the
    ``logprobs`` fix's ``v0_sample`` hands their processed rows to the hook it sets (the finite
    entries: the kept set, in V0's order of filters), which sends the kept ids or, when more than
    half the vocabulary is kept, the dropped ids (one device-to-host copy per step, only when a
    row asked). Rows of a partially prefilled prompt are left out (their sample is discarded).
    The payload rides on ``ModelRunnerOutput`` (an attribute: it survives the executors' pickling).
  * engine core: ``Scheduler.update_from_output`` puts each request's entry into its
    ``EngineCoreOutput.kv_transfer_params`` under :data:`REQUEST_KEY` (the one per-request dict
    that msgspec carries to the client; a KV connector's own keys are kept).
  * client: ``OutputProcessor.process_outputs`` takes the entry out again before vLLM reads the
    dict, accumulates it on the request state, and each ``CompletionOutput`` gets the
    positions it covers (all of them; the new ones in DELTA mode; ``RequestOutput.add`` merges
    them when deltas are aggregated). Read it with :func:`vllm_compat.sampled_support`.
Requests that do not ask cost one dict lookup per request per step.
"""
from __future__ import annotations

import numpy as np
import torch

from ..registry import Fix, register
from .logprobs import SUPPORT_CAPTURE
from ..trainer import REQUEST_KEY, SampledSupport

_PAYLOAD = "vllm_compat_support"          # ModelRunnerOutput attribute: req id -> wire entry
_PENDING = "vllm_compat_support_pending"  # RequestState attribute: wire entries not yet output
OUTPUT_ATTR = "vllm_compat_support"       # CompletionOutput attribute: SampledSupport
VERSION_ATTR = "vllm_compat_weight_version"  # model runner attribute: updates committed (weights fix)


def wants_support(sampling_params) -> bool:
    extra = getattr(sampling_params, "extra_args", None)
    if not extra:
        return False
    value = extra.get(REQUEST_KEY)
    # vllm_xargs values arrive as JSON numbers or strings: "false" and "0" must not turn it on.
    return value.strip().lower() in ("1", "true", "yes") if isinstance(value, str) else bool(value)


def _capture(rows: torch.Tensor | None, found: list):
    """The hook the ``logprobs`` fix's sampler calls with the rows its logprobs come from
    (``rows``: the batch rows that asked; None: all of them)."""
    def capture(logits: torch.Tensor) -> None:
        sub = logits if rows is None else logits.index_select(0, rows)
        vocab = sub.shape[1]
        # A processed row holds finite values and -inf (no +inf; NaN only from a broken model: not
        # kept). Comparisons, not isfinite, and int32 counts: on CPU isfinite costs up to ~20x a compare on
        # rows full of -inf, and an int64 count of bools ~3x an int32 one (32 x 32000, 2 cores).
        kept = sub > -float("inf")
        n_kept = kept.sum(dim=1, dtype=torch.int32).cpu().numpy()  # host read 1: which list each row sends
        complement = n_kept * 2 > vocab
        if not complement.any():
            listed = kept
        elif complement.all():
            listed = sub == -float("inf")
        else:
            listed = torch.where(torch.from_numpy(complement).to(sub.device).unsqueeze(1), sub == -float("inf"), kept)
        ids = listed.nonzero(as_tuple=True)[1].to(torch.int32).cpu().numpy()  # host read 2: the ids
        found.append((ids, np.where(complement, vocab - n_kept, n_kept), complement))
    return capture


def _sample_tokens(self, *args, **kwargs):
    batch = self.input_batch
    req_ids = list(batch.req_ids)
    asked = [i for i, rid in enumerate(req_ids)
             if (state := self.requests.get(rid)) is not None and wants_support(state.sampling_params)]
    if not asked:
        return sample_tokens_original(self, *args, **kwargs)
    sampler, found = self.sampler, []
    rows = None if len(asked) == len(req_ids) else torch.tensor(asked, device=self.device)
    sampler.__dict__[SUPPORT_CAPTURE] = _capture(rows, found)
    discarded = set(np.nonzero(self.discard_request_mask.np[:batch.num_reqs])[0].tolist()) \
        if hasattr(self, "discard_request_mask") else set()
    try:
        output = sample_tokens_original(self, *args, **kwargs)
    finally:
        sampler.__dict__.pop(SUPPORT_CAPTURE, None)
    if not found:  # nothing sampled this step (e.g. a pipeline stage without the sampler)
        return output
    ids, counts, complement = found[-1]
    offsets = np.concatenate(([0], np.cumsum(counts)))
    version = int(getattr(self, VERSION_ATTR, 0))
    payload = {req_ids[row]: (ids[offsets[j]:offsets[j + 1]].tobytes(), bool(complement[j]), version)
               for j, row in enumerate(asked) if row not in discarded}
    # Without async scheduling (the `defaults` fix) the output is a ModelRunnerOutput; with it,
    # vLLM wraps that in an AsyncGPUModelRunnerOutput and fills it in later.
    target = getattr(output, "_model_runner_output", output)
    setattr(target, _PAYLOAD, payload)
    return output


def _update_from_output(self, scheduler_output, model_runner_output):
    outputs = update_from_output_original(self, scheduler_output, model_runner_output)
    payload = getattr(model_runner_output, _PAYLOAD, None)
    if payload:
        for batch in outputs.values():
            for out in batch.outputs:
                entry = payload.get(out.request_id)
                if entry is not None and out.new_token_ids:
                    out.kv_transfer_params = {**(out.kv_transfer_params or {}), REQUEST_KEY: entry}
    return outputs


def _process_outputs(self, engine_core_outputs, *args, **kwargs):
    for out in engine_core_outputs:
        params = out.kv_transfer_params
        if params and REQUEST_KEY in params:
            rest = {k: v for k, v in params.items() if k != REQUEST_KEY}
            out.kv_transfer_params = rest or None
            state = self.request_states.get(out.request_id)
            if state is not None:
                state.__dict__.setdefault(_PENDING, []).append(params[REQUEST_KEY])
    return process_outputs_original(self, engine_core_outputs, *args, **kwargs)


def _new_completion_output(self, *args, **kwargs):
    completion = new_completion_output_original(self, *args, **kwargs)
    pending = self.__dict__.get(_PENDING)
    if pending is not None:
        setattr(completion, OUTPUT_ATTR, SampledSupport.from_wire(pending))
        if _is_delta(self):
            pending.clear()
    return completion


def _is_delta(state) -> bool:
    from vllm.sampling_params import RequestOutputKind

    return state.output_kind == RequestOutputKind.DELTA


def _add(self, next_output, aggregate: bool) -> None:
    incoming = {c.index: c for c in next_output.outputs} if aggregate else {}
    add_original(self, next_output, aggregate)
    for completion in self.outputs:
        nxt = incoming.get(completion.index)
        if nxt is None or nxt is completion or getattr(nxt, OUTPUT_ATTR, None) is None:
            continue
        mine = getattr(completion, OUTPUT_ATTR, None)
        if mine is None:
            setattr(completion, OUTPUT_ATTR, getattr(nxt, OUTPUT_ATTR))
        else:
            mine.extend(getattr(nxt, OUTPUT_ATTR))


def sampled_support(completion) -> SampledSupport | None:
    """The support of each sampled token of ``completion`` (a vLLM ``CompletionOutput``), or
    None where the request did not ask for it. Raises where the ``support`` fix is not active in
    this process (nothing could have been returned)."""
    found = getattr(completion, OUTPUT_ATTR, None)
    if found is None:
        from .. import registry

        if "support" not in registry.applied():
            raise RuntimeError(f"vllm-compat: support replay needs the `support` fix, which is not active here "
                               f"({registry.status()['skipped'].get('support', 'not selected')})")
    return found


# ---- the OpenAI server (API server process only) ---------------------------------------------
# A request asks with ``vllm_xargs: {"vllm_compat_support": 1}`` (extra_body of the openai client);
# each choice of a non-streaming /v1/completions response then carries ``vllm_compat_support``:
# SampledSupport.to_json() (ids as base64 little-endian int32, complement flags, weight versions).

def _choice_supports(final_outputs) -> list:
    """Per response choice, in vLLM's order (requests, then their outputs by index): the JSON support,
    its weight versions as this server reports them (the update route's versions)."""
    from .weights.routes import TRACKER

    found = []
    for res in final_outputs:
        for c in sorted(res.outputs, key=lambda c: c.index):
            s = getattr(c, OUTPUT_ATTR, None)
            if s is not None:
                s = s.to_json()
                s["weight_version"] = [TRACKER.labels.get(v, v) for v in s["weight_version"]]
            found.append(s)
    return found


def _attach(response, supports: list) -> None:
    choices = getattr(response, "choices", None)
    if not choices or len(choices) != len(supports):
        return
    for choice, s in zip(choices, supports):
        if s is not None:
            setattr(choice, OUTPUT_ATTR, s)  # vLLM's response models allow extra fields


def _completion_response(self, final_res_batch, *args, **kwargs):
    response = completion_response_original(self, final_res_batch, *args, **kwargs)
    _attach(response, _choice_supports(final_res_batch))
    return response


def _patch_server(patcher) -> None:
    global completion_response_original
    from ..versions import serving_completion_class

    completion_response_original = patcher.replace(serving_completion_class(), "request_output_to_completion_response",
                                                   _completion_response, expect_params=["self", "final_res_batch"])


sample_tokens_original = update_from_output_original = process_outputs_original = None
new_completion_output_original = add_original = completion_response_original = None


def patch(patcher) -> None:
    global sample_tokens_original, update_from_output_original, process_outputs_original
    global new_completion_output_original, add_original
    from vllm.outputs import RequestOutput
    from vllm.v1.core.sched.scheduler import Scheduler
    from vllm.v1.engine.output_processor import OutputProcessor, RequestState
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    sample_tokens_original = patcher.replace(GPUModelRunner, "sample_tokens", _sample_tokens,
                                             expect_params=["self"])
    update_from_output_original = patcher.replace(Scheduler, "update_from_output", _update_from_output,
                                                  expect_params=["self", "scheduler_output", "model_runner_output"])
    process_outputs_original = patcher.replace(OutputProcessor, "process_outputs", _process_outputs,
                                               expect_params=["self", "engine_core_outputs"])
    new_completion_output_original = patcher.replace(RequestState, "_new_completion_output",
                                                     _new_completion_output, expect_params=["self"])
    add_original = patcher.replace(RequestOutput, "add", _add, expect_params=["self", "next_output", "aggregate"])
    from .weights import is_api_server_process

    if is_api_server_process():
        _patch_server(patcher)


register(Fix(
    name="support",
    summary="support replay: per sampled token, the ids the engine sampled from (opt-in per request)",
    why="a trainer re-applying top-k/top-p/min-p to its own (noisy) logits masks tokens the engine sampled near "
        "a boundary: -inf log-probability, infinite ratio",
    how="extra_args={'vllm_compat_support': True}: the logprobs fix's sampler captures the kept set; it rides "
        "ModelRunnerOutput -> EngineCoreOutput.kv_transfer_params -> CompletionOutput (vllm_compat.sampled_support)",
    upstream="vLLM's return_sampling_mask (0.28+, Model Runner V2, engine-wide, V1 filter order)",
    remove_when="vLLM returns the sampling mask per request from the V1 runner with V0's filter order",
    patch=patch,
    requires=("logprobs",),
))
