"""No silent bypass: engine settings that route around a fix are refused when the engine is
created (speculative decoding; LoRA with the fp32 head before vLLM 0.26), and check() refuses a
worker running Model Runner V2 while a sampler fix is active."""
import pytest

import vllm_compat
from vllm_compat import versions
from vllm_compat.fixes.logprobs import BypassRefused
from vllm_compat.golden.fixtures import GOLDEN_DIR

MODEL = GOLDEN_DIR / "models/llama-fp32"
NGRAM = {"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 2}


def engine_config(**kwargs):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(MODEL), skip_tokenizer_init=True, max_model_len=512, **kwargs).create_engine_config()


def test_speculative_decoding_is_refused(shim):
    with pytest.raises(BypassRefused, match="speculative decoding bypasses the `logprobs` fix"):
        engine_config(speculative_config=NGRAM)


def test_stock_does_not_refuse_speculative_decoding(stock):
    """The refusal is the shim's: stock vLLM builds the config (or fails for reasons of its own)."""
    try:
        engine_config(speculative_config=NGRAM)
    except Exception as e:  # e.g. a platform without speculative decoding
        assert "vllm-compat" not in str(e)


def test_lora_with_the_patched_fp32_head_is_refused(shim):
    if versions.has_native_head_dtype():
        pytest.skip("vLLM >= 0.26 computes the fp32 head itself (head_dtype), LoRA included")
    with pytest.raises(BypassRefused, match="LogitsProcessorWithLoRA"):
        engine_config(enable_lora=True)


def test_model_runner_v2_fails_check():
    expected = ["defaults", "logprobs"]
    v1 = {"applied": expected, "pid": 1, "model_runner": "vllm.v1.worker.cpu_model_runner.CPUModelRunner"}
    v2 = dict(v1, model_runner="vllm.v1.worker.gpu.model_runner.GPUModelRunner")
    assert vllm_compat._compare(expected, [v1]) == [v1]
    with pytest.raises(vllm_compat.CompatCheckError, match="Model Runner V2"):
        vllm_compat._compare(expected, [v1, v2])
    v2_defaults = dict(v2, applied=["defaults"])
    assert vllm_compat._compare(["defaults"], [v2_defaults]) == [v2_defaults]  # no sampler fix, nothing bypassed
