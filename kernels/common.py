"""Constants and small helpers shared by the pooling kernels."""

import triton
import triton.language as tl

# Marks "no position": a lane that has not seen any element yet, or a sample with no valid
# position. Larger than any valid position, so the first-index rule can take a min over lanes.
NO_INDEX = tl.constexpr(2**31 - 1)

# Which positions of a sample take part (the VALIDITY argument of the kernels).
ALL_POSITIONS = tl.constexpr(0)
SIZES = tl.constexpr(1)
MASK = tl.constexpr(2)

# The pooling (the POOL argument). CATAVGMAX writes [avg, max] side by side, 2C values a row.
MAX = tl.constexpr(0)
AVG = tl.constexpr(1)
AVGMAX = tl.constexpr(2)
CATAVGMAX = tl.constexpr(3)
GEM = tl.constexpr(4)


@triton.jit
def wide(value, INDEX_64: tl.constexpr):
    # Offsets are computed in int64 only where a tensor can pass 2**31 elements: int32 address
    # arithmetic is cheaper and uses fewer registers.
    if INDEX_64:
        return value.to(tl.int64)
    else:
        return value


@triton.jit
def clamp_min_keep_nan(value, low):
    # tl.maximum returns the number when the other operand is NaN (the GPU's max instruction
    # does); torch.clamp keeps the NaN, and so must every clamp here.
    return tl.where(value != value, value, tl.maximum(value, low))


@triton.jit
def size_limits(sizes_ptr, n, S, W):
    """Valid height and width of sample ``n`` of a padded ``(S // W) x W`` map, clamped into the
    map (sizes are checked on the host; clamping keeps a bad value from reading out of bounds),
    and one past its last valid flat position."""
    height = tl.minimum(tl.maximum(tl.load(sizes_ptr + 2 * n).to(tl.int32), 0), S // W)
    width = tl.minimum(tl.maximum(tl.load(sizes_ptr + 2 * n + 1).to(tl.int32), 0), W)
    end = tl.where(height * width > 0, (height - 1) * W + width, 0)
    return width, end


@triton.jit
def next_columns(lane_col, step, W):
    """Advance each lane's column by ``step`` (< W) positions in a row of ``W``, without a
    division."""
    lane_col += step
    return tl.where(lane_col >= W, lane_col - W, lane_col)


@triton.jit
def mask_flags(mask_ptr, n, offs_s, in_range, stride_mask_n, stride_mask_s):
    flags = tl.load(mask_ptr + n * stride_mask_n + offs_s * stride_mask_s, mask=in_range, other=0)
    return in_range & (flags != 0)
