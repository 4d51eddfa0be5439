"""Functional API: input checks, then the registered ops."""

import math

import torch
from torch import Tensor

from . import ops

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Positions are stored as int32, and 2**31 - 1 marks "none yet" inside the kernels.
MAX_POSITIONS = 2**31 - 2


def check_feature_map(x: Tensor, caller: str) -> None:
    """Raise a clear error for anything that is not an (N, C, H, W) or (N, C, L) float map."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{caller}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() not in (3, 4):
        raise ValueError(
            f"{caller}: expected a feature map of shape (N, C, H, W) or (N, C, L), "
            f"got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
        )
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{caller}: expected a float16, bfloat16, float32 or float64 tensor, got {x.dtype}"
        )
    names = ("H", "W") if x.dim() == 4 else ("L",)
    for name, size in zip(names, x.shape[2:], strict=True):
        if size == 0:
            raise ValueError(
                f"{caller}: the spatial size {name} is 0 in shape {tuple(x.shape)}; there is "
                f"nothing to take the max of"
            )
    if math.prod(x.shape[2:]) > MAX_POSITIONS:
        raise ValueError(
            f"{caller}: {math.prod(x.shape[2:])} positions per channel is more than the "
            f"{MAX_POSITIONS} supported"
        )


def _check_eps(eps: float, caller: str) -> None:
    # Written as a chained comparison (false for NaN too): torch.compile traces it as a constant.
    if not isinstance(eps, (int, float)) or not 0 < eps < math.inf:
        raise ValueError(f"{caller}: eps must be a positive finite number, got {eps!r}")


def _check_same_device(x: Tensor, other: Tensor, name: str, caller: str) -> None:
    if other.device != x.device:
        raise ValueError(f"{caller}: {name} is on {other.device} but the input is on {x.device}")


def check_sizes(x: Tensor, sizes, caller: str) -> None:
    """Shape, dtype and device of ``sizes``; its values are checked when the op runs."""
    if sizes is None:
        return
    if not isinstance(sizes, Tensor):
        raise TypeError(
            f"{caller}: sizes must be an (N, 2) integer tensor or None, got "
            f"{type(sizes).__name__} (pass eps by keyword: eps=...)"
        )
    if x.dim() != 4:
        raise ValueError(
            f"{caller}: sizes applies to padded (N, C, H, W) maps; for padded sequences use "
            f"masked_max_pool or masked_gmp_l2norm with an attention mask"
        )
    if sizes.dtype == torch.bool or sizes.is_floating_point() or sizes.is_complex():
        raise TypeError(f"{caller}: sizes must hold integers, got {sizes.dtype}")
    if tuple(sizes.shape) != (x.shape[0], 2):
        raise ValueError(
            f"{caller}: sizes must have shape (N, 2) = ({x.shape[0]}, 2) for an input of shape "
            f"{tuple(x.shape)}, got {tuple(sizes.shape)}"
        )
    _check_same_device(x, sizes, "sizes", caller)


def check_attention_mask(hidden: Tensor, attention_mask, caller: str) -> None:
    if not isinstance(attention_mask, Tensor):
        kind = type(attention_mask).__name__
        raise TypeError(f"{caller}: attention_mask must be an (N, L) tensor, got {kind}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        raise TypeError(
            f"{caller}: attention_mask must be bool or integer (non-zero = valid token), "
            f"got {attention_mask.dtype}"
        )
    if tuple(attention_mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(
            f"{caller}: attention_mask must have shape (N, L) = {tuple(hidden.shape[:2])} for "
            f"hidden states of shape {tuple(hidden.shape)}, got {tuple(attention_mask.shape)}"
        )
    _check_same_device(hidden, attention_mask, "attention_mask", caller)


def check_hidden_states(hidden: Tensor, caller: str) -> None:
    if isinstance(hidden, Tensor) and hidden.dim() != 3:
        raise ValueError(
            f"{caller}: expected hidden states of shape (N, L, C), got a {hidden.dim()}-d "
            f"tensor of shape {tuple(hidden.shape)}"
        )
    # As a (N, C, L) view, the same checks as any feature map apply (the length is L).
    check_feature_map(hidden if not isinstance(hidden, Tensor) else hidden.transpose(1, 2), caller)


def global_max_pool(x: Tensor, sizes: Tensor | None = None) -> Tensor:
    """Global max pooling: the largest value of each channel over all positions.

    Same values as ``F.adaptive_max_pool2d(x, 1).flatten(1)``. The gradient of each (n, c) goes to
    the first maximal position in row-major (h, w) order; a channel holding NaN pools to NaN and
    its gradient goes to the first NaN.

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, L)`` floating-point tensor, any memory layout.
        sizes: for a padded batch of maps (see ``pad_maps``), an ``(N, 2)`` integer tensor of each
            item's valid ``(h, w)``, top-left aligned. Positions outside never win and get zero
            gradient; an item of size 0 pools to zeros.

    Returns:
        ``(N, C)`` tensor of ``x.dtype``.
    """
    check_feature_map(x, "global_max_pool")
    check_sizes(x, sizes, "global_max_pool")
    pooled, _ = ops.gmp_forward(x, sizes)
    return pooled


def gmp_l2norm(x: Tensor, sizes: Tensor | None = None, eps: float = 1e-12) -> Tensor:
    """Global max pooling followed by L2 normalisation of each sample's channel vector.

    Same values as ``F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1), dim=1, eps=eps)``, with
    the norm accumulated in float32 (float64 for float64 input) whatever the input dtype. An
    all-zero pooled vector gives a zero embedding.

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, L)`` floating-point tensor, any memory layout.
        sizes: as in ``global_max_pool``: each item's valid ``(h, w)`` in a padded batch. An item
            of size 0 gives a zero embedding with zero gradient.
        eps: lower bound of the norm that divides the pooled vector.

    Returns:
        ``(N, C)`` tensor of ``x.dtype`` with unit rows (zero rows for all-zero inputs).
    """
    check_feature_map(x, "gmp_l2norm")
    check_sizes(x, sizes, "gmp_l2norm")
    _check_eps(eps, "gmp_l2norm")
    out, _, _, _ = ops.gmp_l2norm_forward(x, float(eps), sizes)
    return out


def masked_max_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Max over the valid tokens of each sequence: the sentence-embedding pooling.

    Equal to pooling each sequence's valid tokens alone, whatever the padded positions hold.
    Gradient and NaN rules as in ``global_max_pool``; a sequence with no valid token pools to
    zeros with zero gradient.

    Args:
        hidden: ``(N, L, C)`` hidden states (a transformer's last layer).
        attention_mask: ``(N, L)`` bool or integer tensor, non-zero for tokens to pool.

    Returns:
        ``(N, C)`` tensor of ``hidden.dtype``.
    """
    check_hidden_states(hidden, "masked_max_pool")
    check_attention_mask(hidden, attention_mask, "masked_max_pool")
    pooled, _ = ops.gmp_forward(hidden.transpose(1, 2), None, attention_mask)
    return pooled


