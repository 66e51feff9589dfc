"""Fix ``support`` (support replay) on real V1 engines: the kept set of every sampled token, from
``LLM`` (in-process) and ``AsyncLLM`` (engine core in its own process: the msgpack path), with
the weight version. The trainer side's bit-level check against the engine's own logits is here;
the trainer reference on V1's sequences (finite k3 where the plain recomputation is infinite) is
in ``vllm-compat verify`` (tests/fixes/test_shim_parity.py)."""
import asyncio
import os
import subprocess
import sys

import pytest
import torch

import vllm_compat
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR
from vllm_compat.trainer import REQUEST_KEY, replay_logprobs

pytestmark = [pytest.mark.engine]
MODELS = GOLDEN_DIR / "models"
PROMPT = [1, 5, 9, 33, 40, 41, 42, 17, 23]
PARAMS = [
    {"temperature": 0.8, "top_k": 20, "top_p": 0.9},
    {"temperature": 0.7, "top_p": 0.8},
    {"temperature": 0.9, "min_p": 0.1, "top_p": 0.95},
    {"temperature": 1.0},
]


def sampling(params: dict, seed: int, support: bool = True, **kw):
    from vllm import SamplingParams

    extra = {REQUEST_KEY: True} if support else None
    return SamplingParams(max_tokens=16, logprobs=0, seed=seed, extra_args=extra, **params, **kw)


@pytest.fixture(scope="module")
def llm():
    before = vllm_compat.applied()
    vllm_compat.apply()
    engine = verify.make_engine(MODELS / "llama-fp32", "float32", {})
    yield engine
    del engine
    vllm_compat.apply(include=before)


@pytest.fixture
def recorded_logits(monkeypatch):
    """The logits each sampler call receives (row 0: the tests below run one request at a time)."""
    from vllm.v1.sample import sampler as sampler_module

    rows = []
    inner = sampler_module.Sampler.sample

    def sample(self, logits, *args, **kwargs):
        rows.append(logits[0].detach().clone())
        return inner(self, logits, *args, **kwargs)

    monkeypatch.setattr(sampler_module.Sampler, "sample", sample)
    return rows


