"""Forward kernels of the global pooling family: max, avg, avgmax, catavgmax and GeM.

The map is viewed as ``x[n, c, s]`` with ``s = h * W + w`` the row-major position, whatever the
memory layout, and read once through its strides (NCHW and channels_last in place). Per (n, c),
over the valid positions ``V`` of sample n (all of them, its top-left ``sizes[n]`` corner of a
padded map, or those its mask marks)::

    max   = max_{s in V} x[n, c, s]          index = first such s in row-major order
    avg   = sum_{s in V} x[n, c, s] / |V|
    gem   = (sum_{s in V} max(x, eps) ** p / |V|) ** (1 / p)
    dgem/dp = gem / p * (sum(v**p log v) / sum(v**p) - log(mean(v**p)) / p),  v = max(x, eps)

    pooled = max | avg | (avg + max) / 2 | [avg, max] (2C values) | gem

NaN wins the max (as ``torch.amax``) and propagates through sums; compiled ``tl.max`` ignores
NaN while the interpreter propagates it, so NaN is tracked explicitly and never given to
``tl.max``. Positions outside ``V`` are never loaded, so padding (NaN included) cannot leak in. A
sample with no valid position pools to 0 (and index ``NO_INDEX``, which no position matches).

Work split (see ``heuristics.py``): a ``pool_stats_kernel`` program owns ``BLOCK_C`` channels of
one sample and one chunk of positions (a "split"). Large maps with few samples use several
splits, combined in order by ``pool_combine_kernel``, which keeps the first-index rule and sums
in a fixed order (deterministic). ``pool_finish_kernel`` turns the statistics into the pooled
vector for every pooling but max, whose statistics already are the result.
"""

import triton
import triton.language as tl

from .common import (
    AVG,
    AVGMAX,
    CATAVGMAX,
    GEM,
    MASK,
    NO_INDEX,
    SIZES,
    clamp_min_keep_nan,
    mask_flags,
    next_columns,
    size_limits,
    wide,
)
from .convert import div_rn, round_to, upcast


@triton.jit
def _take_first_max(cand_val, best_val, best_idx):
    """Whether a candidate replaces the best so far, for candidates seen in increasing position.

    NaN beats every number; between equals (or two NaNs) the earlier position stays. A lane that
    holds nothing yet (``best_idx == NO_INDEX``) takes any candidate, so an all ``-inf`` channel
    still reports its first position.
    """
    cand_nan = cand_val != cand_val
    best_nan = best_val != best_val
    return (best_idx == NO_INDEX) | (cand_val > best_val) | (cand_nan & ~best_nan)


