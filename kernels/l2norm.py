"""Row kernels of the L2 normalisation of a pooled (N, D) matrix, forward and backward.

Per sample n, with ``p = pooled[n, :]`` (accumulated in fp32, fp64 for fp64 input)::

    norm = sqrt(sum_d p_d ** 2)
    out  = p / max(norm, eps)

and, with ``g`` the gradient of ``out`` and ``y = p / max(norm, eps)``::

    grad_p = (g - y * sum_d(g_d * y_d)) / norm   if norm >= eps
           = g / eps                            otherwise

which is what autograd gives for ``F.normalize``. A NaN norm stays NaN (``torch.clamp_min`` keeps
NaN, ``tl.maximum`` would not). One program per sample; the row is read in ``BLOCK_C`` chunks, so
any width fits. The rows are small next to the feature map the pooling read.
"""

import triton
import triton.language as tl

from .common import clamp_min_keep_nan, wide
from .convert import div_rn, round_to, sqrt_rn, upcast


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
    n = wide(tl.program_id(0), INDEX_64)
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

    denom = clamp_min_keep_nan(norm, eps)
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
    n = wide(tl.program_id(0), INDEX_64)
    IS_FP64: tl.constexpr = ACC_DTYPE == tl.float64
    row = n * C
    norm = tl.load(norm_ptr + n)
    denom = clamp_min_keep_nan(norm, eps)
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
