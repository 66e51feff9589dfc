"""The serving routes' bookkeeping without an engine (the engine side: tests/test_server_routes.py):
which client id and choice an engine request belongs to, how updates become per-choice version
spans, how responses are rewritten (JSON whole, event streams split anywhere), and vLLM's
/pause?mode=keep default."""
import asyncio
import json
from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi")
from vllm_compat.fixes.weights import routes  # noqa: E402


def state(external, index=0, parent=None, n=1, tokens=0):
    detok = SimpleNamespace(num_output_tokens=lambda: tokens)
    return SimpleNamespace(external_req_id=external, request_index=index, parent_req=parent, n=n, detokenizer=detok)


def test_client_key():
    assert routes.client_key(state("cmpl-abc-0")) == ("cmpl-abc", 0)
    assert routes.client_key(state("cmpl-abc-2")) == ("cmpl-abc", 2)  # third prompt of a list, n=1
    parent = SimpleNamespace(external_req_id="cmpl-abc-1", n=3)
    assert routes.client_key(state("ignored", index=2, parent=parent)) == ("cmpl-abc", 5)  # prompt 1, sample 2
    assert routes.client_key(state("chatcmpl-xyz")) == ("chatcmpl-xyz", 0)
    assert routes.client_key(state("chatcmpl-xyz", index=1, parent=SimpleNamespace(
        external_req_id="chatcmpl-xyz", n=2))) == ("chatcmpl-xyz", 1)


def test_tracker_spans():
    tracker = routes.VersionTracker()
    running, waiting, done = state("cmpl-a-0", tokens=5), state("cmpl-b-0"), state("cmpl-c-0", tokens=9)
    for s in (running, waiting, done):
        tracker.started(s)
    engine = SimpleNamespace(output_processor=SimpleNamespace(
        request_states={"a-int": running, "b-int": waiting, "c-int": done}))
    seen = tracker.committed(engine, {"a-int": 5}, 7)
    assert seen == {"cmpl-a": {"0": 5}}  # only requests the workers ran
    assert tracker.version == 7
    assert tracker.take("cmpl-a", 0) == [{"version": 0, "start": 0}, {"version": 7, "start": 5}]
    assert tracker.take("cmpl-b", 0) == [{"version": 7, "start": 0}]  # not scheduled yet: all new weights
    assert tracker.take("cmpl-c", 0) == [{"version": 0, "start": 0}]  # finished in the engine before the update
    assert tracker.take("cmpl-a", 0) is None  # taken once


def run_tagger(messages, spans):
    routes.TRACKER.spans[("cmpl-x", 0)] = [[0, 0], [1, 3]]
    sent = []

    async def send(message):
        sent.append(message)

    async def go():
        tagger = routes._Tagger(send)
        for m in messages:
            await tagger.send(m)

    asyncio.run(go())
    return sent


def test_stream_rewrite_split_anywhere():
    events = [{"id": "cmpl-x", "choices": [{"index": 0, "text": "", "finish_reason": None}]},
              {"id": "cmpl-x", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}]
    raw = b"".join(b"data: " + json.dumps(e, separators=(",", ":")).encode() + b"\n\n" for e in events) + \
        b"data: [DONE]\n\n"
    for cut in (1, 7, len(raw) // 2, len(raw) - 3):
        chunks = [raw[:cut], raw[cut:]]
        sent = run_tagger([{"type": "http.response.start", "status": 200,
                            "headers": [(b"content-type", b"text/event-stream")]}] +
                          [{"type": "http.response.body", "body": c, "more_body": True} for c in chunks] +
                          [{"type": "http.response.body", "body": b"", "more_body": False}], None)
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        docs = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
        assert [d["choices"][0].get("weight_versions") for d in docs] == [
            None, [{"version": 0, "start": 0}, {"version": 1, "start": 3}]], cut
        assert body.endswith(b"data: [DONE]\n\n")


def test_json_rewrite_fixes_length():
    doc = {"id": "cmpl-x", "choices": [{"index": 0, "text": "", "finish_reason": "length"}]}
    raw = json.dumps(doc).encode()
    sent = run_tagger([{"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]},
                       {"type": "http.response.body", "body": raw, "more_body": False}], None)
    start, body = sent
    out = json.loads(body["body"])
    assert out["choices"][0]["weight_versions"][1] == {"version": 1, "start": 3}
    assert dict(start["headers"])[b"content-length"] == str(len(body["body"])).encode()


@pytest.mark.parametrize("query, expected", [
    (b"mode=keep", b"mode=keep&clear_cache=false"),
    (b"mode=keep&clear_cache=true", b"mode=keep&clear_cache=true"),  # the client asked
    (b"mode=abort", b"mode=abort"),
    (b"", b""),
])
def test_keep_pause_default(query, expected):
    scope = {"query_string": query}
    routes._keep_pause_default(scope)
    assert scope["query_string"] == expected
