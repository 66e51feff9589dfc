"""Activation: selection parsing, apply/revert, idempotency, version and drift refusals."""
import os

import pytest

import vllm_compat
from vllm_compat import registry, versions
from vllm_compat.registry import Fix, InternalsMoved, Patcher


@pytest.fixture(autouse=True)
def restore():
    before = vllm_compat.applied()
    yield
    vllm_compat.apply(include=before)


def test_selection_parsing():
    assert registry.parse_selection("all") == registry.defaults()
    assert registry.parse_selection(None) == registry.defaults()
    assert registry.parse_selection("off") == []
    assert registry.parse_selection("-lm_head_fp32") == [n for n in registry.defaults() if n != "lm_head_fp32"]
    assert registry.parse_selection("logprobs, defaults") == ["defaults", "logprobs"]
    with pytest.raises(ValueError, match="unknown fix 'bogus'"):
        registry.parse_selection("all,-bogus")


def test_apply_is_idempotent_and_exports_the_selection():
    from vllm.v1.sample.sampler import Sampler

    vllm_compat.apply()
    patched = Sampler.sample
    state = vllm_compat.status()
    vllm_compat.apply()
    assert Sampler.sample is patched and vllm_compat.status()["applied"] == state["applied"]
    assert os.environ[registry.ENV_ACTIVE].split(",") == state["applied"]


def test_off_restores_stock_vllm():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample.sampler import Sampler
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    vllm_compat.apply(include=[])
    stock = (Sampler.sample, GPUModelRunner._get_prompt_logprobs_dict, EngineArgs.create_engine_config)
    vllm_compat.apply()
    assert Sampler.sample is not stock[0] and GPUModelRunner._get_prompt_logprobs_dict is not stock[1]
    vllm_compat.apply(include=[])
    assert (Sampler.sample, GPUModelRunner._get_prompt_logprobs_dict, EngineArgs.create_engine_config) == stock
    assert os.environ[registry.ENV_ACTIVE] == ""


def test_single_fix_can_be_excluded():
    vllm_compat.apply(exclude=["lm_head_fp32"])
    assert "lm_head_fp32" not in vllm_compat.applied() and "logprobs" in vllm_compat.applied()


def test_env_selection(monkeypatch):
    monkeypatch.delenv(registry.ENV_ACTIVE, raising=False)
    monkeypatch.setenv(registry.ENV_REQUEST, "-prompt_logprobs")
    assert "prompt_logprobs" not in registry.apply_from_env()["applied"]
    monkeypatch.delenv(registry.ENV_ACTIVE)  # apply() exported it
    monkeypatch.setenv(registry.ENV_REQUEST, "nonsense")
    with pytest.raises(ValueError, match="unknown fix"):
        registry.apply_from_env()
    # A parent's exact selection wins (what engine processes see).
    monkeypatch.setenv(registry.ENV_ACTIVE, "defaults")
    assert registry.apply_from_env()["applied"] == ["defaults"]


def test_unsupported_version_is_refused(monkeypatch):
    from packaging.version import Version

    vllm_compat.apply(include=[])
    monkeypatch.setattr(versions, "vllm_version", lambda: Version("0.9.2"))
    with pytest.raises(versions.UnsupportedVersion, match="supports vLLM"):
        vllm_compat.apply()
    assert vllm_compat.applied() == []
    assert vllm_compat.apply(strict=False)["applied"] == []  # warning, no-op


def test_unverified_release_is_refused_naming_the_nearest_verified(monkeypatch, caplog):
    from packaging.version import Version

    vllm_compat.apply(include=[])
    monkeypatch.delenv(versions.ENV_UNVERIFIED, raising=False)
    monkeypatch.setattr(versions, "VERIFIED", frozenset(Version(v) for v in ("0.15.1", "0.18.1", "0.24.0")))
    monkeypatch.setattr(versions, "vllm_version", lambda: Version("0.19.0"))
    assert versions.is_supported() and not versions.is_verified()
    assert versions.nearest_verified(Version("0.19.0")) == [Version("0.18.1"), Version("0.24.0")]
    assert versions.nearest_verified(Version("0.33.0")) == [Version("0.24.0")]
    with pytest.raises(versions.UnverifiedVersion, match=r"0\.19\.0 has no recorded green.*0\.18\.1 and 0\.24\.0"):
        vllm_compat.apply()
    assert vllm_compat.applied() == []
    assert isinstance(versions.UnverifiedVersion("x"), versions.UnsupportedVersion)
    registry._state.warned_unverified.discard(Version("0.19.0"))
    with caplog.at_level("WARNING", logger=registry.logger.name):
        assert vllm_compat.apply(include=["defaults"], strict=False)["applied"] == ["defaults"]  # warning, applied
    assert "nearest verified: 0.18.1 and 0.24.0" in caplog.text
    # engine processes started from here inherit the acceptance (their plugin applies strictly)
    assert os.environ.get(versions.ENV_UNVERIFIED) == "warn"
    monkeypatch.delenv(versions.ENV_UNVERIFIED)
    assert vllm_compat.status()["verified"] is False
    vllm_compat.apply(include=[])
    monkeypatch.setenv(versions.ENV_UNVERIFIED, "warn")  # what `vllm-compat verify` sets
    assert vllm_compat.apply(include=["defaults"])["applied"] == ["defaults"]
    vllm_compat.apply(include=[])
    monkeypatch.setattr(versions, "vllm_version", lambda: Version("0.24.0"))  # verified: no refusal
    monkeypatch.delenv(versions.ENV_UNVERIFIED)
    assert vllm_compat.apply(include=["defaults"])["applied"] == ["defaults"] and vllm_compat.status()["verified"]


