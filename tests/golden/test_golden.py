"""Fixture loading and validation, and the trainer-side reference against V0."""
import json
import shutil

import pytest

from vllm_compat.golden import fixtures as golden
from vllm_compat.golden.fixtures import GOLDEN_DIR, GoldenFixtureError, load_all, load_fixture
from vllm_compat.golden.verify import THRESHOLDS

FIXTURES = GOLDEN_DIR / "fixtures"
MODELS = GOLDEN_DIR / "models"
FP32 = FIXTURES / "llama-fp32.v0.json"


def test_all_committed_fixtures_load():
    fixtures = load_all()
    assert {(f.model, f.reference) for f in fixtures} == {
        ("llama-fp32", "v0"), ("llama-bf16", "v0"), ("llama-bf16", "v0_fp32_head"),
        ("qwen2-tied-bf16", "v0"), ("qwen2-tied-bf16", "v0_fp32_head")}
    for f in fixtures:
        gen = f.data["generator"]
        assert gen["vllm"].startswith("0.8.5") and gen["engine"].startswith("V0")
        assert gen["command"] and gen["torch"] and f.data["model"]["files"]


def _write(tmp_path, data, name="x.json"):
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else json.dumps(data))
    return p


def test_corrupt_json_is_a_clear_error(tmp_path):
    p = _write(tmp_path, FP32.read_text()[:5000])
    with pytest.raises(GoldenFixtureError, match="not valid JSON"):
        load_fixture(p)


def test_wrong_schema_is_refused(tmp_path):
    data = json.loads(FP32.read_text())
    data["schema"] = "vllm-compat-golden/0"
    with pytest.raises(GoldenFixtureError, match="schema"):
        load_fixture(_write(tmp_path, data))


def test_missing_model_file_is_refused(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS / "llama-fp32", models / "llama-fp32")
    (models / "llama-fp32" / "model.safetensors").unlink()
    with pytest.raises(GoldenFixtureError, match="missing"):
        load_fixture(FP32, models)


def test_changed_model_file_is_refused(tmp_path):
    models = tmp_path / "models"
    shutil.copytree(MODELS / "llama-fp32", models / "llama-fp32")
    cfg = models / "llama-fp32" / "config.json"
    cfg.write_text(cfg.read_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'))
    with pytest.raises(GoldenFixtureError, match="does not match the hash"):
        load_fixture(FP32, models)


@pytest.mark.parametrize("breakage, match", [
    (lambda d: d["scenarios"][0]["results"].pop(), "results for"),
    (lambda d: d["scenarios"][0]["results"][0]["completions"][0]["logprobs"][0][0].__setitem__(1, "nan"),
     "bad logprob"),
    (lambda d: d["scenarios"][0]["results"][0]["completions"][0]["logprobs"].pop(), "logprob positions"),
    (lambda d: d.pop("model"), "missing key"),
    (lambda d: d.__setitem__("reference", "v2"), "unknown reference"),
    (lambda d: d["scenarios"][0].pop("results"), "missing key"),
])
def test_structural_damage_is_refused(tmp_path, breakage, match):
    data = json.loads(FP32.read_text())
    breakage(data)
    with pytest.raises(GoldenFixtureError, match=match):
        load_fixture(_write(tmp_path, data))


def test_processing_reference_reproduces_v0_fp32():
    """processing.py + the trainer reference recompute V0's processed logprobs on V0's own
    sequences (fp32 model) within the fp32 threshold: V0's order is reproduced."""
    fx = load_fixture(FP32)
    for sc in fx.scenarios:
        if sc.get("update"):
            continue
        m = golden.compare_to_trainer(sc["results"], golden.decode_trainer(sc["trainer"]), "processed")
        assert m["sampled_max_abs"] <= THRESHOLDS["float32"]["max_abs_vs_trainer"], sc["name"]
        assert m["prompt_max_abs"] <= THRESHOLDS["float32"]["max_abs_vs_trainer"], sc["name"]


def test_raw_logprobs_do_not_match_v0_meaning():
    """Companion: the unprocessed (logits / T) trainer logprobs are far from V0's at T != 1
    or with filters, so the check above can fail."""
    fx = load_fixture(FP32)
    sc = next(s for s in fx.scenarios if s["name"] == "top_p_min_p")
    m = golden.compare_to_trainer(sc["results"], golden.decode_trainer(sc["trainer"]), "scaled")
    assert m["sampled_max_abs"] > 100 * THRESHOLDS["float32"]["max_abs_vs_trainer"]


def test_trainer_reference_recomputed_here_matches_stored(tmp_path):
    """The trainer reference recomputed with the installed transformers/torch agrees with
    the one stored by the generator (transformers 4.51, torch 2.6) on fp32."""
    from vllm_compat.golden.trainer_reference import TrainerReference

    fx = load_fixture(FP32)
    trainer = TrainerReference(MODELS / "llama-fp32")
    for sc in fx.scenarios[:6]:
        fresh = golden.trainer_scores(trainer, sc, sc["results"])
        stored = golden.decode_trainer(sc["trainer"])
        for a, b in zip(fresh, stored):
            for ca, cb in zip(a["completions"], b["completions"]):
                for key in ("scaled", "processed"):
                    for x, y in zip(ca[key], cb[key]):
                        assert golden.abs_diff(x, y) <= THRESHOLDS["float32"]["max_abs_vs_trainer"], sc["name"]
