import os

# Tests choose their fixes explicitly (vllm_compat.apply); importing vllm_compat must not
# apply the default selection behind their back.
os.environ["VLLM_COMPAT"] = "off"
os.environ.pop("VLLM_COMPAT_ACTIVE", None)
# In-process engines for speed; tests of the multiprocess path set it explicitly.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import pytest  # noqa: E402


@pytest.fixture
def stock():
    """Stock V1: no fix applied (restores the previous selection afterwards)."""
    import vllm_compat

    before = vllm_compat.applied()
    vllm_compat.apply(include=[])
    yield
    vllm_compat.apply(include=before)


@pytest.fixture
def shim():
    """The default fix selection (restores the previous selection afterwards)."""
    import vllm_compat

    before = vllm_compat.applied()
    vllm_compat.apply()
    yield
    vllm_compat.apply(include=before)


def pytest_collection_modifyitems(config, items):
    """`gpu` tests run where CUDA is available and skip cleanly elsewhere; `cpu_only` tests (they
    compare with the CPU V0 fixtures at CPU tolerances) skip where CUDA is available: on a GPU,
    ci/gpu_check.sh checks the same things against the engine's own logits."""
    import torch

    cuda = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="compares with the CPU V0 fixtures at CPU tolerances (GPU: ci/gpu_check.sh)"
                            if cuda else "needs a CUDA GPU")
    for item in items:
        if ("cpu_only" if cuda else "gpu") in item.keywords:
            item.add_marker(skip)