@pytest.mark.parametrize("params", PARAMS, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
def test_replay_on_the_engines_logits_gives_its_logprobs_bit_for_bit(llm, recorded_logits, params):
    out = llm.generate([{"prompt_token_ids": PROMPT}], [sampling(params, seed=3)], use_tqdm=False)[0]
    comp = out.outputs[0]
    support = vllm_compat.sampled_support(comp)
    tokens = list(comp.token_ids)
    assert support is not None and len(support) == len(tokens) == len(recorded_logits)
    assert out.kv_transfer_params is None  # the transport's key is taken out again
    logits = torch.stack(recorded_logits)
    replayed = replay_logprobs(logits, tokens, support, params, prompt=PROMPT)
    engine = torch.tensor([lp[t].logprob for lp, t in zip(comp.logprobs, tokens)], dtype=torch.float32)
    assert torch.equal(replayed, engine)
    for i, t in enumerate(tokens):
        assert t in support.kept(i, logits.shape[1])
    if "top_k" in params:  # a top-k row lists at most k ids (plus ties)
        assert all(not c and len(ids) <= params["top_k"] for ids, c in zip(support.token_ids, support.complement))
    if params == {"temperature": 1.0}:  # everything kept: the complement, empty
        assert all(c and len(ids) == 0 for ids, c in zip(support.token_ids, support.complement))


def test_asking_changes_nothing_else_and_only_askers_get_it(llm):
    params = PARAMS[0]
    asked, plain = llm.generate([{"prompt_token_ids": PROMPT}] * 2,
                                [sampling(params, seed=5), sampling(params, seed=5, support=False)], use_tqdm=False)
    assert vllm_compat.sampled_support(plain.outputs[0]) is None
    assert list(asked.outputs[0].token_ids) == list(plain.outputs[0].token_ids)
    assert [lp for lp in asked.outputs[0].logprobs] == [lp for lp in plain.outputs[0].logprobs]
    # n > 1: each sequence has its own support.
    (multi,) = llm.generate([{"prompt_token_ids": PROMPT}], [sampling(params, seed=7, n=3)], use_tqdm=False)
    for comp in multi.outputs:
        s = vllm_compat.sampled_support(comp)
        assert len(s) == len(comp.token_ids)
        assert all(t in s.kept(i, 512) for i, t in enumerate(comp.token_ids))


def test_weight_version_of_each_token_under_an_in_flight_update(llm):
    """Tokens sampled before an in-flight update carry the old version, those after it the new."""
    from safetensors.torch import load_file

    engine = llm.llm_engine
    engine.add_request("in-flight", {"prompt_token_ids": PROMPT}, sampling(PARAMS[1], seed=11, ignore_eos=True))
    final = None
    for _ in range(4):
        engine.step()
    before = vllm_compat.last_update(llm)
    start = before.version if before else 0
    vllm_compat.update_weights(llm, load_file(str(MODELS / "llama-fp32" / "model.safetensors")))
    while engine.has_unfinished_requests():
        for o in engine.step():
            final = o if o.finished else final
    versions = vllm_compat.sampled_support(final.outputs[0]).weight_version
    assert len(versions) == 16
    assert versions[:4] == [start] * 4 and versions[4:] == [start + 1] * 12


def test_not_available_where_the_fix_is_off():
    from vllm.outputs import CompletionOutput

    before = vllm_compat.applied()
    vllm_compat.apply(exclude=["logprobs"])  # support builds on it: skipped, with the reason
    try:
        assert "support" not in vllm_compat.applied()
        assert "needs logprobs" in vllm_compat.status()["skipped"]["support"]
        with pytest.raises(RuntimeError, match="support replay needs the `support` fix"):
            vllm_compat.sampled_support(CompletionOutput(0, "", [], None, None))
    finally:
        vllm_compat.apply(include=before)


ASYNC_SCRIPT = r"""
import asyncio, json, sys
import vllm_compat
from vllm import SamplingParams
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.sampling_params import RequestOutputKind
from vllm.v1.engine.async_llm import AsyncLLM

async def main():
    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=sys.argv[1], dtype="float32",
                                                       skip_tokenizer_init=True, max_model_len=512))
    try:
        out = {}
        for kind in ("DELTA", "FINAL_ONLY"):
            sp = SamplingParams(max_tokens=16, logprobs=0, seed=3, temperature=0.8, top_k=20, top_p=0.9, n=2,
                                extra_args={"vllm_compat_support": True}, output_kind=RequestOutputKind[kind])
            seqs = {}
            async for o in engine.generate({"prompt_token_ids": %r}, sp, request_id=kind):
                for c in o.outputs:
                    s = vllm_compat.sampled_support(c)
                    seq = seqs.setdefault(c.index, {"tokens": [], "support": []})
                    seq["tokens"] += list(c.token_ids)
                    seq["support"] += [t.tolist() for t in s.token_ids]
                    assert len(s) == len(c.token_ids), (kind, len(s), len(c.token_ids))
            out[kind] = seqs
        print("RESULT " + json.dumps(out))
    finally:
        engine.shutdown()

asyncio.run(main())
""" % (PROMPT,)


def test_async_llm_streaming_over_the_engine_core_process(tmp_path):
    """AsyncLLM with its engine core in another process (the support crosses msgpack), streamed
    in DELTA mode and in FINAL_ONLY mode: the same supports, position by position."""
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1", "VLLM_COMPAT": "all"}
    env.pop("VLLM_COMPAT_ACTIVE", None)
    proc = subprocess.run([sys.executable, "-c", ASYNC_SCRIPT, str(MODELS / "llama-fp32")], env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    import json

    out = json.loads(lines[0][len("RESULT "):])
    for index in ("0", "1"):
        delta, final = out["DELTA"][index], out["FINAL_ONLY"][index]
        assert delta == final
        assert len(final["support"]) == len(final["tokens"]) == 16
        assert all(t in ids for t, ids in zip(final["tokens"], final["support"]))
