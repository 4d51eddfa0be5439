"""The pure-PyTorch implementation, with the same semantics as the Triton kernels.

It runs CPU tensors (and every tensor when Triton is missing). The rules are those of
``kernels/pool_forward.py``: NaN wins the max, ties go to the first row-major position, the
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
    """Max and first argmax over the valid positions (see ``launch.gmp_forward``)."""
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


def l2norm_forward(
    pooled: torch.Tensor, eps: float, out_dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = out_dtype or pooled.dtype
    acc = pooled.to(accumulation_dtype(out_dtype))
    norm = acc.square().sum(dim=1).sqrt()
    out = (acc / norm.clamp_min(eps).unsqueeze(1)).to(out_dtype)
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


def valid_counts(
    x: torch.Tensor, sizes: torch.Tensor | None, mask: torch.Tensor | None
) -> torch.Tensor:
    """(N,) int64: the number of valid positions of each sample."""
    if mask is not None:
        return (mask != 0).sum(dim=1)
    if sizes is not None:
        height, width = x.shape[2], x.shape[3]
        return sizes[:, 0].clamp(0, height) * sizes[:, 1].clamp(0, width)
    return torch.full((x.shape[0],), math.prod(x.shape[2:]), dtype=torch.int64, device=x.device)


def _masked_sum(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    if valid is not None:
        values = values.masked_fill(~valid.unsqueeze(1), 0)
    return values.sum(dim=2)


def pool_forward(
    x: torch.Tensor,
    pool: str = "max",
    sizes: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    gem_p: torch.Tensor | None = None,
    gem_eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(pooled, index, gem_dp)`` as the Triton launcher returns them: max pools to ``x.dtype``
    (exact values), every other pooling to the accumulation dtype, (N, 2C) for catavgmax."""
    if pool == "max":
        pooled, index = gmp_forward(x, sizes, mask)
        return pooled, index, None
    acc = accumulation_dtype(x.dtype)
    flat = x.flatten(2).to(acc)
    valid = valid_positions(x, sizes, mask)
    counts = valid_counts(x, sizes, mask).to(acc).unsqueeze(1)
    has_positions = counts > 0
    divisor = torch.where(has_positions, counts, 1)
    if pool == "gem":
        p = gem_p.to(acc)
        log_v = flat.clamp(min=gem_eps).log()
        v_pow = torch.exp(p * log_v)
        pow_sum = _masked_sum(v_pow, valid)
        log_mean = torch.log(pow_sum / divisor)
        pooled = torch.where(has_positions, torch.exp(log_mean / p), 0)
        ratio = _masked_sum(v_pow * log_v, valid) / torch.where(has_positions, pow_sum, 1)
        gem_dp = torch.where(has_positions, pooled / p * (ratio - log_mean / p), 0)
        return pooled, None, gem_dp

    avg = torch.where(has_positions, _masked_sum(flat, valid) / divisor, 0)
    if pool == "avg":
        return avg, None, None
    top, index = gmp_forward(x, sizes, mask)
    top = top.to(acc)
    if pool == "avgmax":
        return 0.5 * (avg + top), index, None
    return torch.cat([avg, top], dim=1), index, None


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
    """The input gradient of ``pool_forward``, by the formulas of the Triton backward kernel."""
    if pool == "max":
        return gmp_backward(grad_pooled, index, size, channels_last, dtype)
    n, c, positions = size[0], size[1], math.prod(size[2:])
    acc = accumulation_dtype(dtype)
    grad = grad_pooled.to(acc)
    like = torch.empty(size, device=grad.device)
    valid = valid_positions(like, sizes, mask)
    valid = (
        torch.ones(n, 1, positions, dtype=torch.bool, device=grad.device)
        if valid is None
        else valid.unsqueeze(1)
    )
    counts = valid_counts(like, sizes, mask).to(acc).unsqueeze(1)
    has_positions = counts > 0
    divisor = torch.where(has_positions, counts, 1)

    grad_max = None
    if pool == "gem":
        p = gem_p.to(acc)
        gem = torch.where(has_positions, pooled.to(acc), 1)
        grad_each = torch.where(has_positions, grad * torch.exp((1 - p) * gem.log()) / divisor, 0)
        flat = x.flatten(2).to(acc)
        local = grad_each.unsqueeze(2) * torch.exp((p - 1) * flat.clamp(min=gem_eps).log())
        grad_flat = torch.where(valid & (flat >= gem_eps), local, 0)
    else:
        if pool == "avgmax":
            grad_each, grad_max = 0.5 * grad / divisor, 0.5 * grad
        elif pool == "catavgmax":
            grad_each, grad_max = grad[:, :c] / divisor, grad[:, c:]
        else:
            grad_each = grad / divisor
        grad_each = torch.where(has_positions, grad_each, 0)
        grad_flat = torch.where(valid, grad_each.unsqueeze(2), 0)
    if grad_max is not None:
        empty = index == NO_INDEX
        grad_flat.scatter_add_(
            2,
            index.long().masked_fill(empty, 0).unsqueeze(2),
            grad_max.masked_fill(empty, 0).unsqueeze(2),
        )
    grad_x = empty_grad(size, channels_last, dtype, grad.device)
    grad_x.view(n, c, positions).copy_(grad_flat)
    return grad_x
