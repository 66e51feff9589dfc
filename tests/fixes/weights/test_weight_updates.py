"""vllm_compat.update_weights on LLM: validated before anything changes, V0-style loading,
derived state refreshed, process-group and custom transports, on one module-scoped engine.
(The golden in-flight update scenarios run through update_weights in
test_shim_parity.)"""
import pytest
import torch
from safetensors.torch import load_file, save_file

import vllm_compat
from vllm_compat.golden.fixtures import GOLDEN_DIR

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
UPDATE = MODELS / "llama-fp32-update/model.safetensors"
PROMPT = {"prompt_token_ids": [17, 402, 88, 911, 5]}


@pytest.fixture(scope="module")
def llm():
    from vllm import LLM

    before = vllm_compat.applied()
    vllm_compat.apply()
    engine = LLM(model=str(MODELS / "llama-fp32"), dtype="float32", skip_tokenizer_init=True, max_model_len=512)
    yield engine
    del engine
    vllm_compat.apply(include=before)


def greedy_logprobs(llm):
    from vllm import SamplingParams

    out = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=4, logprobs=5), use_tqdm=False)[0]
    return [{t: lp.logprob for t, lp in pos.items()} for pos in out.outputs[0].logprobs]


def test_bad_updates_change_nothing(llm, tmp_path):
    base = load_file(str(MODELS / "llama-fp32/model.safetensors"))
    upd = load_file(str(UPDATE))
    before = greedy_logprobs(llm)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(UPDATE.read_bytes()[:1000])
    cases = {
        "not a weight of this model": dict(upd, **{"model.layers.9.mlp.up_proj.weight": upd["model.norm.weight"]}),
        "shape": dict(upd, **{"model.norm.weight": torch.ones(64)}),
        "not floating point": dict(upd, **{"model.norm.weight": torch.ones(128, dtype=torch.int32)}),
        "Error": corrupt,
        "no such file": tmp_path / "missing.safetensors",
    }
    for match, weights in cases.items():
        with pytest.raises(vllm_compat.WeightUpdateError, match=match):
            vllm_compat.update_weights(llm, weights)
        assert greedy_logprobs(llm) == before, match  # nothing changed, engine still serves
    # A good update changes the output; loading the base weights back restores it exactly.
    result = vllm_compat.update_weights(llm, upd)
    assert result.tensors == len(upd) and result.bytes == sum(t.numel() * t.element_size() for t in upd.values())
    assert greedy_logprobs(llm) != before
    vllm_compat.update_weights(llm, list(base.items()))
    assert greedy_logprobs(llm) == before


def test_directory_and_partial_updates(llm, tmp_path):
    before = greedy_logprobs(llm)
    upd = load_file(str(UPDATE))
    save_file({"lm_head.weight": upd["lm_head.weight"]}, str(tmp_path / "part.safetensors"))
    vllm_compat.update_weights(llm, tmp_path)  # a directory; only the head changes
    after = greedy_logprobs(llm)
    assert after != before
    vllm_compat.update_weights(llm, {"lm_head.weight": load_file(str(MODELS / "llama-fp32/model.safetensors"))
                                     ["lm_head.weight"]})
    assert greedy_logprobs(llm) == before


TRAINER = r"""
import sys
from safetensors.torch import load_file
import torch
from vllm_compat import WeightBroadcaster

host, port, *files = sys.argv[1:]
bc = WeightBroadcaster(host, int(port), num_engine_workers=1, backend="gloo", bucket_bytes=1 << 20)
for f in files:
    weights = load_file(f)
    if f.endswith("bad.safetensors"):
        weights["model.norm.weight"] = torch.ones(7)
    print("SENT", bc.send(weights), flush=True)
bc.close()
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_broadcast_from_a_trainer_process(llm, tmp_path):
    """A trainer process (rank 0) broadcasts over gloo: a good update, a bad one (refused,
    nothing changes, the group stays usable), and the base weights back."""
    import subprocess
    import sys

    base_file = MODELS / "llama-fp32/model.safetensors"
    before = greedy_logprobs(llm)
    vllm_compat.update_weights(llm, UPDATE)
    expected = greedy_logprobs(llm)  # what the update gives through the file transport
    vllm_compat.update_weights(llm, base_file)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(UPDATE.read_bytes())

    port = free_port()
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), str(UPDATE), str(bad),
                                str(base_file)], stdout=subprocess.PIPE, text=True)
    try:
        group = vllm_compat.join_weight_broadcast(llm, "127.0.0.1", port)
        assert group.world_size == 2
        result = vllm_compat.update_weights(llm, group)
        assert result.tensors == len(load_file(str(UPDATE)))
        assert greedy_logprobs(llm) == expected
        with pytest.raises(vllm_compat.WeightUpdateError, match="model.norm.weight: shape"):
            vllm_compat.update_weights(llm, group)
        assert greedy_logprobs(llm) == expected
        vllm_compat.update_weights(llm, group)
        assert greedy_logprobs(llm) == before
        out, _ = trainer.communicate(timeout=120)
    finally:
        trainer.kill()
    sent = [int(line.split()[1]) for line in out.splitlines() if line.startswith("SENT ")]  # vLLM logs to stdout too
    assert len(sent) == 3 and sent[0] == result.bytes


def test_transport_of_your_own(llm, tmp_path, monkeypatch):
    """A user transport: a WorkerTransport subclass named "module:Class" in a TransportSpec."""
    (tmp_path / "my_transport.py").write_text(
        "from safetensors.torch import load_file\n"
        "from vllm_compat.fixes.weights.transport import Received, WorkerTransport\n"
        "class Scaled(WorkerTransport):\n"
        "    def receive(self):\n"
        "        t = {n: v * self.params['scale'] for n, v in load_file(self.params['path']).items()}\n"
        "        return Received({n: (tuple(v.shape), v.dtype) for n, v in t.items()}, t)\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # in-process engine: the worker is this process
    before = greedy_logprobs(llm)
    spec = vllm_compat.TransportSpec("my_transport:Scaled", {"path": str(UPDATE), "scale": 1.0})
    vllm_compat.update_weights(llm, spec)
    assert greedy_logprobs(llm) != before
    with pytest.raises(vllm_compat.WeightUpdateError, match="unknown weight transport"):
        vllm_compat.update_weights(llm, vllm_compat.TransportSpec("nope", {}))
    vllm_compat.update_weights(llm, MODELS / "llama-fp32/model.safetensors")
    assert greedy_logprobs(llm) == before
