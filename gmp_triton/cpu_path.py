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


# Index of a sample with no valid position; matches no position, so it receives no gradient.
NO_INDEX = 2**31 - 1


def valid_positions(
    x: torch.Tensor, sizes: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor | None:
    """(N, S) bool: which flat positions of each sample take part, or None for all of them."""
    if mask is not None:
        return mask != 0
    if sizes is None:
        return None
    height, width = x.shape[2], x.shape[3]
    rows = torch.arange(height, device=x.device).view(1, height, 1)
    cols = torch.arange(width, device=x.device).view(1, 1, width)
    inside = (rows < sizes[:, 0].view(-1, 1, 1)) & (cols < sizes[:, 1].view(-1, 1, 1))
    return inside.flatten(1)


def gmp_forward(
    x: torch.Tensor, sizes: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    flat = x.flatten(2)
    valid = valid_positions(x, sizes, mask)
    if valid is None:
        # torch.max over a dim returns the first maximal element, and its first NaN if any.
        pooled, index = flat.max(dim=2)
        return pooled, index.to(torch.int32)

    valid = valid.unsqueeze(1)
    values = flat.masked_fill(~valid, float("-inf"))
    pooled = values.amax(dim=2)
    # The first valid position holding the max (or, for a NaN max, the first NaN). Found by
    # comparison rather than torch.max, which could point at a padded -inf.
    wins = valid & ((flat == pooled.unsqueeze(2)) | (flat.isnan() & pooled.isnan().unsqueeze(2)))
    index = wins.to(torch.uint8).argmax(dim=2).to(torch.int32)
    empty = ~valid.any(dim=2)
    pooled = pooled.masked_fill(empty, 0)
    return pooled, index.masked_fill(empty, NO_INDEX)


def gmp_backward(
    grad_pooled: torch.Tensor,
    index: torch.Tensor,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    grad_x = empty_grad(size, channels_last, dtype, grad_pooled.device).zero_()
    n, c, positions = size[0], size[1], math.prod(size[2:])
    if grad_x.numel() == 0:
        return grad_x
    empty = index == NO_INDEX
    grad = grad_pooled.to(dtype).masked_fill(empty, 0)
    grad_x.view(n, c, positions).scatter_(
        2, index.long().masked_fill(empty, 0).unsqueeze(2), grad.unsqueeze(2)
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
