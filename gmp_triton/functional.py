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


def global_max_pool(x: Tensor) -> Tensor:
    """Global max pooling: the largest value of each channel over all positions.

    Same values as ``F.adaptive_max_pool2d(x, 1).flatten(1)``. The gradient of each (n, c) goes to
    the first maximal position in row-major (h, w) order; a channel holding NaN pools to NaN and
    its gradient goes to the first NaN.

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, L)`` floating-point tensor, any memory layout.

    Returns:
        ``(N, C)`` tensor of ``x.dtype``.
    """
    check_feature_map(x, "global_max_pool")
    pooled, _ = ops.gmp_forward(x)
    return pooled


def gmp_l2norm(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Global max pooling followed by L2 normalisation of each sample's channel vector.

    Same values as ``F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1), dim=1, eps=eps)``, with
    the norm accumulated in float32 (float64 for float64 input) whatever the input dtype. An
    all-zero pooled vector gives a zero embedding.

    Args:
        x: ``(N, C, H, W)`` or ``(N, C, L)`` floating-point tensor, any memory layout.
        eps: lower bound of the norm that divides the pooled vector.

    Returns:
        ``(N, C)`` tensor of ``x.dtype`` with unit rows (zero rows for all-zero inputs).
    """
    check_feature_map(x, "gmp_l2norm")
    _check_eps(eps, "gmp_l2norm")
    out, _, _, _ = ops.gmp_l2norm_forward(x, float(eps))
    return out