def test_moved_internals_are_refused_and_leave_nothing_patched():
    class Target:
        def method(self, a):
            return a

    def patch(patcher):
        patcher.replace(Target, "method", lambda self, a: -a, expect_params=["self", "a"])
        patcher.replace(Target, "gone", None)  # vLLM moved this one

    registry.register(Fix(name="_drift_probe", summary="", why="", how="", upstream="", remove_when="",
                          patch=patch, default=False))
    try:
        with pytest.raises(InternalsMoved, match="gone not found"):
            vllm_compat.apply(include=["_drift_probe"])
        assert Target().method(3) == 3 and "_drift_probe" not in vllm_compat.applied()
        assert "failed" in vllm_compat.apply(include=["_drift_probe"], strict=False)["skipped"]["_drift_probe"]
    finally:
        registry.FIXES.pop("_drift_probe")


def test_signature_check():
    class Target:
        def method(self, a):
            return a

    with pytest.raises(InternalsMoved, match="lacks parameters"):
        Patcher().replace(Target, "method", None, expect_params=["self", "b"])


def _patched_attributes():
    """Every class attribute the real fixes and the engine hook patch (identity snapshot)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.layers.logits_processor import LogitsProcessor
    from vllm.v1.sample import sampler as sampler_module
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    targets = [(EngineArgs, "create_engine_config"), (LogitsProcessor, "_get_logits"),
               (CPUModelRunner, "load_model"), (sampler_module.Sampler, "sample"),
               (sampler_module.Sampler, "forward"), (sampler_module, "batched_count_greater_than"),
               (GPUModelRunner, "_get_prompt_logprobs_dict")]
    return {f"{registry._qual(o)}.{a}": vars(o).get(a) for o, a in targets}


class _ProbeTarget:
    def method(self):
        return "stock"


@pytest.fixture(params=[InternalsMoved("vLLM moved it"), RuntimeError("boom")], ids=["moved", "other"])
def failing_fix(request):
    """A fix ordered after the real ones that patches something, then raises."""
    error = request.param

    def patch(patcher):
        patcher.replace(_ProbeTarget, "method", lambda self: "patched")
        raise error

    registry.register(Fix(name="_fails_probe", summary="", why="", how="", upstream="", remove_when="",
                          patch=patch, default=False))
    try:
        yield error
    finally:
        registry.FIXES.pop("_fails_probe")


def test_a_failing_fix_undoes_the_whole_apply(failing_fix, monkeypatch):
    vllm_compat.apply(include=[])
    stock = _patched_attributes()
    before = vllm_compat.apply(include=["lm_head_fp32", "logprobs"])["applied"]
    assert before == ["lm_head_fp32", "logprobs"]
    monkeypatch.setenv(registry.ENV_ACTIVE, "exported,before")  # must survive the failed call verbatim
    attributes, skipped = _patched_attributes(), vllm_compat.status()["skipped"]
    # lm_head_fp32 leaves, prompt_logprobs and v0_bf16_params are applied, then the probe fails.
    with pytest.raises(Exception) as e:  # its type and message are checked last
        vllm_compat.apply(include=["logprobs", "prompt_logprobs", "v0_bf16_params", "_fails_probe"])
    assert vllm_compat.applied() == before and vllm_compat.status()["skipped"] == skipped
    assert _patched_attributes() == attributes  # the very objects: lm_head_fp32 re-made, the others gone
    assert _ProbeTarget().method() == "stock"
    assert os.environ[registry.ENV_ACTIVE] == "exported,before"
    assert_names_the_fix(e, failing_fix)
    # The restored selection is a normal one: leaving it reverts everything.
    vllm_compat.apply(include=[])
    assert _patched_attributes() == stock


def test_a_failing_fix_from_nothing_exports_nothing(failing_fix, monkeypatch):
    vllm_compat.apply(include=[])
    stock = _patched_attributes()
    monkeypatch.delenv(registry.ENV_ACTIVE)
    with pytest.raises(Exception) as e:
        vllm_compat.apply(include=["logprobs", "prompt_logprobs", "_fails_probe"])
    assert vllm_compat.applied() == [] and _patched_attributes() == stock  # engine hook not installed
    assert registry.ENV_ACTIVE not in os.environ
    assert_names_the_fix(e, failing_fix)


def assert_names_the_fix(e, error) -> None:
    """InternalsMoved is re-raised naming the fix; any other error keeps its type, with a note."""
    if isinstance(error, InternalsMoved):
        assert e.type is InternalsMoved and e.value.__cause__ is error
        assert str(e.value) == "fix _fails_probe: vLLM moved it"
    else:
        assert e.value is error
        assert any("fix _fails_probe" in n for n in getattr(error, "__notes__", []))


def test_a_failing_fix_is_skipped_when_not_strict(failing_fix, caplog):
    out = vllm_compat.apply(include=["logprobs", "prompt_logprobs", "_fails_probe"], strict=False)
    assert out["applied"] == ["logprobs", "prompt_logprobs"]
    assert out["skipped"]["_fails_probe"] == f"failed: {failing_fix}"
    assert "fix _fails_probe not applied" in caplog.text
    assert _ProbeTarget().method() == "stock"
    assert os.environ[registry.ENV_ACTIVE] == "logprobs,prompt_logprobs"
