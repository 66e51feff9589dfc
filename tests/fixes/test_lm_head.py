"""lm_head_fp32's fp32 copy of a tied head (CPU): made once, exact, remade after every way
weights are loaded (vllm_compat.update_weights, vLLM's reload_weights, model.load_weights),
and free of host syncs per step."""
import gc

import pytest
import torch
from safetensors.torch import load_file

import vllm_compat
from vllm_compat.fixes import lm_head
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

MODELS = GOLDEN_DIR / "models"
PROMPTS = [[17, 402, 88, 911, 5], [640, 12, 12, 733, 98, 401, 256, 77]]


class Head(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)


class Model(torch.nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.lm_head = Head(weight)


def test_an_fp32_head_is_used_as_it_is():
    head = Head(torch.randn(8, 4))
    assert lm_head.fp32_head_weight(head) is head.weight


def test_the_copy_is_exact_made_once_and_remade_after_a_load():
    model = Model(torch.randn(8, 4).to(torch.bfloat16))
    head = model.lm_head
    first = lm_head.fp32_head_weight(head)
    assert first.dtype == torch.float32 and torch.equal(first, head.weight.float())
    assert lm_head.fp32_head_weight(head) is first  # no conversion at the next step
    with torch.no_grad():
        head.weight.data.copy_(torch.ones(8, 4))  # what weight loaders do: invisible to autograd's counter
    assert lm_head.fp32_head_weight(head) is first  # not seen by itself ...
    lm_head.weights_changed(model)  # ... every load path calls this
    second = lm_head.fp32_head_weight(head)
    assert second is not first and torch.equal(second, torch.ones(8, 4))
    head.weight = torch.nn.Parameter(torch.zeros(8, 4, dtype=torch.bfloat16), requires_grad=False)
    assert torch.equal(lm_head.fp32_head_weight(head), torch.zeros(8, 4))  # a new tensor: seen by itself


def test_the_per_step_path_has_no_host_sync():
    """On the meta device any host sync (.item(), a bool of a tensor, a copy to the host) raises."""
    model = Model(torch.empty(32000, 64, dtype=torch.bfloat16, device="meta"))
    weight = lm_head.fp32_head_weight(model.lm_head)
    hidden = torch.empty(3, 64, dtype=torch.bfloat16, device="meta")
    logits = torch.nn.functional.linear(hidden.to(torch.float32), weight)
    assert logits.device.type == "meta" and logits.dtype == torch.float32
    lm_head.weights_changed(model)
    assert lm_head.fp32_head_weight(model.lm_head) is not weight


def _copy_state(worker) -> dict:
    """The tied head's fp32 copy as the last step used it, against the live weight."""
    head = worker.model_runner.get_model().lm_head
    cached = getattr(head, "_vllm_compat_fp32_copy", None)
    return {"dtype": str(head.weight.dtype), "has_copy": cached is not None,
            "current": cached is not None and torch.equal(cached[1], head.weight.float()),
            "sum": float(head.weight.double().sum())}


def _outputs(llm) -> list:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, logprobs=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), [{t: lp.logprob for t, lp in pos.items()} for pos in o.outputs[0].logprobs])
            for o in outs]


@pytest.mark.engine
def test_tied_fp32_head_copy_follows_every_update_path(shim):
    """qwen2-tied-bf16 (lm_head = the embedding): after each way of loading new weights the next
    step projects with an fp32 copy of the new embedding, and gives what a fresh engine on those
    weights gives, exactly (same values, same kernels)."""
    base_dir, update_dir = MODELS / "qwen2-tied-bf16", MODELS / "qwen2-tied-bf16-update"
    base, update = load_file(str(base_dir / "model.safetensors")), load_file(str(update_dir / "model.safetensors"))
    fresh = verify.make_engine(update_dir, "bfloat16", {"max_model_len": 512})
    try:
        expected = _outputs(fresh)
    finally:
        del fresh
        gc.collect()
    llm = verify.make_engine(base_dir, "bfloat16", {"max_model_len": 512})
    try:
        before = _outputs(llm)
        state = llm.collective_rpc(_copy_state)[0]
        assert state["dtype"] == "torch.bfloat16" and state["has_copy"] and state["current"]
        assert before != expected

        def native_reload(worker):
            worker.model_runner.reload_weights(weights_iterator=iter(update.items()))

        def bare_load(worker):  # V0-era RL code: the embedding alone, through model.load_weights
            worker.model_runner.get_model().load_weights([("model.embed_tokens.weight",
                                                           update["model.embed_tokens.weight"])])

        paths = {"update_weights": lambda: vllm_compat.update_weights(llm, update),
                 "reload_weights": lambda: llm.collective_rpc(native_reload),
                 "load_weights": lambda: llm.collective_rpc(bare_load)}
        for name, path in paths.items():
            vllm_compat.update_weights(llm, base)
            assert _outputs(llm) == before, name
            sum_before = llm.collective_rpc(_copy_state)[0]["sum"]
            path()
            got = _outputs(llm)
            state = llm.collective_rpc(_copy_state)[0]
            assert state["current"] and state["sum"] != sum_before, (name, state)
            if name != "load_weights":  # the others load the whole update
                assert got == expected, name
    finally:
        del llm
        gc.collect()
