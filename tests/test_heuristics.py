"""The work split chosen for both ends of the shape range (pure Python, no kernel runs)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gmp_triton.kernels import heuristics

H200_SMS = 132


@given(
    n=st.integers(1, 512),
    c=st.integers(1, 4096),
    s=st.integers(1, 200_000),
    channels_contiguous=st.booleans(),
    num_sms=st.sampled_from([1, 108, 132]),
)
def test_splits_cover_every_position_once(n, c, s, channels_contiguous, num_sms):
    config = heuristics.tile_config(n, c, s, channels_contiguous, num_sms)
    assert config.block_c & (config.block_c - 1) == 0 and config.block_s & (config.block_s - 1) == 0
    assert config.block_c * config.block_s <= heuristics.TILE_ELEMENTS
    assert config.positions_per_split % config.block_s == 0
    # Splits tile [0, s) without gaps and none is empty.
    assert (config.num_splits - 1) * config.positions_per_split < s
    assert config.num_splits * config.positions_per_split >= s
    assert config.num_c_blocks * config.block_c >= c


@pytest.mark.parametrize("channels_contiguous", [False, True])
@pytest.mark.parametrize(
    "n, c, h, w",
    [(1, 256, 56, 56), (1, 256, 128, 128), (8, 256, 56, 56), (8, 256, 128, 128)],
)
def test_few_samples_with_large_maps_fill_the_gpu(n, c, h, w, channels_contiguous):
    config = heuristics.tile_config(n, c, h * w, channels_contiguous, H200_SMS)
    assert config.grid_size(n) >= 2 * H200_SMS


@pytest.mark.parametrize("channels_contiguous", [False, True])
def test_many_samples_with_small_maps_use_one_split(channels_contiguous):
    config = heuristics.tile_config(256, 2048, 49, channels_contiguous, H200_SMS)
    assert config.num_splits == 1
    assert config.grid_size(256) >= 8 * H200_SMS


def test_tiles_run_along_the_contiguous_axis():
    nchw = heuristics.tile_config(32, 2048, 56 * 56, False, H200_SMS)
    channels_last = heuristics.tile_config(32, 2048, 56 * 56, True, H200_SMS)
    assert nchw.block_s >= 64
    assert channels_last.block_c >= 64
