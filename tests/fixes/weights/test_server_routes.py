"""In-flight updates through a real `vllm serve` (multiprocess, loopback) driven over HTTP.

The test process streams 8 concurrent completions with logprobs through the `openai` client
while a separate trainer process, speaking only HTTP and the weight broadcast, posts updates:
one from a safetensors file, one over a broadcast (`/vllm_compat/join_broadcast` + the Python
`WeightBroadcaster`), and one that is refused (a wrong shape). Every stream must end with
`length`; every token is recomputed with HF transformers from the weights live at its step (KV
from the weights live when it was computed: V0), using the per-choice weight versions the
server returns; the refused update must change nothing. The same run on stock vLLM (fixes off,
dev mode) with vLLM's native `/pause?mode=keep` default (clear_cache) and `/collective_rpc
reload_weights` re-prefills running requests: its tokens miss the V0 recomputation and match
a re-prefill one. The shim also gives vLLM's own `/pause?mode=keep` V0 semantics (no cache
clearing unless asked): a fourth update sent between it and `/resume` passes the V0 check."""
import asyncio
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vllm_compat.golden import verify
from vllm_compat.golden.fixtures import GOLDEN_DIR
from serving import free_port, http, start_server, stop

pytestmark = pytest.mark.engine
MODELS = GOLDEN_DIR / "models"
MODEL = MODELS / "llama-fp32"
BASE = load_file(str(MODEL / "model.safetensors"))
UPDATE = load_file(str(MODELS / "llama-fp32-update/model.safetensors"))
# With the shim the last one is a non-streaming request. The updates are posted when the streams
# this process has parsed reach each planned point; 8 streams, not 32, so that this process keeps
# up with the server on 2 cores (with 32 it fell up to ~180 tokens behind, and the server finished
# the streams before the last update; the pause itself lands within 3 tokens of the route's call).
STREAMS, MAX_TOKENS = 8, 384
LIMIT = verify.THRESHOLDS["float32"]["max_abs_vs_trainer"]
HEADER = {"X-VLLM-Compat-Weight-Versions": "1"}

_load = importlib.util.spec_from_file_location(
    "_weight_updates_load", Path(__file__).parent / "test_weight_updates_load.py")
load_test = importlib.util.module_from_spec(_load)
_load.loader.exec_module(load_test)  # recompute() and hf_models(): the V0 recomputation of the load test

TRAINER = r"""
import json, sys, threading, urllib.request, urllib.error
from datetime import timedelta
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster  # imported before READY: the streams run on meanwhile

base = sys.argv[1]

def post(path, body=None):
    req = urllib.request.Request(base + path, data=json.dumps(body or {}).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")

print("READY", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["kind"] == "file":
        out = post("/vllm_compat/update_weights", {"path": cmd["path"], "version": cmd["version"]})
    elif cmd["kind"] == "join":  # before the streams start: joining is not an update
        joined = {}
        t = threading.Thread(target=lambda: joined.update(r=post("/vllm_compat/join_broadcast", {
            "host": "127.0.0.1", "port": cmd["port"], "name": "trainer", "backend": "gloo", "timeout_s": 60})))
        t.start()
        bc = WeightBroadcaster("127.0.0.1", cmd["port"], num_engine_workers=1, backend="gloo",
                               timeout=timedelta(seconds=60))
        t.join()
        out = joined["r"]
    elif cmd["kind"] == "broadcast":
        done = {}
        t = threading.Thread(target=lambda: done.update(r=post("/vllm_compat/update_weights", {
            "broadcast": "trainer", "version": cmd["version"], "timeout_s": 60})))
        t.start()
        bc.send(load_file(cmd["path"]))
        t.join()
        bc.close()
        out = done["r"]
    elif cmd["kind"] == "native":  # vLLM's own pause (dev mode) around the update: keep mode, no clear_cache
        out = [post("/pause?mode=keep"),
               post("/vllm_compat/update_weights", {"path": cmd["path"], "version": cmd["version"]}),
               post("/resume")]
    elif cmd["kind"] == "stock":  # stock vLLM's own routes (dev mode): native pause default, reload, resume
        pause = post("/pause?mode=keep")
        print(json.dumps({"paused": pause}), flush=True)
        sys.stdin.readline()  # the test counts each stream's tokens while the engine is paused
        out = [pause, post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": cmd["path"]}}),
               post("/resume")]
    print(json.dumps(out), flush=True)
"""


