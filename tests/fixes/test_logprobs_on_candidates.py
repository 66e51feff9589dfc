"""After a top-k, the shim's ``gather_logprobs`` takes the top logprobs and the sampled token's rank
from the top-k candidates alone (the rest of the processed row is -inf). The result equals vLLM's
``gather_logprobs`` on the whole row: token ids, logprobs and ranks. Where equal values meet in the
top list, which of them comes first depends on the row topk scans; such rows take the whole row,
and a test shows that the candidates alone would give other token ids there."""
import pytest
import torch

from vllm_compat.fixes.logprobs import CANDIDATES, gather_on_candidates
from vllm_compat.golden.fixtures import GOLDEN_DIR
from vllm_compat.v0_sampling import top_k_top_p_with_candidates

INF = float("inf")


@pytest.fixture
def vllm_gather(stock):
    from vllm.v1.sample.sampler import Sampler

    return Sampler.gather_logprobs  # vLLM's own (no fix applied)


def _processed(seed: int, ties: bool, rows: int = 48, vocab: int = 4096, k: int = 20, p: float = 0.9):
    """V0's processed logprobs after a top-k/top-p (some candidates dropped by the top-p), with the
    candidates; a sampled token per row among the kept ones."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, vocab, generator=g) * 3
    if ties:
        logits = logits.bfloat16().float()  # bf16 values: equal logits in the top list
    k_row = torch.randint(1, k + 1, (rows,), generator=g)
    k_row[0] = k  # the largest k is the candidates' width
    filtered, candidates = top_k_top_p_with_candidates(logits, k_row, torch.full((rows,), p), k_max=k)
    assert candidates is not None
    processed = filtered.log_softmax(dim=-1)
    kept = processed.gather(1, candidates).isfinite()
    pick = torch.multinomial(kept.float(), 1, generator=g)
    return processed, candidates, candidates.gather(1, pick).squeeze(1)


def _same(a, b) -> bool:  # token ids, logprobs, ranks: bit for bit (NaN equals NaN)
    return all(x.dtype == y.dtype and torch.allclose(x, y, rtol=0, atol=0, equal_nan=True) for x, y in zip(a[:3], b[:3]))


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_candidates_alone_give_vllms_gather_on_the_whole_row(vllm_gather, seed, ties):
    processed, candidates, tokens = _processed(seed, ties)
    for n in (0, 1, 5, 19, 20, 25):  # 20 = every candidate, 25: more than there are
        want = vllm_gather(processed, n, tokens)
        setattr(processed, CANDIDATES, candidates)
        assert _same(gather_on_candidates(vllm_gather, processed, n, tokens), want), n
        delattr(processed, CANDIDATES)


def test_rows_with_ties_in_the_top_list_would_differ_from_the_candidates_alone(vllm_gather):
    """Why tied rows take the whole row: vLLM's topk over the candidates returns other tokens among
    equal values than its topk over the row (the same values, ranks)."""
    differ = 0
    for seed in range(4):
        processed, candidates, tokens = _processed(seed, ties=True)
        want = vllm_gather(processed, 5, tokens)
        place = (candidates == tokens.unsqueeze(1)).to(torch.int8).argmax(dim=1)
        alone = vllm_gather(processed.gather(1, candidates), 5, place)
        assert torch.equal(alone.logprobs, want.logprobs)
        ids = candidates.gather(1, alone.logprob_token_ids.long()).to(torch.int32)
        differ += int((ids != want.logprob_token_ids).any(dim=1).sum())
    assert differ > 0


def test_a_token_outside_the_candidates_and_nan_rows_take_the_whole_row(vllm_gather):
    processed, candidates, tokens = _processed(7, ties=False)
    tokens = tokens.clone()
    dropped = processed.isinf().nonzero()[0]
    tokens[dropped[0]] = dropped[1]  # a -inf token (never drawn; the rank counts every finite entry)
    processed[5, candidates[5, 0]] = float("nan")
    want = vllm_gather(processed, 5, tokens)
    setattr(processed, CANDIDATES, candidates)
    assert _same(gather_on_candidates(vllm_gather, processed, 5, tokens), want)


@pytest.mark.engine
def test_the_engine_takes_the_candidates_path(shim, monkeypatch):
    """The fix is wired: a top-k request's logprobs come through ``gather_on_candidates`` with the
    candidates attached, and greedy rows (no candidates) through vLLM's gather on the row."""
    from vllm import LLM, SamplingParams

    from vllm_compat.fixes import logprobs as fix

    seen = []
    real = fix.gather_on_candidates

    def spy(gather, logprobs, n, token_ids):
        seen.append(getattr(logprobs, CANDIDATES, None) is not None)
        return real(gather, logprobs, n, token_ids)

    monkeypatch.setattr(fix, "gather_on_candidates", spy)
    llm = LLM(model=str(GOLDEN_DIR / "models/llama-fp32"), skip_tokenizer_init=True, dtype="float32", max_model_len=128,
              seed=0, max_logprobs=5)
    prompts = [{"prompt_token_ids": [17, 402, 88, 911]}]
    llm.generate(prompts, SamplingParams(temperature=0.8, top_k=5, max_tokens=3, logprobs=5), use_tqdm=False)
    assert seen and all(seen)
    seen.clear()
    llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=3, logprobs=5), use_tqdm=False)
    assert seen and not any(seen)