def masked_gmp_l2norm(hidden: Tensor, attention_mask: Tensor, eps: float = 1e-12) -> Tensor:
    """``masked_max_pool`` followed by L2 normalisation (norm accumulated in fp32, or fp64).

    A sequence with no valid token gives a zero embedding with zero gradient, never NaN.

    Args:
        hidden: ``(N, L, C)`` hidden states.
        attention_mask: ``(N, L)`` bool or integer tensor, non-zero for tokens to pool.
        eps: lower bound of the norm that divides the pooled vector.

    Returns:
        ``(N, C)`` tensor of ``hidden.dtype`` with unit (or zero) rows.
    """
    check_hidden_states(hidden, "masked_gmp_l2norm")
    check_attention_mask(hidden, attention_mask, "masked_gmp_l2norm")
    _check_eps(eps, "masked_gmp_l2norm")
    out, _, _, _ = ops.gmp_l2norm_forward(hidden.transpose(1, 2), float(eps), None, attention_mask)
    return out


POOLS = ("max", "avg", "avgmax", "catavgmax", "gem")


def _check_pool(pool, caller: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"{caller}: pool must be one of {', '.join(POOLS)}; got {pool!r}")


def _gem_exponent(x: Tensor, p, pool: str, caller: str) -> Tensor | None:
    """GeM's exponent as a tensor (a float becomes a constant); None for the other poolings."""
    if pool != "gem":
        if p is not None:
            raise ValueError(f"{caller}: p is GeM's exponent; pool={pool!r} takes none")
        return None
    if p is None:
        raise ValueError(f"{caller}: pool='gem' needs its exponent p (a float or a tensor)")
    if isinstance(p, Tensor):
        if p.numel() != 1 or not p.is_floating_point():
            raise ValueError(
                f"{caller}: p must be a float or a one-element float tensor, got "
                f"{p.dtype} of shape {tuple(p.shape)}"
            )
        _check_same_device(x, p, "p", caller)
        return p
    if not isinstance(p, (int, float)):
        raise TypeError(f"{caller}: p must be a float or a tensor, got {type(p).__name__}")
    return torch.tensor([float(p)], dtype=torch.float32, device=x.device)