async def _aiter(items):
    for item in items:
        yield item


def weight_set(alpha: float) -> dict[str, torch.Tensor]:
    return {n: BASE[n] + alpha * (UPDATE[n] - BASE[n]) for n in BASE}


def rollout(tmp: Path, stock: bool) -> dict:
    """One server, 8 streams, the trainer's updates at fixed progress points. Returns what the
    checks need: prompts, streamed tokens/logprobs/finish reasons/weight versions, weight states."""
    from openai import AsyncOpenAI

    rng = random.Random(0)
    prompts = [[rng.randrange(1, 1024) for _ in range(rng.randrange(6, 30))] for _ in range(STREAMS)]
    files = {}
    for alpha in (0.5, 1.0, 0.25):
        d = tmp / f"alpha-{alpha}"
        d.mkdir()
        shutil.copy(MODEL / "config.json", d / "config.json")
        save_file(weight_set(alpha), str(d / "model.safetensors"))
        files[alpha] = d / "model.safetensors"
    bad = dict(weight_set(0.9), **{"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)})
    save_file(bad, str(tmp / "bad.safetensors"))
    plan = ([("stock", 1.0, 40)] if stock else
            [("file", 0.5, 40), ("broadcast", 1.0, 100), ("refused", None, 160), ("native", 0.25, 200)])

    port = free_port()
    t0 = time.time()
    # Dev mode: vLLM's own /pause and /resume exist (the shim's routes do not need it: examples/server_rl_loop.py)
    server = start_server(MODEL, port, {"VLLM_COMPAT": "off" if stock else "all", "VLLM_SERVER_DEV_MODE": "1"},
                          log=tmp / "server.log", extra_args=("--served-model-name", "m"))
    started = time.time() - t0
    trainer = subprocess.Popen([sys.executable, "-c", TRAINER, f"http://127.0.0.1:{port}"], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True,
                               env={**{k: v for k, v in os.environ.items() if not k.startswith("VLLM_COMPAT")},
                                    "VLLM_CONFIGURE_LOGGING": "0"})  # vLLM's import logs to stdout otherwise

    # No seeds: stock vLLM's re-prefill of seeded requests rewinds their generator with set_offset,
    # which CPU generators lack (engine core dead; REFERENCE 11). The checks recompute logprobs only.

    def trainer_line() -> str:
        while (line := trainer.stdout.readline()) and not line.startswith(("READY", "{", "[")):
            pass  # anything else a library printed
        return line

    streams = [{"tokens": [], "logprobs": [], "finish": None, "versions": None, "id": None} for _ in prompts]
    results = []
    try:
        assert trainer_line().strip() == "READY"
        status0 = http(port, "/vllm_compat/status")
        bad_requests = [http(port, "/vllm_compat/update_weights", body)[0] for body in (
            {"path": str(files[0.5]), "broadcast": "trainer"}, {"path": str(files[0.5]), "version": "1"},
            {"path": str(files[0.5]), "nope": 1}, {"broadcast": "never-joined"}, {"path": str(tmp / "missing")})]
        joined = None
        if not stock:
            trainer.stdin.write(json.dumps({"kind": "join", "port": free_port()}) + "\n")
            trainer.stdin.flush()
            joined = json.loads(trainer_line())
        # Concurrent updates are serialised, not rejected (the checkpoint's own weights: nothing changes).
        with ThreadPoolExecutor(4) as pool:
            concurrent = list(pool.map(lambda _: http(port, "/vllm_compat/update_weights", {
                "path": str(MODEL / "model.safetensors"), "version": 0}), range(4)))

        async def stream(client, i):
            s = streams[i]
            out = await client.completions.create(
                model="m", prompt=prompts[i], max_tokens=MAX_TOKENS, temperature=1.0, logprobs=0,
                stream=stock or i < STREAMS - 1, extra_headers=HEADER,
                extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
            if not stock and i == STREAMS - 1:  # non-streaming: the versions come on the choice
                # (stock: streamed, the test counts every request's tokens at the pause)
                out.choices[0].finish_reason  # noqa: B018
                out = _aiter([out])
            async for chunk in out:
                s["id"] = chunk.id
                for choice in chunk.choices:
                    if choice.logprobs and choice.logprobs.tokens:
                        s["tokens"] += [int(t.split(":")[1]) for t in choice.logprobs.tokens]
                        s["logprobs"] += choice.logprobs.token_logprobs
                    if choice.finish_reason is not None:
                        s["finish"] = choice.finish_reason
                        s["versions"] = (choice.model_extra or {}).get("weight_versions")

        async def trainer_say(cmd) -> object:
            trainer.stdin.write(json.dumps(cmd) + "\n")
            trainer.stdin.flush()
            return json.loads(await asyncio.to_thread(trainer_line))

        async def main():
            client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0, timeout=600)
            tasks = [asyncio.create_task(stream(client, i)) for i in range(STREAMS)]
            for kind, alpha, at in plan:
                while min(len(s["tokens"]) for s in streams[:-1]) < at:
                    assert not any(t.done() and t.exception() for t in tasks), [t.exception() for t in tasks if t.done()]
                    await asyncio.sleep(0.01)
                if kind == "stock":
                    await trainer_say({"kind": kind, "path": str(files[alpha].parent)})  # paused now
                    await asyncio.sleep(1.0)  # let the streams read what the engine sent before the pause
                    counts = [len(s["tokens"]) for s in streams]
                    trainer.stdin.write("\n")
                    trainer.stdin.flush()
                    out = json.loads(await asyncio.to_thread(trainer_line))
                    results.append((kind, alpha, out, counts))
                else:
                    path = files[alpha] if alpha else tmp / "bad.safetensors"
                    out = await trainer_say({"kind": "file" if kind == "refused" else kind, "path": str(path),
                                             "port": free_port(), "version": 3 if kind == "native" else len(results) + 1})
                    results.append((kind, alpha, out, None))
                print(kind, "at", min(len(s["tokens"]) for s in streams[:-1]), "tokens:", round(time.time() - t1, 2), "s")
            await asyncio.gather(*tasks)
            await client.close()

        t1 = time.time()
        asyncio.run(main())
        rollout_s = time.time() - t1
        status1 = http(port, "/vllm_compat/status")
    finally:
        trainer.kill()
        stop(server)
    return {"prompts": prompts, "streams": streams, "results": results, "status": (status0, status1),
            "bad_requests": bad_requests, "concurrent": concurrent, "joined": joined,
            "seconds": {"server_start": started, "rollout": rollout_s}}


def check_streams(run) -> None:
    for s in run["streams"]:  # every stream ran to its end: none aborted or cut short
        assert s["finish"] == "length" and len(s["tokens"]) == MAX_TOKENS, (s["finish"], len(s["tokens"]))


def worst_errors(run, version_of_token, states) -> dict:
    models = load_test.hf_models(states)
    worst = {"v0": 0.0, "no_update": 0.0, "reprefill": 0.0}
    for i, s in enumerate(run["streams"]):
        engine_lp = torch.tensor(s["logprobs"])
        for mode in worst:
            got = load_test.recompute(models, run["prompts"][i], s["tokens"], version_of_token[i], mode)
            worst[mode] = max(worst[mode], (got - engine_lp).abs().max().item())
    print("max |engine - recomputed| logprob:", worst, run["seconds"])
    return worst


@pytest.fixture(scope="module")
def shim_run(tmp_path_factory):
    return rollout(tmp_path_factory.mktemp("shim"), stock=False)


def test_routes_status_and_results(shim_run):
    (code0, status0), (code1, status1) = shim_run["status"]
    assert code0 == 200 and status0["consistent"] and "weight_updates" in status0["applied"]
    assert status0["engine_processes"] and all(p["applied"] == status0["applied"] for p in status0["engine_processes"])
    assert status0["weight_version"] == 0 and status0["paused"] is False and status0["fenced"] is None
    assert shim_run["bad_requests"] == [400, 400, 400, 409, 422]  # before the streams: nothing changed (version 1 next)
    assert [(c, r["version"]) for c, r in shim_run["concurrent"]] == [(200, 0)] * 4
    assert max(r["seconds"]["waited_for_lock"] for _, r in shim_run["concurrent"]) > 0.001  # one waited its turn
    (k1, _, (c1, r1), _), (k2, _, (c2, r2), _), (k3, _, (c3, r3), _), (k4, _, native, _) = shim_run["results"]
    assert (k1, c1, r1["version"]) == ("file", 200, 1) and r1["tensors"] == len(BASE)
    assert (k2, c2, r2["version"]) == ("broadcast", 200, 2) and r2["tensors"] == len(BASE)
    assert k3 == "refused" and c3 == 422 and r3["changed"] is False and any("shape" in r for r in r3["reasons"])
    assert k4 == "native" and [c for c, _ in native] == [200, 200, 200] and native[1][1]["version"] == 3
    assert code1 == 200 and status1["weight_version"] == 3 and status1["paused"] is False
    assert status1["broadcast_groups"] == ["trainer"] and shim_run["joined"][0] == 200
    assert shim_run["joined"][1]["name"] == "trainer" and shim_run["joined"][1]["world_size"] == 2
    ids = {s["id"] for s in shim_run["streams"]}
    for k, r in zip(("file", "broadcast", "native"), (r1, r2, native[1][1])):
        # every stream was running at each update, keyed by the id the client sees
        assert set(r["in_flight"]) == ids, (k, len(r["in_flight"]), shim_run["seconds"])
        assert all(set(v) == {"0"} and 0 < v["0"] < MAX_TOKENS for v in r["in_flight"].values())


def test_tokens_match_v0_recomputation(shim_run):
    check_streams(shim_run)
    (_, _, (_, r1), _), (_, _, (_, r2), _), _, (_, _, native, _) = shim_run["results"]
    r4 = native[1][1]
    version_of_token = []
    for s in shim_run["streams"]:
        # the response's weight versions agree with what the update routes reported
        starts = [(v["version"], v["start"]) for v in s["versions"]]
        assert starts == [(0, 0), (1, r1["in_flight"][s["id"]]["0"]), (2, r2["in_flight"][s["id"]]["0"]),
                          (3, r4["in_flight"][s["id"]]["0"])], starts
        version_of_token.append([max(k for k, (v, start) in enumerate(starts) if start <= j) for j in range(MAX_TOKENS)])
    states = [BASE, weight_set(0.5), weight_set(1.0), weight_set(0.25)]
    worst = worst_errors(shim_run, version_of_token, states)
    # the refused update (after token 160) changed nothing; vLLM's /pause?mode=keep did not clear caches
    assert worst["v0"] <= LIMIT
    assert worst["no_update"] > 100 * LIMIT and worst["reprefill"] > 100 * LIMIT


@pytest.mark.stock_baseline  # shows the stock engine failing: first CI row (ci/test.sh)
def test_stock_native_pause_reprefills(tmp_path):
    run = rollout(tmp_path, stock=True)
    check_streams(run)
    ((_, _, out, counts),) = run["results"]
    pause, reload, resume = out
    assert pause[0] == reload[0] == resume[0] == 200, out
    version_of_token = [[int(j >= n) for j in range(MAX_TOKENS)] for n in counts]
    worst = worst_errors(run, version_of_token, [BASE, weight_set(1.0)])
    assert worst["reprefill"] <= LIMIT  # vLLM's default: running requests recomputed with the new weights
    assert worst["v0"] > 100 * LIMIT
