"""Asynchronous RL (PipelineRL style) with vllm-compat, on the bundled tiny model (CPU is fine).

Two processes:
  * rollout (this process): AsyncLLM with the shim keeps generating batches; whenever the
    trainer announces new weights it receives them over a process group *while requests are
    in flight* (vllm_compat.update_weights: keep-mode pause, no abort, no cache clear) and
    tags every token with the policy version that sampled it (WeightUpdateResult.in_flight);
  * trainer: an HF model with an fp32 head computes its own logprobs of the rollouts,
    forms GSPO's sequence-level ratio s = exp(mean(logp_trainer - logp_rollout)), takes a
    clipped policy-gradient step on a toy reward and broadcasts the new weights
    (vllm_compat.WeightBroadcaster, gloo on CPU).

Because the engine returns V0-processed logprobs from an fp32 head, the trainer holding
the weights that sampled a sequence gets the engine's logprobs back up to float noise (the
ratio is 1 on-policy): the script checks that for every version it can (weights from the
checkpoint and from broadcasts), and that updates really landed mid-generation, and exits
non-zero otherwise.

With ``--support-replay`` the rollouts sample with T=0.8, top_p=0.9 and ask for the support
(vllm_compat.sampled_support): the trainer computes its logprobs with
vllm_compat.trainer.replay_logprobs on exactly the kept sets the engine sampled from, and each
token's policy version is read from the support (checked against the in-flight reports).

    python examples/async_rl_loop.py [--steps 4] [--model DIR] [--support-replay]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import queue
import random
import socket
import sys
from pathlib import Path

MODEL = Path(__file__).resolve().parents[1] / "tests/golden/models/llama-fp32"
BATCH, MAX_TOKENS, CLIP, PARITY_LIMIT = 8, 24, 0.2, 1e-4


def reward(tokens: list[int]) -> float:
    """Toy task: prefer tokens from the lower half of the vocabulary."""
    return sum(t < 512 for t in tokens) / len(tokens)


# ---- trainer process ------------------------------------------------------------------

def trainer(model_dir: str, port: int, steps: int, rollouts: mp.Queue, control: mp.Queue, final_batch: mp.Queue,
            stats: mp.Queue) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from vllm_compat import WeightBroadcaster

    model = AutoModelForCausalLM.from_pretrained(model_dir).float()
    behaviour = AutoModelForCausalLM.from_pretrained(model_dir).float().eval()  # for the parity check
    snapshots = {0: {n: p.detach().clone() for n, p in model.named_parameters()}}
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    broadcaster = WeightBroadcaster("127.0.0.1", port, num_engine_workers=1, backend="gloo")

    from vllm_compat.trainer import replay_logprobs

    def logprobs(m, seq):
        ids = torch.tensor([seq["prompt"] + seq["tokens"]])
        hidden = m.model(input_ids=ids).last_hidden_state[0, len(seq["prompt"]) - 1:-1]
        logits = hidden.float() @ m.lm_head.weight.float().t()  # fp32 head, like the engine
        if seq["support"] is not None:  # the processed distribution on the engine's kept sets
            return replay_logprobs(logits, seq["tokens"], seq["support"], seq["params"], prompt=seq["prompt"])
        return logits.log_softmax(-1).gather(1, torch.tensor(seq["tokens"])[:, None])[:, 0]

    parity_worst, parity_versions, mixed = 0.0, set(), 0
    for version in range(steps):
        batch = rollouts.get()
        # Parity: a sequence sampled entirely by weights v must get the engine's logprobs back from
        # the trainer holding weights v (whether v came from the checkpoint or a broadcast).
        with torch.no_grad():
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
        snapshots[version + 1] = {n: p.detach().clone() for n, p in model.named_parameters()}
        print(f"trainer: step {version + 1}  mean reward {mean_reward:.3f}  "
              f"parity max|engine - trainer| {parity_worst:.2e} over versions {sorted(parity_versions)}", flush=True)
        control.put(version + 1)  # the rollout side now calls update_weights(engine, group) ...
        broadcaster.send(model.named_parameters())  # ... while this broadcasts
    control.put(None)
    # A last batch sampled entirely by the final (broadcast) weights, checked the same way.
    with torch.no_grad():
        final = [seq for seq in final_batch.get(timeout=300) if set(seq["versions"]) == {steps}]
        for seq in final:
            parity_worst = max(parity_worst, (logprobs(model, seq) - torch.tensor(seq["logprobs"])).abs().max().item())
    if final:
        parity_versions.add(steps)
    stats.put({"parity_worst": parity_worst, "parity_versions": sorted(parity_versions), "mixed_sequences": mixed})
    broadcaster.close()


# ---- rollout process --------------------------------------------------------------------

async def rollout(model_dir: str, port: int, rollouts: mp.Queue, control: mp.Queue, final_batch: mp.Queue,
                  support_replay: bool) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    import vllm_compat

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model_dir, dtype="float32", skip_tokenizer_init=True,
                                                       max_model_len=512))
    await vllm_compat.check(engine)  # every engine process runs the fixes
    group = await vllm_compat.join_weight_broadcast(engine, "127.0.0.1", port)
    state = {"version": 0, "updates_in_flight": 0, "version_mismatches": 0, "sampled_across_updates": 0}
    sampling = {"temperature": 0.8, "top_p": 0.9} if support_replay else {"temperature": 1.0}
    extra = {"vllm_compat_support": True} if support_replay else None
    boundaries: dict[str, list[tuple[int, int]]] = {}  # request id -> [(tokens before update, new version)]
    rng = random.Random(0)

    async def sample(rid: str) -> dict:
        prompt = [rng.randrange(1, 1024) for _ in range(8)]
        params = SamplingParams(**sampling, max_tokens=MAX_TOKENS, ignore_eos=True, logprobs=0, extra_args=extra)
        final = None
        async for out in engine.generate({"prompt_token_ids": prompt}, params, request_id=rid):
            final = out
        c = final.outputs[0]
        # Policy version of every token, from the updates' in-flight reports: token j came from
        # the new weights of the first update that found the request with <= j tokens. Before its
        # first update a request ran on the version before it; with none, on the current one.
        changes = sorted(boundaries.pop(rid, []))
        v, at = (changes[0][1] - 1 if changes else state["version"]), dict(changes)
        versions = []
        for j in range(len(c.token_ids)):
            v = at.get(j, v)
            versions.append(v)
        support = vllm_compat.sampled_support(c)
        state["sampled_across_updates"] += len(set(versions)) > 1
        if support is not None and support.weight_version != versions:  # two accounts of the same fact
            state["version_mismatches"] += 1
        return {"prompt": prompt, "tokens": list(c.token_ids), "versions": versions, "params": sampling,
                "support": support, "logprobs": [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)]}

    async def produce(lane: int):
        b = 0
        while True:
            batch = await asyncio.gather(*(sample(f"l{lane}b{b}s{i}") for i in range(BATCH)))
            try:  # the trainer gets the freshest batch; the engine never waits for the trainer
                while True:
                    rollouts.get_nowait()  # (stale batches nobody took yet are dropped)
            except queue.Empty:
                pass
            rollouts.put_nowait(batch)  # unbounded queue: never blocks the event loop
            b += 1

    producers = [asyncio.create_task(produce(lane)) for lane in range(2)]  # the engine never idles
    try:
        while (announced := await asyncio.to_thread(control.get)) is not None:
            result = await vllm_compat.update_weights(engine, group)
            state["version"] = announced
            for rid, n in result.in_flight.items():
                boundaries.setdefault(rid.rsplit("-", 1)[0], []).append((n, announced))
            state["updates_in_flight"] += any(0 < n < MAX_TOKENS for n in result.in_flight.values())
            print(f"rollout: weights v{announced} loaded with {len(result.in_flight)} requests in flight "
                  f"({result.seconds['total'] * 1e3:.0f} ms)", flush=True)
        for p in producers:
            p.cancel()
        await asyncio.gather(*producers, return_exceptions=True)
        final_batch.put(await asyncio.gather(*(sample(f"final{i}") for i in range(BATCH))))
    finally:
        for p in producers:
            p.cancel()
        engine.shutdown()
    return state


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=str(MODEL))
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--support-replay", action="store_true", help="top-p sampling; the trainer replays the support")
    args = ap.parse_args()
    ctx = mp.get_context("spawn")
    rollouts, control, final_batch, stats = ctx.Queue(), ctx.Queue(), ctx.Queue(), ctx.Queue()
    port = free_port()
    proc = ctx.Process(target=trainer, args=(args.model, port, args.steps, rollouts, control, final_batch, stats))
    proc.start()
    try:
        state = asyncio.run(rollout(args.model, port, rollouts, control, final_batch, args.support_replay))
        updates_in_flight = state["updates_in_flight"]
        result = stats.get(timeout=300)
        proc.join(timeout=60)
    finally:
        proc.kill()
    print(f"done: {args.steps} updates, {updates_in_flight} of them with requests mid-generation; "
          f"{result['mixed_sequences']} sequences mixed policy versions; engine vs trainer logprobs of single-version "
          f"sequences (versions {result['parity_versions']}): max|diff| {result['parity_worst']:.2e} "
          f"(limit {PARITY_LIMIT:g}); {state['sampled_across_updates']} sequences sampled across an update"
          + (f"; support replay: {state['version_mismatches']} sequences whose support versions differ from the "
             f"in-flight reports" if args.support_replay else ""))
    ok = (result["parity_worst"] <= PARITY_LIMIT and args.steps in result["parity_versions"]
          and updates_in_flight > 0 and state["version_mismatches"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; on CPU vLLM would otherwise reserve most of the RAM
    import vllm_compat  # noqa: F401  (before any engine exists: applies the V0 fixes)

    sys.exit(main())
