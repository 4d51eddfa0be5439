"""Launchers: allocate outputs, pick block sizes and grids, and call the Triton kernels.

Every function here takes and returns plain tensors; autograd and validation live in ``ops`` and
``functional``. Inputs are (N, C, H, W) or (N, C, L) and are read through their strides.
"""

import contextlib
import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton.language as tl

from . import cpu_path
from .kernels import common, heuristics
from .kernels.l2norm import l2norm_backward_kernel, l2norm_forward_kernel
from .kernels.pool_backward import pool_backward_kernel
from .kernels.pool_forward import pool_combine_kernel, pool_finish_kernel, pool_stats_kernel

# Triton's interpreter runs the programs of a grid one after another: pretending the "device"
# has a single multiprocessor keeps grids short, while large maps still take the split path.
INTERPRETER_NUM_SMS = 1
INT32_LIMIT = 2**31 - 1

# Tests set these to force a particular split; ``None`` lets the heuristics choose.
forced_splits: int | None = None
forced_block_s: int | None = None

POOL_IDS = {
    "max": common.MAX.value,
    "avg": common.AVG.value,
    "avgmax": common.AVGMAX.value,
    "catavgmax": common.CATAVGMAX.value,
    "gem": common.GEM.value,
}
# The statistics the one pass over the map gathers for each pooling.
_STATISTICS = {
    "max": (True, False, False),
    "avg": (False, True, False),
    "avgmax": (True, True, False),
    "catavgmax": (True, True, False),
    "gem": (False, False, True),
}


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_NUM_SMS


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _max_offset(tensor: torch.Tensor) -> int:
    return sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def _needs_int64(*tensors: torch.Tensor) -> bool:
    return any(t.numel() > 0 and _max_offset(t) >= INT32_LIMIT for t in tensors)


