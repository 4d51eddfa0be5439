"""Hypothesis strategies: feature maps of varied sizes, dtypes, layouts and value patterns."""

import contextlib

import torch
from hypothesis import strategies as st

from gmp_triton import launch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
LAYOUTS = ["contiguous", "channels_last", "sliced"]
# Value patterns chosen to hit the rules: ties (ReLU zeros, small integers, zeroed channels),
# special values, and maps where every value is negative.
VALUE_PATTERNS = ["normal", "relu", "small_integers", "zero_channels", "negative", "special"]


def _values(pattern: str, shape, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if pattern == "relu":
        return x.clamp_min(0)
    if pattern == "small_integers":
        return torch.randint(-2, 3, shape, generator=generator).double()
    if pattern == "zero_channels":
        keep = torch.rand(shape[:2], generator=generator) < 0.5
        return x * keep.view(*shape[:2], *([1] * (len(shape) - 2)))
    if pattern == "negative":
        return -torch.rand(shape, generator=generator, dtype=torch.float64) - 1
    if pattern == "special":
        draw = torch.rand(shape, generator=generator)
        x = torch.where(draw < 0.05, float("nan"), x)
        x = torch.where((draw >= 0.05) & (draw < 0.1), float("inf"), x)
        x = torch.where((draw >= 0.1) & (draw < 0.2), float("-inf"), x)
        # One whole channel of -inf, which must pool to -inf at position 0.
        x[0, 0] = float("-inf")
        return x
    return x


def _lay_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout (a copy, so values never change)."""
    if layout == "channels_last":
        if x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        # A strided view into a larger buffer: every other position along the last axis.
        big = torch.zeros((*x.shape[:-1], 2 * x.shape[-1]), dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x.contiguous()


@st.composite
def feature_maps(draw, max_side: int = 12, dtypes=DTYPES, patterns=VALUE_PATTERNS):
    """A feature map and a description of it for failure messages."""
    rank = draw(st.sampled_from([4, 4, 3]))
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 9))
    if rank == 4:
        spatial = (draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    else:
        spatial = (draw(st.integers(1, 3 * max_side)),)
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(LAYOUTS))
    pattern = draw(st.sampled_from(patterns))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = _lay_out(_values(pattern, (n, c, *spatial), generator).to(dtype), layout)
    return x


# How the kernels cut the positions: the heuristics' own choice, or a forced split into several
# chunks of small tiles, so that the combine step runs on small maps too.
splits = st.one_of(
    st.none(),
    st.tuples(st.integers(2, 5), st.sampled_from([1, 2, 4, 8])),
)


@contextlib.contextmanager
def forced_split(choice):
    """Force ``(num_splits, block_s)`` on the launchers, or leave the heuristics alone."""
    previous = launch.forced_splits, launch.forced_block_s
    if choice is not None:
        launch.forced_splits, launch.forced_block_s = choice
    try:
        yield
    finally:
        launch.forced_splits, launch.forced_block_s = previous
