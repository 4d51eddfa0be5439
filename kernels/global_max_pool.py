"""Triton kernels for global max pooling and the L2-normalised embedding head.

Shapes: the feature map is viewed as ``x[n, c, s]`` with ``s = h * W + w`` the row-major spatial
position, whatever the memory layout, so NCHW (``s`` contiguous) and channels_last (``c``
contiguous) are both read in place through their strides.

Forward, per (n, c)::

    pooled[n, c] = max_s x[n, c, s]
    index[n, c]  = first s, in row-major order, where that maximum is reached
    norm[n]      = sqrt(sum_c pooled[n, c] ** 2)           (fp32, fp64 for fp64 input)
    out[n, c]    = pooled[n, c] / max(norm[n], eps)

Padded batches: only the valid positions of a sample take part (its top-left ``sizes[n]``
corner, or the positions its mask marks); a sample with none pools to 0 and gets no gradient.

NaN wins the max (as ``torch.amax``): a channel holding NaN pools to NaN and ``index`` points at
its first NaN. Compiled ``tl.max`` ignores NaN while the interpreter propagates it, so the kernels
never hand a NaN to ``tl.max``: NaN is tracked explicitly.

Backward, with ``g`` the gradient of ``out``::

    y = pooled / max(norm, eps)
    grad_pooled = (g - y * sum_c(g * y)) / norm   if norm >= eps
                = g / eps                         otherwise
    grad_x[n, c, s] = grad_pooled[n, c] if s == index[n, c] else 0

The whole gradient of a channel goes to one position, as ``adaptive_max_pool2d`` does. Every
element of ``grad_x`` is written exactly once by one program: no atomics, no zero-fill pass.

Work split (see ``heuristics.py``): a forward or scatter program owns ``BLOCK_C`` channels of one
sample and one contiguous chunk of positions (a "split"). Small maps use one split; large maps with
few samples are split along ``s`` so that enough programs run, and ``gmp_combine_kernel`` combines
the splits in order, which keeps the first-index rule. The norm needs a whole row of channels, so
it runs in its own small per-sample kernels on the (N, C) pooled values.
"""

import triton
import triton.language as tl

from .convert import div_rn, round_to, sqrt_rn, upcast

# Marks a lane that has not seen any element yet; larger than any valid position.
NO_INDEX = tl.constexpr(2**31 - 1)

# Which positions of a sample take part in its max (the VALIDITY argument).
ALL_POSITIONS = tl.constexpr(0)
SIZES = tl.constexpr(1)
MASK = tl.constexpr(2)


@triton.jit
def _wide(value, INDEX_64: tl.constexpr):
    # Offsets are computed in int64 only where a tensor can pass 2**31 elements: int32 address
    # arithmetic is cheaper and uses fewer registers.
    if INDEX_64:
        return value.to(tl.int64)
    else:
        return value


@triton.jit
def _clamp_min_keep_nan(value, low):
    # tl.maximum returns the number when the other operand is NaN (the GPU's max instruction
    # does); torch.clamp_min keeps the NaN, and so must the norm of a NaN row.
    return tl.where(value != value, value, tl.maximum(value, low))