def as_channels_positions(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``x`` seen as ``x[n, c, s]`` with ``s = h * W + w``: the tensor to read and its strides
    ``(stride_n, stride_c, stride_s)``. Views whose H and W cannot be merged are copied first."""
    if x.dim() == 3:
        return (x, *x.stride())
    _, _, height, width = x.shape
    stride_n, stride_c, stride_h, stride_w = x.stride()
    if width == 1:
        return x, stride_n, stride_c, stride_h
    if height == 1 or stride_h == width * stride_w:
        return x, stride_n, stride_c, stride_w
    return as_channels_positions(x.contiguous())


def channels_are_contiguous(stride_c: int, stride_s: int, positions: int) -> bool:
    """Whether a tile must run along the channels (channels_last) rather than the positions."""
    return stride_c == 1 and (stride_s != 1 or positions == 1)


def _tile_config(
    n: int, c: int, s: int, channels_contiguous: bool, device, lane_words: int
) -> heuristics.TileConfig:
    config = heuristics.tile_config(
        n, c, s, channels_contiguous, _num_sms(device), forced_splits, forced_block_s, lane_words
    )
    if config.grid_size(n) > heuristics.MAX_GRID:
        raise ValueError(
            f"global pool: {n} samples x {c} channels need {config.grid_size(n)} programs, "
            f"more than the {heuristics.MAX_GRID} CUDA allows in one launch"
        )
    return config


class _Validity(NamedTuple):
    """Which positions take part: the kernels' VALIDITY and its pointer and stride arguments."""

    mode: int
    sizes: torch.Tensor
    mask: torch.Tensor
    mask_strides: tuple[int, int]


def _validity(placeholder, sizes, mask) -> _Validity:
    # Unused pointer arguments still need a tensor; any tensor of the launch is a fine stand-in.
    if sizes is not None:
        sizes = sizes.to(torch.int32).contiguous()
        return _Validity(common.SIZES.value, sizes, placeholder, (0, 0))
    if mask is not None:
        # Triton reads bool tensors as 1-bit values; the same bytes as uint8 load plainly.
        mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        return _Validity(common.MASK.value, placeholder, mask, mask.stride())
    return _Validity(common.ALL_POSITIONS.value, placeholder, placeholder, (0, 0))


class PoolForward(NamedTuple):
    """What the forward pass returns. ``pooled`` is (N, C) in the input dtype for max (exact
    values) and (N, C or 2C) in the accumulation dtype otherwise; ``index`` is the int32 first
    maximal position (pools with a max); ``gem_dp`` is d pooled / d p (GeM)."""

    pooled: torch.Tensor
    index: torch.Tensor | None
    gem_dp: torch.Tensor | None


def pool_forward(
    x: torch.Tensor,
    pool: str = "max",
    sizes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gem_p: torch.Tensor | None = None,
    gem_eps: float = 1e-6,
) -> PoolForward:
    """One pass over ``x`` for ``pool`` (see ``kernels/pool_forward.py``)."""
    n, c = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    acc_torch = cpu_path.accumulation_dtype(x.dtype)
    need_max, need_sum, need_gem = _STATISTICS[pool]

    def stats_like(dtype, splits=1):
        return torch.empty((n, splits, c) if splits > 1 else (n, c), dtype=dtype, device=x.device)

    width = 2 * c if pool == "catavgmax" else c
    pooled = stats_like(x.dtype) if pool == "max" else x.new_empty((n, width), dtype=acc_torch)
    index = stats_like(torch.int32) if need_max else None
    gem_dp = stats_like(acc_torch) if need_gem else None
    if n == 0 or c == 0:
        return PoolForward(pooled.zero_(), index, gem_dp)

    source, stride_n, stride_c, stride_s = as_channels_positions(x)
    # 32-bit registers each tile element keeps through the loop: the loaded value, the running
    # statistics, and 64-bit offsets where the map needs them.
    acc_words = 2 if x.dtype == torch.float64 else 1
    lane_words = (
        acc_words
        + need_max * (acc_words + 1)
        + need_sum * acc_words
        + need_gem * 2 * acc_words
        + 2 * _needs_int64(source)
    )
    config = _tile_config(
        n,
        c,
        positions,
        channels_are_contiguous(stride_c, stride_s, positions),
        x.device,
        lane_words,
    )
    splits = config.num_splits
    # The statistics: final results directly with one split, per-split parts otherwise.
    final = {
        "max_val": pooled if pool == "max" else (stats_like(x.dtype) if need_max else None),
        "max_idx": index,
        "sum": stats_like(acc_torch) if need_sum else None,
        "pow_sum": stats_like(acc_torch) if need_gem else None,
        "pow_log_sum": stats_like(acc_torch) if need_gem else None,
    }
    parts = (
        final
        if splits == 1
        else {name: None if t is None else stats_like(t.dtype, splits) for name, t in final.items()}
    )

    def ptr(t):
        return x if t is None else t

    validity = _validity(x, sizes, mask)
    gem_p_arg = ptr(gem_p)
    acc_dtype = _acc_dtype(x.dtype)
    index_64 = _needs_int64(source, *[t for t in parts.values() if t is not None])
    flags = dict(NEED_MAX=need_max, NEED_SUM=need_sum, NEED_GEM=need_gem)
    with _device_guard(x):
        pool_stats_kernel[(config.grid_size(n),)](
            source,
            *(ptr(parts[name]) for name in final),
            validity.sizes,
            validity.mask,
            gem_p_arg,
            gem_eps,
            c,
            positions,
            x.shape[-1],
            config.positions_per_split,
            config.num_c_blocks,
            splits,
            stride_n,
            stride_c,
            stride_s,
            *validity.mask_strides,
            BLOCK_C=config.block_c,
            BLOCK_S=config.block_s,
            VALIDITY=validity.mode,
            **flags,
            ACC_DTYPE=acc_dtype,
            INDEX_64=index_64,
            num_warps=config.num_warps,
        )
        block, num_warps = heuristics.row_config(c, acc_words)
        num_c_blocks = heuristics.cdiv(c, block)
        if splits > 1:
            pool_combine_kernel[(n * num_c_blocks,)](
                *(ptr(parts[name]) for name in final),
                *(ptr(final[name]) for name in final),
                c,
                num_c_blocks,
                splits,
                BLOCK_C=block,
                **flags,
                ACC_DTYPE=acc_dtype,
                INDEX_64=index_64,
                num_warps=num_warps,
            )
        if pool != "max":
            counts = valid_counts(x, sizes, mask)
            pool_finish_kernel[(n * num_c_blocks,)](
                ptr(final["max_val"]),
                ptr(final["sum"]),
                ptr(final["pow_sum"]),
                ptr(final["pow_log_sum"]),
                counts,
                gem_p_arg,
                pooled,
                ptr(gem_dp),
                c,
                num_c_blocks,
                BLOCK_C=block,
                POOL=POOL_IDS[pool],
                ACC_DTYPE=acc_dtype,
                INDEX_64=_needs_int64(pooled),
                num_warps=num_warps,
            )
    return PoolForward(pooled, index, gem_dp)


def valid_counts(x: torch.Tensor, sizes: torch.Tensor | None, mask: torch.Tensor | None):
    """Number of valid positions of each sample, in the accumulation dtype."""
    return cpu_path.valid_counts(x, sizes, mask).to(cpu_path.accumulation_dtype(x.dtype))


def gmp_forward(
    x: torch.Tensor, sizes: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax over the valid positions: ``pooled`` (N, C) in ``x.dtype`` and
    ``index`` (N, C) int32, in row-major (h, w) order."""
    result = pool_forward(x, "max", sizes, mask)
    return result.pooled, result.index


def l2norm_forward(
    pooled: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = pooled / max(||pooled||, eps)`` per row, and the norm in the accumulation dtype
    (of ``out_dtype``, which defaults to ``pooled``'s dtype)."""
    out_dtype = out_dtype or pooled.dtype
    n, width = pooled.shape
    out = pooled.new_empty((n, width), dtype=out_dtype)
    norm = pooled.new_empty((n,), dtype=cpu_path.accumulation_dtype(out_dtype))
    if n == 0:
        return out, norm
    if width == 0:
        return out, norm.zero_()
    block, num_warps = heuristics.row_config(width, norm.element_size() // 4)
    with _device_guard(pooled):
        l2norm_forward_kernel[(n,)](
            pooled,
            out,
            norm,
            width,
            eps,
            BLOCK_C=block,
            ACC_DTYPE=_acc_dtype(out_dtype),
            INDEX_64=_needs_int64(pooled),
            num_warps=num_warps,
        )
    return out, norm


def l2norm_backward(
    grad_out: torch.Tensor, pooled: torch.Tensor, norm: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gradient with respect to ``pooled`` of ``l2norm_forward``, in the accumulation dtype."""
    n, width = pooled.shape
    grad_pooled = torch.empty((n, width), dtype=norm.dtype, device=pooled.device)
    if n == 0 or width == 0:
        return grad_pooled
    grad_out = grad_out.contiguous()
    block, num_warps = heuristics.row_config(width, norm.element_size() // 4)
    with _device_guard(pooled):
        l2norm_backward_kernel[(n,)](
            grad_out,
            pooled,
            norm,
            grad_pooled,
            width,
            eps,
            BLOCK_C=block,
            ACC_DTYPE=tl.float64 if norm.dtype == torch.float64 else tl.float32,
            INDEX_64=_needs_int64(pooled),
            num_warps=num_warps,
        )
    return grad_pooled


def pool_backward(
    grad_pooled: torch.Tensor,
    index: torch.Tensor | None,
    pooled: torch.Tensor | None,
    x: torch.Tensor | None,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
    pool: str = "max",
    sizes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gem_p: torch.Tensor | None = None,
    gem_eps: float = 1e-6,
) -> torch.Tensor:
    """The input gradient of ``pool_forward`` (see ``kernels/pool_backward.py``), written in one
    pass in the input's layout family. ``x`` and ``pooled`` are needed for GeM only."""
    grad_x = cpu_path.empty_grad(size, channels_last, dtype, grad_pooled.device)
    n, c = size[0], size[1]
    positions = math.prod(size[2:])
    if grad_x.numel() == 0:
        return grad_x

    target, stride_n, stride_c, stride_s = as_channels_positions(grad_x)
    # The tile of gradients, GeM's loaded input, and 64-bit offsets where needed.
    acc_words = 2 if dtype == torch.float64 else 1
    lane_words = acc_words * (2 if pool == "gem" else 1) + 2 * _needs_int64(grad_x)
    config = _tile_config(
        n,
        c,
        positions,
        channels_are_contiguous(stride_c, stride_s, positions),
        grad_x.device,
        lane_words,
    )
    if x is not None:
        source, *x_strides = as_channels_positions(x)
    else:
        source, x_strides = grad_x, (0, 0, 0)
    validity = _validity(grad_x, sizes, mask)
    counts = valid_counts(grad_x, sizes, mask) if pool != "max" else grad_x
    acc_dtype = _acc_dtype(dtype)

    def ptr(t):
        return grad_x if t is None else t

    with _device_guard(grad_x):
        pool_backward_kernel[(config.grid_size(n),)](
            grad_pooled.contiguous(),
            ptr(index),
            counts,
            ptr(pooled),
            source,
            ptr(gem_p),
            gem_eps,
            target,
            validity.sizes,
            validity.mask,
            c,
            positions,
            size[-1],
            config.positions_per_split,
            config.num_c_blocks,
            config.num_splits,
            stride_n,
            stride_c,
            stride_s,
            *x_strides,
            *validity.mask_strides,
            BLOCK_C=config.block_c,
            BLOCK_S=config.block_s,
            POOL=POOL_IDS[pool],
            VALIDITY=validity.mode,
            ACC_DTYPE=acc_dtype,
            INDEX_64=_needs_int64(target, source),
            num_warps=config.num_warps,
        )
    return grad_x


def gmp_backward(
    grad_pooled: torch.Tensor,
    index: torch.Tensor,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The input gradient of the max: ``grad_pooled[n, c]`` at ``index[n, c]``, zero elsewhere."""
    return pool_backward(grad_pooled, index, None, None, size, channels_last, dtype)
