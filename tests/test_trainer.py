"""vllm_compat.trainer: support replay on the trainer's side, without an engine.

The engine's processed logprobs (the `logprobs` fix's sampler) are: fp32 logits divided by the
temperature, V0's top-k/top-p (``apply_top_k_top_p``), then min-p, then a log_softmax over the
whole row. ``engine_rows`` below is that computation; given the same logits and the kept set it
produced, ``replay_rows`` must give the same numbers bit for bit."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vllm_compat.trainer import SampledSupport, replay_logprobs, replay_rows, untruncated_logprobs
from vllm_compat.v0_sampling import SamplingSpec, apply_min_p, apply_top_k_top_p, v0_processed_logprobs


def engine_rows(logits, spec: SamplingSpec):
    """The `logprobs` fix's sampler (v0_sample) for rows without penalties or processors."""
    rows, vocab = logits.shape
    x = logits.float() / (1.0 if spec.greedy else spec.temperature)
    if spec.top_k != -1 or spec.top_p < 1.0:
        k = torch.full((rows,), vocab if spec.top_k == -1 else spec.top_k)
        x = apply_top_k_top_p(x, k, torch.full((rows,), spec.top_p))
    if spec.min_p > 0:
        x = apply_min_p(x, torch.full((rows,), spec.min_p))
    return x.log_softmax(dim=-1)


def support_of(rows: torch.Tensor) -> SampledSupport:
    """The engine's encoding (fixes/support.py): kept ids, or dropped ids when more is kept."""
    kept = torch.isfinite(rows)
    ids, comp = [], []
    for row in kept:
        flip = bool(row.sum() * 2 > row.numel())
        ids.append(np.flatnonzero((row ^ flip).numpy()).astype(np.int32))
        comp.append(flip)
    return SampledSupport(ids, comp, [0] * len(ids))


PARAMS = [
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    {"temperature": 0.7, "top_p": 0.8},
    {"temperature": 1.0, "top_p": 0.999},
    {"temperature": 0.9, "min_p": 0.1, "top_p": 0.95},
    {"temperature": 1.3, "top_k": 3},
    {"temperature": 0.6, "min_p": 0.05},
    {"temperature": 1.0},
    {"temperature": 0.0},
]


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("shape", ["peaked", "flat", "ties"])
def test_replay_on_the_engines_logits_is_the_engines_logprobs_bit_for_bit(params, shape):
    g = torch.Generator().manual_seed(hash((shape, str(params))) % 2**31)
    n, vocab = 24, 512
    logits = torch.randn(n, vocab, generator=g) * {"peaked": 4.0, "flat": 0.3, "ties": 1.0}[shape]
    if shape == "ties":
        logits = (logits * 4).round() / 4  # many exact ties, also at the top-k / top-p boundary
    spec = SamplingSpec.from_params(params)
    engine = engine_rows(logits, spec)
    tokens = torch.distributions.Categorical(logits=engine).sample().tolist()
    support = support_of(engine)
    replayed = replay_rows(logits, support, params)
    assert torch.equal(replayed, engine)
    assert torch.equal(replay_logprobs(logits, tokens, support, params),
                       engine.gather(1, torch.tensor(tokens)[:, None])[:, 0])


def test_noisy_trainer_logits_mask_sampled_tokens_unless_the_support_is_replayed():
    """The failure support replay removes: the trainer re-deciding top-p on logits that differ by
    noise drops a token the engine kept (and sampled), so its logprob is -inf."""
    g = torch.Generator().manual_seed(0)
    params = {"temperature": 0.7, "top_p": 0.9}
    spec = SamplingSpec.from_params(params)
    engine_logits = torch.randn(400, 256, generator=g) * 3
    trainer_logits = engine_logits + 0.02 * torch.randn(400, 256, generator=g)  # a bf16-sized noise
    engine = engine_rows(engine_logits, spec)
    # Per row, the engine's least likely kept token: the one a re-decided boundary drops first.
    tokens = engine.masked_fill(~torch.isfinite(engine), float("inf")).argmin(dim=1).tolist()
    recomputed = v0_processed_logprobs(trainer_logits, [spec] * 400).gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert torch.isinf(recomputed).any()  # the trainer masks some of them: infinite ratio
    replayed = replay_logprobs(trainer_logits, tokens, support_of(engine), params)
    assert torch.isfinite(replayed).all()
    exact = engine.gather(1, torch.tensor(tokens)[:, None])[:, 0]
    assert (replayed - exact).abs().max() < 0.1  # the noise only


def test_penalties_and_processors_are_applied_before_the_support():
    g = torch.Generator().manual_seed(1)
    params = {"temperature": 0.8, "top_k": 10, "repetition_penalty": 1.3, "frequency_penalty": 0.2,
              "logit_bias": {"7": 5.0}}
    prompt, completion = [3, 7, 9], [7, 11, 7, 2]
    logits = torch.randn(len(completion), 64, generator=g) * 2
    spec = SamplingSpec.from_params(params)
    outputs = [completion[:t] for t in range(len(completion))]
    processed = v0_processed_logprobs(logits, [spec] * 4, [prompt] * 4, outputs)
    replayed = replay_rows(logits, support_of(processed), params, prompt=prompt, completion=completion)
    # Same kept set, same values up to the candidate-only normaliser of v0_processed_logprobs.
    assert torch.equal(torch.isfinite(replayed), torch.isfinite(processed))
    assert (replayed[torch.isfinite(replayed)] - processed[torch.isfinite(processed)]).abs().max() < 1e-6
    with pytest.raises(ValueError, match="penalties need the prompt"):
        replay_rows(logits, support_of(processed), params)


def test_support_encodings_round_trip_and_refuse_bad_input():
    s = SampledSupport([np.array([1, 5], np.int32), np.array([], np.int32), np.array([0], np.int32)],
                       [False, True, True], [0, 0, 3])
    mask = s.mask(8)
    assert mask[0].nonzero().flatten().tolist() == [1, 5]
    assert mask[1].all() and mask[2].nonzero().flatten().tolist() == list(range(1, 8))
    assert s.kept(2, 8).tolist() == list(range(1, 8))
    back = SampledSupport.from_json(s.to_json())
    assert [t.tolist() for t in back.token_ids] == [t.tolist() for t in s.token_ids]
    assert back.complement == s.complement and back.weight_version == [0, 0, 3]
    with pytest.raises(ValueError, match="outside a vocabulary of 4"):
        s.mask(4)
    with pytest.raises(ValueError, match="differ in length"):
        SampledSupport.from_json({**s.to_json(), "complement": [True]})
    with pytest.raises(ValueError, match="support holds 3 positions"):
        replay_rows(torch.zeros(2, 8), s, {"temperature": 1.0})


def test_untruncated_logprobs_is_the_plain_scaled_softmax():
    logits = torch.randn(5, 32)
    toks = [1, 2, 3, 4, 5]
    expected = torch.log_softmax(logits / 0.7, -1).gather(1, torch.tensor(toks)[:, None])[:, 0]
    assert torch.equal(untruncated_logprobs(logits, toks, 0.7), expected)


def test_the_trainer_module_needs_no_vllm():
    """A trainer process without vLLM: importing vllm_compat.trainer works and patches nothing."""
    code = ("import sys; sys.modules['vllm'] = None\n"
            "import vllm_compat, vllm_compat.trainer\n"
            "assert vllm_compat.applied() == [], vllm_compat.applied()\n"
            "assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules if sys.modules[m] is not None)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_COMPAT")}  # the default selection
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