@triton.jit
def _zero_if_empty(value, index):
    # A sample with no valid position (a zero size, an all-false mask) pools to 0, never -inf.
    return tl.where(index == NO_INDEX, 0.0, value)


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
def gmp_forward_kernel(
    x_ptr,
    part_val_ptr,
    part_idx_ptr,
    sizes_ptr,
    mask_ptr,
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
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Max and first argmax of ``x[n, c-block, split]``, written to ``part[n, split, c]``.

    ``VALIDITY`` says which positions of a sample take part: all of them (``ALL_POSITIONS``), the
    top-left ``sizes[n] = (h_n, w_n)`` corner of a padded ``H x W`` map (``SIZES``; ``W`` is the
    padded width), or those where ``mask[n, s] != 0`` (``MASK``). Other positions are never
    loaded, so whatever padding holds (NaN included) cannot win. A sample with no valid position
    pools to 0 with index ``NO_INDEX``, which the scatter kernel never matches: zero gradient.

    With one split, ``part_val``/``part_idx`` are the final ``pooled``/``index`` of shape (N, C).
    """
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    pid_ns = pid // num_c_blocks
    split = pid_ns % num_splits
    n = _wide(pid_ns // num_splits, INDEX_64)

    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s_begin = split * positions_per_split
    s_end = tl.minimum(s_begin + positions_per_split, S)
    x_rows = x_ptr + n * stride_xn + _wide(offs_c, INDEX_64)[:, None] * stride_xc

    if VALIDITY == SIZES:
        # Sizes were checked on the host; clamping keeps a bad value from reading out of bounds.
        height = tl.minimum(tl.maximum(tl.load(sizes_ptr + 2 * n).to(tl.int32), 0), S // W)
        width = tl.minimum(tl.maximum(tl.load(sizes_ptr + 2 * n + 1).to(tl.int32), 0), W)
        # Rows below the item are never visited: stop after its last valid position.
        s_end = tl.minimum(s_end, tl.where(height * width > 0, (height - 1) * W + width, 0))
        # Column of each lane, advanced by BLOCK_S positions per step without a division.
        lane_col = (s_begin + tl.arange(0, BLOCK_S)) % W
        col_step = BLOCK_S % W

    # Each lane keeps the max of the positions it visited, so the loop needs no cross-thread
    # reduction; lanes visit positions in increasing order, so a strict ">" keeps the first one.
    best_val = tl.full((BLOCK_C, BLOCK_S), float("-inf"), ACC_DTYPE)
    best_idx = tl.full((BLOCK_C, BLOCK_S), NO_INDEX, tl.int32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        valid = offs_s < s_end
        if VALIDITY == SIZES:
            valid = valid & (lane_col < width)
            lane_col += col_step
            lane_col = tl.where(lane_col >= W, lane_col - W, lane_col)
        if VALIDITY == MASK:
            flags = tl.load(
                mask_ptr + n * stride_mask_n + offs_s * stride_mask_s, mask=valid, other=0
            )
            valid = valid & (flags != 0)
        mask = c_mask[:, None] & valid[None, :]
        raw = tl.load(
            x_rows + _wide(offs_s, INDEX_64)[None, :] * stride_xs, mask=mask, other=float("-inf")
        )
        val = upcast(raw, ACC_DTYPE)
        take = mask & _take_first_max(val, best_val, best_idx)
        best_val = tl.where(take, val, best_val)
        best_idx = tl.where(take, offs_s[None, :], best_idx)

    # Reduce the lanes of each channel: NaN first, then the largest value, then the lowest index.
    lane_nan = best_val != best_val
    row_has_nan = tl.max(lane_nan.to(tl.int32), axis=1) > 0
    lane_clean = tl.where(lane_nan, float("-inf"), best_val)
    row_max = tl.max(lane_clean, axis=1)
    is_winner = tl.where(row_has_nan[:, None], lane_nan, lane_clean == row_max[:, None])
    row_idx = tl.min(tl.where(is_winner, best_idx, NO_INDEX), axis=1)
    row_val = tl.where(row_has_nan, float("nan"), row_max)
    # Split results are combined first; the combine kernel applies the empty-sample rule.
    row_val = tl.where((row_idx == NO_INDEX) & (num_splits == 1), 0.0, row_val)

    out_offs = (n * num_splits + split) * C + offs_c
    tl.store(part_val_ptr + out_offs, round_to(row_val, part_val_ptr.dtype.element_ty), mask=c_mask)
    tl.store(part_idx_ptr + out_offs, row_idx, mask=c_mask)


@triton.jit
def gmp_combine_kernel(
    part_val_ptr,
    part_idx_ptr,
    pooled_ptr,
    index_ptr,
    C,
    num_c_blocks,
    num_splits,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Combine the per-split results ``part[n, split, c]`` of ``gmp_forward_kernel`` into
    ``pooled[n, c]`` and ``index[n, c]``; one program per (sample, channel block)."""
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    n = _wide(pid // num_c_blocks, INDEX_64)
    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C

    best_val = tl.full((BLOCK_C,), float("-inf"), ACC_DTYPE)
    best_idx = tl.full((BLOCK_C,), NO_INDEX, tl.int32)
    # Splits hold increasing positions, so visiting them in order keeps the first index.
    for split in range(num_splits):
        part_offs = (n * num_splits + split) * C + offs_c
        val = upcast(tl.load(part_val_ptr + part_offs, mask=c_mask), ACC_DTYPE)
        idx = tl.load(part_idx_ptr + part_offs, mask=c_mask)
        take = _take_first_max(val, best_val, best_idx)
        best_val = tl.where(take, val, best_val)
        best_idx = tl.where(take, idx, best_idx)
    best_val = _zero_if_empty(best_val, best_idx)
    out_offs = n * C + offs_c
    tl.store(pooled_ptr + out_offs, round_to(best_val, pooled_ptr.dtype.element_ty), mask=c_mask)
    tl.store(index_ptr + out_offs, best_idx, mask=c_mask)


@triton.jit
def l2norm_forward_kernel(
    pooled_ptr,
    out_ptr,
    norm_ptr,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """One program per sample: ``norm = ||pooled||`` and ``out = pooled / max(norm, eps)``.

    The row is read in ``BLOCK_C`` chunks, so any number of channels fits; the second pass reads
    the (N, C) pooled values again, which is small next to the feature map.
    """
    n = _wide(tl.program_id(0), INDEX_64)
    IS_FP64: tl.constexpr = ACC_DTYPE == tl.float64
    row = n * C
    sum_sq = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        pooled = upcast(tl.load(pooled_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        sum_sq += pooled * pooled
    norm = sqrt_rn(tl.sum(sum_sq, axis=0), IS_FP64)
    tl.store(norm_ptr + n, norm)

    denom = _clamp_min_keep_nan(norm, eps)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        pooled = upcast(tl.load(pooled_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        out = div_rn(pooled, denom, IS_FP64)
        tl.store(out_ptr + row + offs_c, round_to(out, out_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def l2norm_backward_kernel(
    grad_out_ptr,
    pooled_ptr,
    norm_ptr,
    grad_pooled_ptr,
    C,
    eps,
    BLOCK_C: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """One program per sample: gradient of ``pooled / max(norm, eps)`` with respect to ``pooled``.

    ``grad_pooled`` is kept in the accumulation dtype; the scatter kernel rounds it once.
    """
    n = _wide(tl.program_id(0), INDEX_64)
    IS_FP64: tl.constexpr = ACC_DTYPE == tl.float64
    row = n * C
    norm = tl.load(norm_ptr + n)
    denom = _clamp_min_keep_nan(norm, eps)
    # Below eps the denominator is the constant eps, so no gradient flows through the norm.
    through_norm = norm >= eps

    dot = tl.zeros((BLOCK_C,), ACC_DTYPE)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        g = upcast(tl.load(grad_out_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        pooled = upcast(tl.load(pooled_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        dot += g * div_rn(pooled, denom, IS_FP64)
    dot_row = tl.sum(dot, axis=0)

    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < C
        g = upcast(tl.load(grad_out_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        pooled = upcast(tl.load(pooled_ptr + row + offs_c, mask=c_mask, other=0.0), ACC_DTYPE)
        y = div_rn(pooled, denom, IS_FP64)
        grad = div_rn(g - tl.where(through_norm, y * dot_row, 0.0), denom, IS_FP64)
        tl.store(grad_pooled_ptr + row + offs_c, grad, mask=c_mask)


@triton.jit
def gmp_backward_kernel(
    grad_pooled_ptr,
    index_ptr,
    grad_x_bits_ptr,
    C,
    S,
    positions_per_split,
    num_c_blocks,
    num_splits,
    stride_gn,
    stride_gc,
    stride_gs,
    BLOCK_C: tl.constexpr,
    BLOCK_S: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    INDEX_64: tl.constexpr,
):
    """Write ``grad_x[n, c, s] = grad_pooled[n, c] if s == index[n, c] else 0`` for the channels
    and positions of this program: a single write of every element of ``grad_x``.

    ``grad_x_bits_ptr`` is ``grad_x`` seen as integers of the same width: the gradient is rounded
    to ``GRAD_DTYPE`` once per channel, and the tile is then a select between its bits and the
    bits of +0.0 (all zero), which is exact for every dtype and needs no per-element conversion.
    """
    pid = tl.program_id(0)
    c_block = pid % num_c_blocks
    pid_ns = pid // num_c_blocks
    split = pid_ns % num_splits
    n = _wide(pid_ns // num_splits, INDEX_64)

    offs_c = c_block * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    s_begin = split * positions_per_split
    s_end = tl.minimum(s_begin + positions_per_split, S)

    small_offs = n * C + offs_c
    grad = upcast(tl.load(grad_pooled_ptr + small_offs, mask=c_mask, other=0.0), ACC_DTYPE)
    grad_bits = round_to(grad, GRAD_DTYPE).to(grad_x_bits_ptr.dtype.element_ty, bitcast=True)
    winner = tl.load(index_ptr + small_offs, mask=c_mask, other=NO_INDEX)
    grad_rows = grad_x_bits_ptr + n * stride_gn + _wide(offs_c, INDEX_64)[:, None] * stride_gc
    for s0 in range(s_begin, s_end, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        mask = c_mask[:, None] & (offs_s < s_end)[None, :]
        tile = tl.where(offs_s[None, :] == winner[:, None], grad_bits[:, None], 0)
        tl.store(grad_rows + _wide(offs_s, INDEX_64)[None, :] * stride_gs, tile, mask=mask)
