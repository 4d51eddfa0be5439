"""Backward kernel of the global pooling family: the input gradient, written once.

With ``g`` the gradient of the pooled row (C values, 2C for catavgmax) and ``|V|`` the number of
valid positions of sample n, every position s gets::

    max:        g[c]                 if s == index[n, c]                   else 0
    avg:        g[c] / |V|           if s is valid                         else 0
    avgmax:     (g[c] / 2) / |V|  +  (g[c] / 2 at s == index[n, c])
    catavgmax:  g[c] / |V|  +  (g[C + c] at s == index[n, c])
    gem:        g[c] * gem ** (1 - p) * v ** (p - 1) / |V|    if s is valid and x >= eps
                (v = max(x, eps))

The whole gradient of a channel's max goes to one position, its first maximum (as
``adaptive_max_pool2d`` does). Every element of ``grad_x`` is written by exactly one program:
no atomics, no zero-fill pass, and only GeM reads the input again (its gradient depends on it).
Padding (positions outside ``sizes`` or the mask) gets zero. Work is split as in the forward.
"""

import triton
import triton.language as tl

from .common import (
    AVG,
    AVGMAX,
    CATAVGMAX,
    GEM,
    MASK,
    MAX,
    SIZES,
    clamp_min_keep_nan,
    mask_flags,
    next_columns,
    size_limits,
    wide,
)
from .convert import div_rn, round_to, upcast


@triton.jit
def pool_backward_kernel(
    grad_pooled_ptr,
    max_idx_ptr,
    counts_ptr,
    pooled_ptr,
    x_ptr,
    gem_p_ptr,
    gem_eps,
    grad_x_ptr,
    sizes_ptr,
    mask_ptr,
    C,
    S,
    W,
    positions_per_split,
    num_c_blocks,
    num_splits,
    stride_gn,
    stride_gc,
    stride_gs,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_mask_n,
    stride_mask_s,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    POOL: tl.constexpr,
    VALIDITY: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """``grad_x[n, c-block, split]`` from the gradient of the pooled row, in ``grad_x``'s dtype
    and layout (strides ``stride_g*``); ``x`` (strides ``stride_x*``) is read for GeM only."""
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    pid_ns = pid // num_c_blocks
    split = pid_ns % num_splits
    n = wide(pid_ns // num_splits, INDEX_64)
    IS_FP64: tl.constexpr = ACC_DTYPE == tl.float64
    HAS_MAX: tl.constexpr = (POOL == MAX) | (POOL == AVGMAX) | (POOL == CATAVGMAX)

    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s_begin = split * positions_per_split
    s_end = tl.minimum(s_begin + positions_per_split, S)
    stat_offs = n * C + offs_c

    # Per-channel coefficients: what the max position gets, and what every valid position gets.
    width_of_row = 2 * C if POOL == CATAVGMAX else C
    grad_row = grad_pooled_ptr + n * width_of_row
    grad = upcast(tl.load(grad_row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
    if POOL != MAX:
        count = tl.load(counts_ptr + n)
        has_positions = count > 0
        divisor = tl.where(has_positions, count, 1.0)
    if HAS_MAX:
        winner = tl.load(max_idx_ptr + stat_offs, mask=c_mask, other=-1)
        if POOL == MAX:
            grad_max = grad
        if POOL == AVGMAX:
            grad_max = 0.5 * grad
        if POOL == CATAVGMAX:
            grad_max = upcast(tl.load(grad_row + C + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
    if POOL == AVG:
        grad_each = tl.where(has_positions, div_rn(grad, divisor, IS_FP64), 0.0)
    if POOL == AVGMAX:
        grad_each = tl.where(has_positions, div_rn(0.5 * grad, divisor, IS_FP64), 0.0)
    if POOL == CATAVGMAX:
        grad_each = tl.where(has_positions, div_rn(grad, divisor, IS_FP64), 0.0)
    if POOL == GEM:
        gem_p = upcast(tl.load(gem_p_ptr), ACC_DTYPE)
        gem = tl.load(pooled_ptr + stat_offs, mask=c_mask, other=1.0)
        gem = tl.where(has_positions, gem, 1.0)
        # d gem / d v_s = gem ** (1 - p) * v_s ** (p - 1) / |V|
        grad_each = tl.where(
            has_positions, div_rn(grad * tl.exp((1.0 - gem_p) * tl.log(gem)), divisor, IS_FP64), 0.0
        )
        x_rows = x_ptr + n * stride_xn + wide(offs_c, INDEX_64)[:, None] * stride_xc

    if VALIDITY == SIZES:
        width, valid_end = size_limits(sizes_ptr, n, S, W)
        lane_col = (s_begin + tl.arange(0, BLOCK_S)) % W
    grad_rows = grad_x_ptr + n * stride_gn + wide(offs_c, INDEX_64)[:, None] * stride_gc
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        in_range = offs_s < s_end
        store_mask = c_mask[:, None] & in_range[None, :]
        tile = tl.zeros((BLOCK_C, BLOCK_S), ACC_DTYPE)
        if POOL != MAX:
            # The max alone needs no validity: its index only ever points at a valid position.
            valid = in_range
            if VALIDITY == SIZES:
                valid = valid & (lane_col < width) & (offs_s < valid_end)
                lane_col = next_columns(lane_col, BLOCK_S % W, W)
            if VALIDITY == MASK:
                valid = mask_flags(mask_ptr, n, offs_s, valid, stride_mask_n, stride_mask_s)
            valid_tile = c_mask[:, None] & valid[None, :]
            if POOL == GEM:
                raw = tl.load(
                    x_rows + wide(offs_s, INDEX_64)[None, :] * stride_xs, mask=valid_tile, other=0.0
                )
                x_val = upcast(raw, ACC_DTYPE)
                clamped = clamp_min_keep_nan(x_val, gem_eps)
                local = grad_each[:, None] * tl.exp((gem_p - 1.0) * tl.log(clamped))
                # clamp passes gradient where x >= eps, as torch.clamp's backward does.
                tile = tl.where(valid_tile & (x_val >= gem_eps), local, 0.0)
            else:
                tile = tl.where(valid_tile, grad_each[:, None], 0.0)
        if HAS_MAX:
            tile += tl.where(offs_s[None, :] == winner[:, None], grad_max[:, None], 0.0)
        tl.store(
            grad_rows + wide(offs_s, INDEX_64)[None, :] * stride_gs,
            round_to(tile, grad_x_ptr.dtype.element_ty),
            mask=store_mask,
        )
