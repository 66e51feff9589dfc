"""The GPU check (`bash ci/gpu_check.sh`): what the shim does on a CUDA vLLM, one line per check.

Run on one GPU with a CUDA vLLM already installed (default 0.33.0) and vllm-compat on PYTHONPATH.
It never compares GPU outputs with the CPU V0 fixtures (other kernels, other noise): every
logprob is recomputed from the logits the engine itself produced at that step, with the shim's
slow, plain V0 reference (full sort), on the same device. Checks:

  paths            V1 model runner (not Model Runner V2), the logprobs fix's Sampler.sample bound,
                   async scheduling off, prefix caching off, fp32 logits from a bf16 model (fp32 head)
  sampled_logprobs processed sampled logprobs and V0 ranks == the reference on the recorded logits
  prompt_logprobs  processed prompt logprobs == the reference on the recorded prompt logits
  seeded_replay    the seeded tokens == V0's draw replayed from the reference distribution
                   (CUDA: the request generator's exponential race; CPU: vllm_compat.v0_draw)
  graphs_vs_eager  CUDA graphs vs eager, bf16 model + fp32 head: greedy tokens identical (CUDA only)
  update_paths     an in-flight update from a file and over a gloo broadcast into the workers
                   give the same logprobs; updating back restores the original ones
  update_memory    peak extra memory of an update (reported, not gated)
  ray_tp2          tensor_parallel_size=2 on vLLM's Ray executor: check() sees the fixes in both Ray
                   workers, and an update from a file reaches both (the outputs equal a TP=1 engine's
                   after the same update). Needs 2 GPUs and ray; vLLM's CPU platform refuses Ray
                   ("current platform cpu does not support ray": it declares no ray_device_key), so
                   the dry run skips it.

``--dry-run`` runs the same code on the CPU (what CI does, tests/tools/test_gpu_check.py);
the CUDA-only check prints SKIP. Exit status 1 when any check FAILs.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

# The recording hooks below need the engine's worker in this process.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_COMPAT", "all")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "tests" / "golden" / "models"
# Same logits, same fp32 operations; only the kept-set search differs (partial vs full sort), so
# the floor is fp32 rounding of a log-softmax over 1024 entries (measured on the CPU dry run:
# max |delta| 2.4e-7 on 160 steps). The gate leaves a factor 40 above that floor for other kernels.
LOGPROB_GATE = 1e-5
SPECS = {  # name -> SamplingParams keywords (seeded, so a rerun is identical)
    "greedy": dict(temperature=0.0),
    "topk_topp": dict(temperature=0.8, top_k=20, top_p=0.9),
    "topp_minp": dict(temperature=1.2, top_p=0.8, min_p=0.05),
    "minp": dict(temperature=0.7, min_p=0.1),
    "penalties": dict(temperature=0.9, top_k=50, repetition_penalty=1.2, presence_penalty=0.5,
                      frequency_penalty=0.3),
}
PROMPTS = [[17, 402, 88, 911, 5, 77, 3, 250], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
TRAINER = r"""
import sys
from safetensors.torch import load_file
from vllm_compat import WeightBroadcaster
host, port, path = sys.argv[1:]
bc = WeightBroadcaster(host, int(port), num_engine_workers=1, backend="gloo")
bc.send(load_file(path))
bc.close()
"""

results: list[tuple[str, str, str]] = []


def report(name: str, status: str, detail: str) -> None:
    results.append((name, status, detail))
    print(f"{status:<4} {name:<17} {detail}", flush=True)


def check(name):
    """Run one check; an exception is that check's FAIL, not the end of the run."""
    def wrap(fn):
        def run(*args, **kwargs):
            try:
                fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001  reported, the other checks still run
                report(name, "FAIL", f"{type(e).__name__}: {str(e)[:300]}")
        return run
    return wrap


def reference_logprobs(logits, spec, prompt, output):
    """V0's processed distribution, the plain way (full sort), on the logits' device."""
    import torch

    from vllm_compat import v0_sampling as v0

    device, vocab = logits.device, logits.shape[-1]
    x = logits.reshape(1, vocab)
    one = lambda v: torch.tensor([v], dtype=torch.float32, device=device)  # noqa: E731
    if spec.has_penalties:
        x = v0.apply_penalties(x, v0.bin_counts([prompt], vocab, device), v0.bin_counts([output], vocab, device),
                               one(spec.repetition_penalty), one(spec.frequency_penalty), one(spec.presence_penalty))
    x = x.to(torch.float32)
    if not spec.greedy and spec.temperature != 1.0:
        x = x / spec.temperature
    if spec.top_k != -1 or spec.top_p < 1.0:
        k = vocab if spec.top_k == -1 else min(spec.top_k, vocab)
        x = v0.apply_top_k_top_p_sorted(x, torch.tensor([k], device=device), one(spec.top_p))
    if spec.min_p > 0:
        x = v0.apply_min_p(x, one(spec.min_p))
    return torch.log_softmax(x, dim=-1)[0]


