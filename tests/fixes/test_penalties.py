"""Penalties: the shim computes vLLM's (= V0's) penalty arithmetic at the tokens each row has seen;
the result equals vLLM's own dense op bit for bit, on V1's inputs (padded prompts, output lists with
async scheduling's -1 placeholders). The V0 reference (v0_sampling.apply_penalties) equals vLLM's
dense op too; dividing by the penalty instead (what the reference did before) does not."""
from types import SimpleNamespace

import pytest
import torch

from vllm_compat.fixes.logprobs import penalties_on_cpu
from vllm_compat.v0_sampling import apply_penalties, apply_penalties_at, bin_counts

INF = float("inf")


def _batch(seed: int, rows: int = 9, vocab: int = 500):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 4
    logits[:, ::11] = 0.0
    logits[0, :7] = -INF
    prompts = [torch.randint(0, vocab, (int(torch.randint(0, 40, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]
    outputs = [torch.randint(0, 60, (int(torch.randint(0, 80, (1,), generator=g)),), generator=g).tolist()
               for _ in range(rows)]  # ids below 60: repeats, so counts above 1
    outputs[2] = outputs[2] + [-1, -1]  # async scheduling's placeholders
    outputs[4] = []  # a row at its first step
    width = max(map(len, prompts))
    md = SimpleNamespace(
        prompt_token_ids=torch.tensor([p + [vocab] * (width - len(p)) for p in prompts], dtype=torch.long),
        repetition_penalties=torch.rand(rows, generator=g) + 0.6,
        frequency_penalties=torch.rand(rows, generator=g) * 4 - 2,
        presence_penalties=torch.rand(rows, generator=g) * 4 - 2,
        no_penalties=False)
    md.repetition_penalties[3] = 1.0
    md.frequency_penalties[3] = md.presence_penalties[3] = 0.0  # a row without penalties in the batch
    return logits, md, prompts, outputs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("seed", range(6))
def test_penalties_at_seen_tokens_equal_vllms_dense_op(seed):
    from vllm.v1.sample.ops.penalties import apply_all_penalties

    logits, md, _, outputs = _batch(seed)
    want = apply_all_penalties(logits.clone(), md.prompt_token_ids, md.presence_penalties, md.frequency_penalties,
                               md.repetition_penalties, outputs)
    got = penalties_on_cpu(logits.clone(), md, outputs)
    assert _same(got, want)
    first_step = [[] for _ in outputs]  # no outputs anywhere yet: the repetition penalty over prompts alone
    want = apply_all_penalties(logits.clone(), md.prompt_token_ids, md.presence_penalties, md.frequency_penalties,
                               md.repetition_penalties, first_step)
    assert _same(penalties_on_cpu(logits.clone(), md, first_step), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_v0_reference_equals_vllms_penalty_arithmetic(dtype):
    from vllm.model_executor.layers.utils import apply_penalties as vllm_apply_penalties

    for seed in range(4):
        logits, md, prompts, outputs = _batch(seed)
        logits = logits.to(dtype)
        outputs = [[t for t in o if t >= 0] for o in outputs]
        vocab = logits.shape[1]
        pad = max(map(len, outputs))
        out_t = torch.tensor([o + [vocab] * (pad - len(o)) for o in outputs], dtype=torch.long)
        rep, freq, pres = (t.to(dtype) for t in (md.repetition_penalties, md.frequency_penalties,
                                                 md.presence_penalties))
        want = vllm_apply_penalties(logits.clone(), md.prompt_token_ids, out_t, pres, freq, rep)
        pc, oc = bin_counts(prompts, vocab), bin_counts(outputs, vocab)
        assert _same(apply_penalties(logits, pc, oc, rep, freq, pres), want)
        seen = (pc > 0) | (oc > 0)
        row, token = seen.nonzero(as_tuple=True)
        assert _same(apply_penalties_at(logits.clone(), row, token, oc[row, token], rep, freq, pres), want)
        if dtype == torch.float32:
            # Companion: dividing a positive logit by the penalty (the reference's old form) is off in the last bit.
            r = torch.where(seen, rep.unsqueeze(1), torch.ones_like(logits))
            divided = torch.where(logits > 0, logits / r, logits * r) - freq.unsqueeze(1) * oc - pres.unsqueeze(1) * (oc > 0)
            assert not _same(divided, want)
