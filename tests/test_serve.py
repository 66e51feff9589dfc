"""`VLLM_COMPAT=all` reaches the OpenAI server (no import possible there): one completions
request with logprobs and prompt logprobs, checked against the V0 fixture; and the same
request on a stock server misses it. The shim's server is started as users start it,
`VLLM_COMPAT=all vllm serve MODEL`, and takes a V0-style update over HTTP (what `curl` sends)."""
import pytest

from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR
from serving import free_port, http, start_server, stop

pytestmark = [pytest.mark.engine, pytest.mark.cpu_only]  # compares with the CPU V0 fixtures
MODEL = GOLDEN_DIR / "models/llama-fp32"


def serve_and_request(compat: str, body: dict, launcher: str, after=None) -> dict:
    """Start a server (``launcher``: "vllm serve", the console script users run, or "module",
    ``python -m vllm.entrypoints.openai.api_server``), send ``body``, then ``after(port)``."""
    port = free_port()
    proc = start_server(MODEL, port, {"VLLM_COMPAT": compat}, launcher=launcher)
    try:
        status, response = http(port, "/v1/completions", dict(body, model=str(MODEL)))
        assert status == 200, response
        if after is not None:
            after(port)
        return response
    finally:
        stop(proc)


def _lp(value: float) -> float:
    return -float("inf") if value <= -9999.0 else value  # the server clamps -inf to -9999.0


def _as_result(response: dict) -> dict:
    """OpenAI completions response -> the fixture's result format."""
    choice = response["choices"][0]
    lp = choice["logprobs"]
    tokens = [int(t.split(":")[1]) for t in lp["tokens"]]
    positions = [sorted([int(t.split(":")[1]), _lp(v), None] for t, v in top.items()) for top in lp["top_logprobs"]]
    for tok, val, pos in zip(tokens, lp["token_logprobs"], positions):
        if tok not in {e[0] for e in pos}:
            pos.append([tok, _lp(val), None])
    prompt = [None if p is None else sorted([int(t), _lp(e["logprob"]), e["rank"]] for t, e in p.items())
              for p in choice["prompt_logprobs"]]
    return {"prompt_logprobs": prompt, "completions": [{"index": 0, "token_ids": tokens, "logprobs": positions}]}


def _update_over_http(port: int) -> None:
    """What `curl -d '{"path": ..., "version": 7}' .../vllm_compat/update_weights` does."""
    update = GOLDEN_DIR / "models/llama-fp32-update/model.safetensors"
    code, answer = http(port, "/vllm_compat/update_weights", {"path": str(update), "version": 7})
    assert code == 200 and answer["version"] == 7 and answer["tensors"] > 0, answer
    code, answer = http(port, "/vllm_compat/update_weights", {"path": str(update) + ".missing"})
    assert code == 422 and answer["changed"] is False, answer
    code, status = http(port, "/vllm_compat/status")
    assert code == 200 and status["weight_version"] == 7 and status["consistent"] and status["paused"] is False, status


def _support_over_http(port: int, expect: bool, version: int = 0) -> None:
    """Support replay asked the way a client asks (``vllm_xargs`` in the openai client's extra_body)."""
    import openai

    from vllm_compat.trainer import SampledSupport

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
    out = client.completions.create(model=str(MODEL), prompt=[1, 5, 9, 33, 40], max_tokens=8, temperature=0.8,
                                    top_p=0.9, n=2, seed=3, logprobs=0,
                                    extra_body={"top_k": 20, "ignore_eos": True, "return_tokens_as_token_ids": True,
                                                "vllm_xargs": {"vllm_compat_support": 1}})
    for choice in out.choices:
        extra = (choice.model_extra or {}).get("vllm_compat_support")
        if not expect:
            assert extra is None
            continue
        support = SampledSupport.from_json(extra)
        tokens = [int(t.split(":")[1]) for t in choice.logprobs.tokens]
        assert len(support) == len(tokens) == 8
        assert all(t in support.kept(i, 512) and len(support.token_ids[i]) <= 20 for i, t in enumerate(tokens))
        assert support.weight_version == [version] * 8  # the version the update route was given


def _update_and_support(port: int) -> None:
    _update_over_http(port)
    _support_over_http(port, expect=True, version=7)


@pytest.mark.parametrize("compat, parity, launcher", [
    ("all", True, "vllm serve"),
    pytest.param("off", False, "module", marks=pytest.mark.stock_baseline),  # first CI row (ci/test.sh)
])
def test_served_logprobs_against_v0(compat, parity, launcher):
    fx = golden.load_fixture(GOLDEN_DIR / "fixtures/llama-fp32.v0.json")
    sc = next(s for s in fx.scenarios if s["name"] == "top_p_min_p")
    req = sc["requests"][0]
    body = dict(req["params"], prompt=req["prompt_token_ids"], return_tokens_as_token_ids=True)
    after = _update_and_support if parity else (lambda port: _support_over_http(port, expect=False))
    result = _as_result(serve_and_request(compat, body, launcher, after))
    m = golden.compare_to_reference([result], sc["results"][:1])
    worst = max(m["sampled_max_abs"], m["topk_max_abs"], m["prompt_max_abs"])
    assert m["compared_positions"] >= 1
    if parity:
        assert worst <= verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
    else:
        assert worst > 100 * verify.THRESHOLDS["float32"]["max_abs_vs_v0"]