class Recorder:
    """Records the logits the engine hands to its sampler and to the prompt-logprobs processing."""

    def __init__(self):
        from vllm.v1.sample.sampler import Sampler

        from vllm_compat.fixes import prompt_logprobs

        self.sampled, self.prompt, self.on = [], [], False
        forward, processing = Sampler.forward, prompt_logprobs._processing

        def recording_forward(sampler, logits, *args, **kwargs):
            if self.on:
                self.sampled.append(logits.detach().clone())
            return forward(sampler, logits, *args, **kwargs)

        def recording_processing(spec, bf16):
            compute = processing(spec, bf16)

            def run(logits):
                if self.on:
                    self.prompt.append(logits.detach().clone())
                return compute(logits)
            return run

        Sampler.forward, prompt_logprobs._processing = recording_forward, recording_processing

    def start(self):
        self.sampled, self.prompt, self.on = [], [], True

    def stop(self):
        self.on = False


def engine(model: str, dtype: str, **extra):
    from vllm import LLM

    kwargs = dict(model=str(MODELS / model), dtype=dtype, skip_tokenizer_init=True, max_model_len=512,
                  max_logprobs=20, **extra)
    import torch

    if torch.cuda.is_available():
        kwargs.setdefault("gpu_memory_utilization", 0.3)
    return LLM(**kwargs)


@check("paths")
def check_paths(llm, recorder):
    import torch
    from vllm import SamplingParams

    def probe(worker):
        runner = worker.model_runner
        return {"runner": f"{type(runner).__module__}.{type(runner).__qualname__}",
                "sample": type(runner.sampler).sample.__module__}

    info = llm.collective_rpc(probe)[0]
    config = llm.llm_engine.vllm_config
    recorder.start()
    llm.generate([{"prompt_token_ids": PROMPTS[0]}], SamplingParams(max_tokens=2, temperature=0.0), use_tqdm=False)
    recorder.stop()
    facts = {
        "V1 model runner": not info["runner"].startswith("vllm.v1.worker.gpu."),
        "fix's Sampler.sample": info["sample"].startswith("vllm_compat."),
        "async scheduling off": not getattr(config.scheduler_config, "async_scheduling", False),
        "prefix caching off": not config.cache_config.enable_prefix_caching,
        "fp32 logits (fp32 head)": recorder.sampled[0].dtype == torch.float32,
    }
    bad = [k for k, ok in facts.items() if not ok]
    report("paths", "FAIL" if bad else "PASS",
           (f"not: {', '.join(bad)}; " if bad else "") + f"runner {info['runner']}, sample from {info['sample']}")


def _compare(returned: dict, ref_row, token: int | None) -> tuple[float, bool]:
    """Max |delta| over the returned entries, and whether the sampled token's rank is V0's."""
    from vllm_compat.v0_sampling import v0_rank

    worst = 0.0
    for tok, lp in returned.items():
        want = float(ref_row[tok])
        if math.isinf(want) or math.isinf(lp.logprob):
            worst = max(worst, 0.0 if want == lp.logprob else math.inf)
        else:
            worst = max(worst, abs(lp.logprob - want))
    rank_ok = token is None or returned[token].rank == v0_rank(ref_row, token)
    return worst, rank_ok


@check("sampled_logprobs")
def check_sampled(llm, recorder, seeded: dict):
    from vllm import SamplingParams

    from vllm_compat.v0_sampling import SamplingSpec

    worst, ranks, steps = 0.0, 0, 0
    for name, params in SPECS.items():
        for prompt in PROMPTS:
            recorder.start()
            out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
                max_tokens=16, logprobs=5, seed=1234, ignore_eos=True, **params), use_tqdm=False)[0].outputs[0]
            recorder.stop()
            tokens = list(out.token_ids)
            if len(recorder.sampled) != len(tokens):
                raise RuntimeError(f"{name}: {len(recorder.sampled)} sampler calls for {len(tokens)} tokens")
            spec = SamplingSpec.from_params(params)
            rows = [reference_logprobs(lg, spec, prompt, tokens[:i]) for i, lg in enumerate(recorder.sampled)]
            if name != "greedy":
                seeded[(name, tuple(prompt))] = (tokens, rows)
            for i, (row, lps) in enumerate(zip(rows, out.logprobs)):
                delta, rank_ok = _compare(lps, row, tokens[i])
                worst, ranks, steps = max(worst, delta), ranks + (not rank_ok), steps + 1
    ok = worst <= LOGPROB_GATE and ranks == 0
    report("sampled_logprobs", "PASS" if ok else "FAIL",
           f"{steps} steps, {len(SPECS)} specs: max |delta| {worst:.2e} (gate {LOGPROB_GATE:g}), {ranks} ranks off")


