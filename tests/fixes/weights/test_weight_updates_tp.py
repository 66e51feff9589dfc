"""In-flight updates with tensor_parallel_size=2 (two CPU worker processes, one core each):
each rank validates the full HF tensors and loads its own shard. The golden V0 update
scenarios must pass at verify's thresholds, and a trainer broadcast must reach both ranks."""
import subprocess
import sys

import pytest
from safetensors.torch import load_file

import vllm_compat
from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
MODELS = GOLDEN_DIR / "models"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"

TRAINER = r"""
import sys
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster

host, port, path = sys.argv[1:]
bc = WeightBroadcaster(host, int(port), num_engine_workers=2, backend="gloo")
print(bc.send(load_file(path)), flush=True)
bc.close()
"""


def test_tensor_parallel_updates(shim, monkeypatch):
    import socket

    from vllm import SamplingParams

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    overrides = dict(tensor_parallel_size=2, distributed_executor_backend="mp")
    refs = {f.reference: f for f in golden.load_all(GOLDEN_DIR / "fixtures", MODELS) if f.model == "llama-fp32"}
    llm = verify.make_engine(MODELS / "llama-fp32", "float32", refs["v0"].data["generator"]["engine_args"], **overrides)
    try:
        # Golden parity: both V0 in-flight update scenarios, the shim's update on both ranks.
        rows = verify.verify_on(llm, "llama-fp32", refs, MODELS, ["weight_update_greedy", "weight_update_sampled"],
                                log=lambda s: None)
        assert len(rows) == 2 and all(r.passed for r in rows), [r.failures for r in rows]
        assert all(s["applied"] == vllm_compat.applied() for s in vllm_compat.check(llm))
        # Support replay crosses the multiprocess executor (rank 0's output carries it).
        sampled = llm.generate([{"prompt_token_ids": [17, 402, 88]}],
                               SamplingParams(temperature=0.8, top_k=20, max_tokens=5, logprobs=0, seed=1,
                                              extra_args={"vllm_compat_support": True}), use_tqdm=False)[0].outputs[0]
        support = vllm_compat.sampled_support(sampled)
        assert len(support) == 5 and all(t in support.kept(i, 512) for i, t in enumerate(sampled.token_ids))

        # A refused update on two ranks changes nothing.
        params = SamplingParams(temperature=0, max_tokens=6, logprobs=3)
        prompt = {"prompt_token_ids": [17, 402, 88, 911, 5]}
        after_update = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        with pytest.raises(vllm_compat.WeightUpdateError, match="shape"):
            vllm_compat.update_weights(llm, dict(load_file(str(UPDATE)), **{"model.embed_tokens.weight":
                                                                        load_file(str(UPDATE))["lm_head.weight"][:5]}))
        # Back to the base weights, then the update again over a process group (world size 3).
        vllm_compat.update_weights(llm, MODELS / "llama-fp32/model.safetensors")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), str(UPDATE)],
                                   stdout=subprocess.PIPE, text=True)
        try:
            group = vllm_compat.join_weight_broadcast(llm, "127.0.0.1", port)
            assert group.world_size == 3
            vllm_compat.update_weights(llm, group)
            trainer.communicate(timeout=120)
        finally:
            trainer.kill()
        again = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
        assert again.token_ids == after_update.token_ids
        assert [{t: lp.logprob for t, lp in p.items()} for p in again.logprobs] == \
            [{t: lp.logprob for t, lp in p.items()} for p in after_update.logprobs]
    finally:
        del llm