@triton.jit
def pool_stats_kernel(
    x_ptr,
    max_val_ptr,
    max_idx_ptr,
    sum_ptr,
    pow_sum_ptr,
    pow_log_sum_ptr,
    sizes_ptr,
    mask_ptr,
    gem_p_ptr,
    gem_eps,
    C,
    S,
    W,
    positions_per_split,
    num_c_blocks,
    num_splits,
    stride_xn,
    stride_xc,
    stride_xs,
    stride_mask_n,
    stride_mask_s,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    VALIDITY: tl.constexpr,
    NEED_MAX: tl.constexpr,
    NEED_SUM: tl.constexpr,
    NEED_GEM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """One pass over ``x[n, c-block, split]``: the max and its first index (``NEED_MAX``), the
    sum (``NEED_SUM``) and the GeM sums of ``v**p`` and ``v**p log v`` (``NEED_GEM``), written to
    ``[n, split, c]`` of their outputs (with one split, that is ``[n, c]``).

    ``W`` is the padded width, used with ``VALIDITY == SIZES``.
    """
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    pid_ns = pid // num_c_blocks
    split = pid_ns % num_splits
    n = wide(pid_ns // num_splits, INDEX_64)

    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s_begin = split * positions_per_split
    s_end = tl.minimum(s_begin + positions_per_split, S)
    x_rows = x_ptr + n * stride_xn + wide(offs_c, INDEX_64)[:, None] * stride_xc
    if VALIDITY == SIZES:
        width, valid_end = size_limits(sizes_ptr, n, S, W)
        # Rows below the item are never visited.
        s_end = tl.minimum(s_end, valid_end)
        lane_col = (s_begin + tl.arange(0, BLOCK_S)) % W
    if NEED_GEM:
        gem_p = upcast(tl.load(gem_p_ptr), ACC_DTYPE)

    # Each lane accumulates over the positions it visits, so the loop needs no cross-thread
    # reduction; lanes visit positions in increasing order, so a strict ">" keeps the first max.
    best_val = tl.full((BLOCK_C, BLOCK_S), float("-inf"), ACC_DTYPE)
    best_idx = tl.full((BLOCK_C, BLOCK_S), NO_INDEX, tl.int32)
    lane_sum = tl.zeros((BLOCK_C, BLOCK_S), ACC_DTYPE)
    lane_pow = tl.zeros((BLOCK_C, BLOCK_S), ACC_DTYPE)
    lane_pow_log = tl.zeros((BLOCK_C, BLOCK_S), ACC_DTYPE)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = offs_s < s_end
        if VALIDITY == SIZES:
            valid = valid & (lane_col < width)
            lane_col = next_columns(lane_col, BLOCK_S % W, W)
        if VALIDITY == MASK:
            valid = mask_flags(mask_ptr, n, offs_s, valid, stride_mask_n, stride_mask_s)
        mask = c_mask[:, None] & valid[None, :]
        raw = tl.load(
            x_rows + wide(offs_s, INDEX_64)[None, :] * stride_xs, mask=mask, other=float("-inf")
        )
        val = upcast(raw, ACC_DTYPE)
        if NEED_MAX:
            take = mask & _take_first_max(val, best_val, best_idx)
            best_val = tl.where(take, val, best_val)
            best_idx = tl.where(take, offs_s[None, :], best_idx)
        if NEED_SUM:
            lane_sum += tl.where(mask, val, 0.0)
        if NEED_GEM:
            clamped = clamp_min_keep_nan(val, gem_eps)
            log_v = tl.log(clamped)
            v_pow = tl.exp(gem_p * log_v)
            lane_pow += tl.where(mask, v_pow, 0.0)
            lane_pow_log += tl.where(mask, v_pow * log_v, 0.0)

    out_offs = (n * num_splits + split) * C + offs_c
    if NEED_MAX:
        # Reduce the lanes: NaN first, then the largest value, then the lowest index.
        lane_nan = best_val != best_val
        row_has_nan = tl.max(lane_nan.to(tl.int32), axis=1) > 0
        lane_clean = tl.where(lane_nan, float("-inf"), best_val)
        row_max = tl.max(lane_clean, axis=1)
        is_winner = tl.where(row_has_nan[:, None], lane_nan, lane_clean == row_max[:, None])
        row_idx = tl.min(tl.where(is_winner, best_idx, NO_INDEX), axis=1)
        row_val = tl.where(row_has_nan, float("nan"), row_max)
        # Splits are combined first; the combine kernel applies the empty-sample rule then.
        row_val = tl.where((row_idx == NO_INDEX) & (num_splits == 1), 0.0, row_val)
        tl.store(max_val_ptr + out_offs, round_to(row_val, max_val_ptr.dtype.element_ty), c_mask)
        tl.store(max_idx_ptr + out_offs, row_idx, mask=c_mask)
    if NEED_SUM:
        tl.store(sum_ptr + out_offs, tl.sum(lane_sum, axis=1), mask=c_mask)
    if NEED_GEM:
        tl.store(pow_sum_ptr + out_offs, tl.sum(lane_pow, axis=1), mask=c_mask)
        tl.store(pow_log_sum_ptr + out_offs, tl.sum(lane_pow_log, axis=1), mask=c_mask)


@triton.jit
def pool_combine_kernel(
    part_max_val_ptr,
    part_max_idx_ptr,
    part_sum_ptr,
    part_pow_sum_ptr,
    part_pow_log_sum_ptr,
    max_val_ptr,
    max_idx_ptr,
    sum_ptr,
    pow_sum_ptr,
    pow_log_sum_ptr,
    C,
    num_c_blocks,
    num_splits,
    BLOCK_C: tl.constexpr,
    NEED_MAX: tl.constexpr,
    NEED_SUM: tl.constexpr,
    NEED_GEM: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Combine the per-split statistics ``part[n, split, c]`` into ``[n, c]``; one program per
    (sample, channel block). Splits are visited in order: the first index of the max is kept and
    the sums always add up in the same order."""
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    n = wide(pid // num_c_blocks, INDEX_64)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    best_val = tl.full((BLOCK_C,), float("-inf"), ACC_DTYPE)
    best_idx = tl.full((BLOCK_C,), NO_INDEX, tl.int32)
    total = tl.zeros((BLOCK_C,), ACC_DTYPE)
    total_pow = tl.zeros((BLOCK_C,), ACC_DTYPE)
    total_pow_log = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for split in range(num_splits):
        part_offs = (n * num_splits + split) * C + offs_c
        if NEED_MAX:
            val = upcast(tl.load(part_max_val_ptr + part_offs, mask=c_mask), ACC_DTYPE)
            idx = tl.load(part_max_idx_ptr + part_offs, mask=c_mask)
            take = _take_first_max(val, best_val, best_idx)
            best_val = tl.where(take, val, best_val)
            best_idx = tl.where(take, idx, best_idx)
        if NEED_SUM:
            total += tl.load(part_sum_ptr + part_offs, mask=c_mask, other=0.0)
        if NEED_GEM:
            total_pow += tl.load(part_pow_sum_ptr + part_offs, mask=c_mask, other=0.0)
            total_pow_log += tl.load(part_pow_log_sum_ptr + part_offs, mask=c_mask, other=0.0)

    out_offs = n * C + offs_c
    if NEED_MAX:
        # A sample with no valid position pools to 0, never -inf.
        best_val = tl.where(best_idx == NO_INDEX, 0.0, best_val)
        tl.store(max_val_ptr + out_offs, round_to(best_val, max_val_ptr.dtype.element_ty), c_mask)
        tl.store(max_idx_ptr + out_offs, best_idx, mask=c_mask)
    if NEED_SUM:
        tl.store(sum_ptr + out_offs, total, mask=c_mask)
    if NEED_GEM:
        tl.store(pow_sum_ptr + out_offs, total_pow, mask=c_mask)
        tl.store(pow_log_sum_ptr + out_offs, total_pow_log, mask=c_mask)


@triton.jit
def pool_finish_kernel(
    max_val_ptr,
    sum_ptr,
    pow_sum_ptr,
    pow_log_sum_ptr,
    counts_ptr,
    gem_p_ptr,
    pooled_ptr,
    gem_dp_ptr,
    C,
    num_c_blocks,
    BLOCK_C: tl.constexpr,
    POOL: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """From the statistics, the pooled row ``pooled[n, :]`` in the accumulation dtype (C values,
    2C for catavgmax) and, for GeM, ``d pooled / d p``. One program per (sample, channel block);
    ``counts[n]`` is the number of valid positions, and a sample without any pools to 0."""
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    n = wide(pid // num_c_blocks, INDEX_64)
    IS_FP64: tl.constexpr = ACC_DTYPE == tl.float64
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    stat_offs = n * C + offs_c

    count = tl.load(counts_ptr + n)
    has_positions = count > 0
    # Dividing by 1 where there is nothing keeps 0 / 0 out; the result is replaced by 0 below.
    divisor = tl.where(has_positions, count, 1.0)
    if POOL == GEM:
        gem_p = upcast(tl.load(gem_p_ptr), ACC_DTYPE)
        pow_sum = tl.load(pow_sum_ptr + stat_offs, mask=c_mask, other=1.0)
        pow_log_sum = tl.load(pow_log_sum_ptr + stat_offs, mask=c_mask, other=0.0)
        # An empty sample's sum is 0: 1 in its place keeps log(0) and 0 * inf out of the
        # arithmetic (its results are replaced by 0 below).
        pow_sum = tl.where(has_positions, pow_sum, 1.0)
        log_mean = tl.log(div_rn(pow_sum, divisor, IS_FP64))
        pooled = tl.where(has_positions, tl.exp(log_mean / gem_p), 0.0)
        ratio = div_rn(pow_log_sum, pow_sum, IS_FP64)
        gem_dp = tl.where(has_positions, pooled / gem_p * (ratio - log_mean / gem_p), 0.0)
        tl.store(gem_dp_ptr + stat_offs, gem_dp, mask=c_mask)
        tl.store(pooled_ptr + stat_offs, pooled, mask=c_mask)
    else:
        total = tl.load(sum_ptr + stat_offs, mask=c_mask, other=0.0)
        avg = tl.where(has_positions, div_rn(total, divisor, IS_FP64), 0.0)
        if POOL == AVG:
            tl.store(pooled_ptr + stat_offs, avg, mask=c_mask)
        else:
            top = upcast(tl.load(max_val_ptr + stat_offs, mask=c_mask, other=0.0), ACC_DTYPE)
            if POOL == AVGMAX:
                tl.store(pooled_ptr + stat_offs, 0.5 * (avg + top), mask=c_mask)
            if POOL == CATAVGMAX:
                row = n * 2 * C
                tl.store(pooled_ptr + row + offs_c, avg, mask=c_mask)
                tl.store(pooled_ptr + row + C + offs_c, top, mask=c_mask)