def _pooled(x: Tensor, pool: str, sizes, p, gem_eps: float, caller: str) -> Tensor:
    """The pooled (N, D) rows in the accumulation dtype, with autograd."""
    check_feature_map(x, caller)
    check_sizes(x, sizes, caller)
    _check_pool(pool, caller)
    gem_p = _gem_exponent(x, p, pool, caller)
    if pool == "gem":
        _check_eps(gem_eps, f"{caller} (gem_eps)")
    pooled, _, _ = ops.pool_forward(x, pool, gem_p, float(gem_eps), sizes)
    return pooled


def global_pool(
    x: Tensor,
    pool: str = "avg",
    sizes: Tensor | None = None,
    p: float | Tensor | None = None,
    gem_eps: float = 1e-6,
) -> Tensor:
    """Global pooling of each channel over all (valid) positions.

    ``pool`` is one of ``"max"`` (as ``global_max_pool``), ``"avg"`` (mean), ``"avgmax"`` (the mean
    of avg and max), ``"catavgmax"`` (avg and max side by side: ``(N, 2C)``) and ``"gem"``
    (generalized mean: ``mean(clamp(x, gem_eps) ** p) ** (1 / p)``, differentiable in ``p``).
    Sums are accumulated in fp32 (fp64 for fp64 input).

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, L)`` floating-point tensor, any memory layout.
        pool: the pooling.
        sizes: for a padded batch, each item's valid ``(h, w)`` (see ``global_max_pool``).
        p: GeM's exponent, a float or a one-element tensor (a parameter to learn it); GeM only.
        gem_eps: GeM's clamp of the input from below.

    Returns:
        ``(N, C)`` (``(N, 2C)`` for catavgmax) tensor of ``x.dtype``.
    """
    if pool == "max":
        _check_pool(pool, "global_pool")
        _gem_exponent(x, p, pool, "global_pool")
        return global_max_pool(x, sizes)
    return _pooled(x, pool, sizes, p, gem_eps, "global_pool").to(x.dtype)


def pool_l2norm(
    x: Tensor,
    pool: str = "max",
    sizes: Tensor | None = None,
    p: float | Tensor | None = None,
    eps: float = 1e-12,
    gem_eps: float = 1e-6,
) -> Tensor:
    """``global_pool`` followed by L2 normalisation of each row (over 2C values for catavgmax),
    the norm accumulated in fp32 (fp64 for fp64 input); pool="max" is ``gmp_l2norm``."""
    if pool == "max":
        _check_pool(pool, "pool_l2norm")
        _gem_exponent(x, p, pool, "pool_l2norm")
        return gmp_l2norm(x, sizes, eps=eps)
    pooled = _pooled(x, pool, sizes, p, gem_eps, "pool_l2norm")
    _check_eps(eps, "pool_l2norm")
    out, _ = ops.l2_normalize(pooled, float(eps), x.dtype)
    return out


def l2_normalize(v: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.normalize(v, dim=1, eps=eps)`` for an ``(N, D)`` tensor, with the norm accumulated in
    fp32 (fp64 for fp64 input) by the package's row kernel; for heads with a projection."""
    if not isinstance(v, Tensor) or v.dim() != 2:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ValueError(f"l2_normalize: expected an (N, D) tensor, got {shape}")
    if v.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"l2_normalize: expected a floating-point tensor, got {v.dtype}")
    _check_eps(eps, "l2_normalize")
    out, _ = ops.l2_normalize(v, float(eps), v.dtype)
    return out