@check("prompt_logprobs")
def check_prompt(llm, recorder):
    from vllm import SamplingParams

    from vllm_compat.fixes.prompt_logprobs import spec_for

    worst, positions = 0.0, 0
    for name, params in SPECS.items():
        if name == "penalties":  # V0's prompt rows get neutral penalties: nothing new to see
            continue
        prompt = PROMPTS[1]
        sp = SamplingParams(max_tokens=1, prompt_logprobs=5, seed=1, **params)
        recorder.start()
        out = llm.generate([{"prompt_token_ids": prompt}], sp, use_tqdm=False)[0]
        recorder.stop()
        logits = recorder.prompt[0] if recorder.prompt else None
        if logits is None or logits.shape[0] != len(prompt) - 1:
            raise RuntimeError(f"{name}: prompt logits not recorded ({None if logits is None else logits.shape})")
        spec = spec_for(sp)
        for i, lps in enumerate(out.prompt_logprobs[1:]):
            delta, _ = _compare(lps, reference_logprobs(logits[i], spec, prompt, []), None)
            worst, positions = max(worst, delta), positions + 1
    report("prompt_logprobs", "PASS" if worst <= LOGPROB_GATE else "FAIL",
           f"{positions} positions: max |delta| {worst:.2e} (gate {LOGPROB_GATE:g})")


@check("seeded_replay")
def check_seeded(seeded: dict):
    import torch

    from vllm_compat import v0_draw

    if not seeded:
        raise RuntimeError("no seeded run recorded (sampled_logprobs failed first)")
    same = total = 0
    for (name, _), (tokens, rows) in seeded.items():
        device = rows[0].device
        gen = torch.Generator(device=device).manual_seed(1234)
        replay = []
        for row in rows:
            probs = row.softmax(dim=-1)
            if device.type == "cpu":  # V0 on CPU: torch 2.6's MKL exponential stream
                q = v0_draw.exponential_noise(gen, row.shape[-1])
            else:  # V0 on CUDA: the request generator's exponential race
                q = torch.empty_like(probs).exponential_(generator=gen)
            replay.append(int((probs / q).argmax()))
        same += sum(a == b for a, b in zip(replay, tokens))
        total += len(tokens)
    report("seeded_replay", "PASS" if same == total else "FAIL", f"{same}/{total} tokens as V0's draw replayed")


@check("graphs_vs_eager")
def check_graphs(dry_run: bool):
    import torch
    from vllm import SamplingParams

    if dry_run or not torch.cuda.is_available():
        report("graphs_vs_eager", "SKIP", "CUDA only")
        return
    runs = {}
    for eager in (False, True):
        llm = engine("llama-bf16", "bfloat16", enforce_eager=eager)
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                            SamplingParams(max_tokens=32, temperature=0.0, logprobs=5), use_tqdm=False)
        runs[eager] = [(list(o.outputs[0].token_ids), [lp[t].logprob for lp, t in zip(o.outputs[0].logprobs,
                                                                                     o.outputs[0].token_ids)])
                       for o in outs]
        del llm
        torch.cuda.empty_cache()
    same = all(a[0] == b[0] for a, b in zip(runs[False], runs[True]))
    delta = max(abs(x - y) for a, b in zip(runs[False], runs[True]) for x, y in zip(a[1], b[1]))
    report("graphs_vs_eager", "PASS" if same else "FAIL",
           f"greedy tokens {'identical' if same else 'DIFFER'}; max |delta logprob| {delta:.2e} (reported)")


