"""Pure helper: torch 2.6's CPU exponential_ stream (what V0 drew with), reproduced here.
Expected values were printed by torch 2.6.0 in the V0 environment (ci/v0/install.sh):
    g = torch.Generator().manual_seed(seed); torch.empty(1024).exponential_(generator=g)"""
import pytest
import torch

from vllm_compat import v0_draw

TORCH_2_6 = {  # seed -> per call: values at indices 0, 1, 511, 1023
    7: [[1.879826545715332, 0.2323874533176422, 0.5896647572517395, 0.8842908143997192],
        [0.7881654500961304, 2.4041571617126465, 0.06466549634933472, 0.05214708298444748]],
    1020: [[0.6579612493515015, 0.4095378816127777, 0.9868756532669067, 1.1153186559677124],
           [1.9262510538101196, 0.7692694067955017, 1.5792677402496338, 0.4691455066204071]],
}


@pytest.mark.parametrize("seed", sorted(TORCH_2_6))
def test_exponential_noise_matches_torch_2_6_bit_for_bit(seed):
    g = torch.Generator().manual_seed(seed)
    for expected in TORCH_2_6[seed]:
        q = v0_draw.exponential_noise(g, 1024)
        assert q[[0, 1, 511, 1023]].tolist() == expected


def test_the_installed_torch_draws_differently():
    """Companion: this torch's own exponential_ is not V0's stream (why the emulation exists)."""
    if torch.__version__.startswith("2.6."):
        pytest.skip("torch 2.6 is V0's own torch")
    g = torch.Generator().manual_seed(7)
    assert torch.empty(1024).exponential_(generator=g)[[0, 1, 511, 1023]].tolist() != TORCH_2_6[7][0]


def test_take_u32_advances_one_mt19937_word():
    import numpy as np

    g = torch.Generator().manual_seed(3)
    words = [v0_draw.take_u32(g) for _ in range(700)]  # crosses a state regeneration
    rs = np.random.RandomState(3)
    assert words == [int(rs.randint(0, 2**32, dtype=np.uint64)) for _ in range(700)]
