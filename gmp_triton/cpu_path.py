"""The pure-PyTorch implementation, with the same semantics as the Triton kernels.

It runs CPU tensors (and every tensor when Triton is missing). The rules are those of
``kernels/global_max_pool.py``: NaN wins the max, ties go to the first row-major position, the
norm is accumulated in fp32 (fp64 for fp64 input), and the gradient of a channel goes to one
position.
"""

import math
from collections.abc import Sequence

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_grad(
    size: Sequence[int], channels_last: bool, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """An uninitialised gradient for an input of ``size``, in the input's layout family:
    contiguous, or with channels as the contiguous axis (channels_last, or (N, L, C) seen as
    (N, C, L))."""
    if not channels_last:
        return torch.empty(size, dtype=dtype, device=device)
    if len(size) == 4:
        return torch.empty(size, dtype=dtype, device=device, memory_format=torch.channels_last)
    n, c, length = size
    return torch.empty((n, length, c), dtype=dtype, device=device).transpose(1, 2)


def gmp_forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.max over a dim returns the first maximal element, and NaN (its first) where present.
    pooled, index = x.flatten(2).max(dim=2)
    return pooled, index.to(torch.int32)


def gmp_backward(
    grad_pooled: torch.Tensor,
    index: torch.Tensor,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    grad_x = empty_grad(size, channels_last, dtype, grad_pooled.device).zero_()
    n, c, positions = size[0], size[1], math.prod(size[2:])
    grad_x.view(n, c, positions).scatter_(
        2, index.long().unsqueeze(2), grad_pooled.to(dtype).unsqueeze(2)
    )
    return grad_x


def l2norm_forward(pooled: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    acc = pooled.to(accumulation_dtype(pooled.dtype))
    norm = acc.square().sum(dim=1).sqrt()
    out = (acc / norm.clamp_min(eps).unsqueeze(1)).to(pooled.dtype)
    return out, norm


def l2norm_backward(
    grad_out: torch.Tensor, pooled: torch.Tensor, norm: torch.Tensor, eps: float
) -> torch.Tensor:
    acc_dtype = accumulation_dtype(pooled.dtype)
    grad = grad_out.to(acc_dtype)
    denom = norm.clamp_min(eps).unsqueeze(1)
    y = pooled.to(acc_dtype) / denom
    dot = (grad * y).sum(dim=1, keepdim=True)
    # Below eps the denominator is the constant eps: no gradient flows through the norm.
    through_norm = (norm >= eps).unsqueeze(1)
    return (grad - torch.where(through_norm, y * dot, 0.0)) / denom