def _greedy_logprobs(llm):
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(max_tokens=8, temperature=0.0, logprobs=3), use_tqdm=False)
    return [[(t, lp[t].logprob) for lp, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]


@check("update_paths")
def check_updates(dry_run: bool):
    import vllm_compat

    original, update = MODELS / "llama-fp32/model.safetensors", MODELS / "llama-fp32-update/model.safetensors"
    llm = engine("llama-fp32", "float32")
    try:
        before = _greedy_logprobs(llm)
        vllm_compat.update_weights(llm, update)
        via_file = _greedy_logprobs(llm)
        vllm_compat.update_weights(llm, original)
        restored = _greedy_logprobs(llm)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        trainer = subprocess.Popen([sys.executable, "-c", TRAINER, "127.0.0.1", str(port), str(update)],
                                   stdout=subprocess.DEVNULL)
        try:
            group = vllm_compat.join_weight_broadcast(llm, "127.0.0.1", port, backend="gloo")
            vllm_compat.update_weights(llm, group)
            trainer.wait(timeout=120)
        finally:
            trainer.kill()
        via_gloo = _greedy_logprobs(llm)
        memory = _update_memory(llm, original)
    finally:
        del llm
    facts = {"the update changed the outputs": via_file != before, "updating back restored them": restored == before,
             "gloo == file": via_gloo == via_file}
    bad = [k for k, ok in facts.items() if not ok]
    report("update_paths", "FAIL" if bad else "PASS", "not: " + ", ".join(bad) if bad else ", ".join(facts))
    report("update_memory", "INFO", memory)


def _update_memory(llm, path) -> str:
    """Peak memory above the level before the update: the device allocator's on CUDA, the
    process's resident set (VmHWM, reset through clear_refs) on CPU."""
    import re

    import torch

    import vllm_compat

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024
    size = Path(path).stat().st_size
    vllm_compat.update_weights(llm, path)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        return f"device peak +{peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint"
    peak = int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024 - base
    return f"host peak +{peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint (CPU: file pages count)"


@check("ray_tp2")
def check_ray(dry_run: bool):
    import importlib.util

    import torch

    import vllm_compat

    if dry_run or torch.cuda.device_count() < 2 or importlib.util.find_spec("ray") is None:
        report("ray_tp2", "SKIP", "needs 2 GPUs and ray (vLLM's CPU platform does not support Ray)")
        return
    update = MODELS / "llama-fp32-update/model.safetensors"
    outputs = {}
    for tp in (2, 1):
        extra = {"tensor_parallel_size": 2, "distributed_executor_backend": "ray"} if tp == 2 else {}
        llm = engine("llama-fp32", "float32", **extra)
        try:
            workers = len(vllm_compat.check(llm))  # raises if a Ray worker lacks the fixes
            vllm_compat.update_weights(llm, update)
            outputs[tp] = (workers, _greedy_logprobs(llm))
        finally:
            del llm
            torch.cuda.empty_cache()
    ok = outputs[2][0] == 2 and [[t for t, _ in r] for r in outputs[2][1]] == [[t for t, _ in r] for r in outputs[1][1]]
    delta = max(abs(a[1] - b[1]) for r2, r1 in zip(outputs[2][1], outputs[1][1]) for a, b in zip(r2, r1))
    report("ray_tp2", "PASS" if ok else "FAIL", f"{outputs[2][0]} Ray workers with the fixes; after the update, greedy "
           f"tokens {'equal' if ok else 'differ from'} TP=1's; max |delta logprob| {delta:.2e} (reported)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="run on the CPU (CUDA-only checks SKIP)")
    ap.add_argument("--only", help="comma-separated check names")
    args = ap.parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run to check the script on the CPU", file=sys.stderr)
        return 2
    import vllm

    import vllm_compat

    only = set(args.only.split(",")) if args.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    start = time.time()
    print(f"vllm-compat GPU check: vLLM {vllm.__version__}, torch {torch.__version__}, "
          f"{'CPU dry run' if args.dry_run else torch.cuda.get_device_name(0)}, fixes {vllm_compat.applied()}",
          flush=True)
    recorder = Recorder()
    if want("paths") or want("sampled_logprobs") or want("prompt_logprobs") or want("seeded_replay"):
        llm = engine("llama-bf16", "bfloat16")
        seeded: dict = {}
        if want("paths"):
            check_paths(llm, recorder)
        if want("sampled_logprobs") or want("seeded_replay"):
            check_sampled(llm, recorder, seeded)
        if want("prompt_logprobs"):
            check_prompt(llm, recorder)
        if want("seeded_replay"):
            check_seeded(seeded)
        del llm
    if want("graphs_vs_eager"):
        check_graphs(args.dry_run)
    if want("update_paths"):
        check_updates(args.dry_run)
    if want("ray_tp2"):
        check_ray(args.dry_run)
    failed = [n for n, s, _ in results if s == "FAIL"]
    print(f"{len(results)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''} "
          f"({time.time() - start:.0f} s)", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
