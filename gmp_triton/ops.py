"""The registered torch ops (``torch.ops.gmp_triton.*``) with fake implementations and autograd.

Registering through ``torch.library.custom_op`` makes the ops opaque to ``torch.compile``: a
model using them traces with no graph break, and the fake implementations give output shapes for
symbolic sizes, so new N, H or W do not recompile. Each op picks its implementation per call
(``_backend.use_triton``): Triton kernels for CUDA (and CPU under ``TRITON_INTERPRET=1``), the
PyTorch path otherwise.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from . import _backend, cpu_path


def _impl(tensor: Tensor):
    if _backend.use_triton(tensor):
        from . import launch

        return launch
    return cpu_path


def check_sizes_values(x: Tensor, sizes: Tensor | None) -> None:
    """Sizes must lie within the padded map. Their values are only known when the op runs (under
    torch.compile too), so they are checked here; on CUDA this reads one flag back to the host."""
    if sizes is None or sizes.numel() == 0:
        return
    height, width = x.shape[2], x.shape[3]
    bad = (sizes < 0).any(dim=1) | (sizes[:, 0] > height) | (sizes[:, 1] > width)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"sizes[{first}] = {tuple(sizes[first].tolist())} does not fit the padded map of "
            f"height {height} and width {width} (sizes must be in 0..height, 0..width)"
        )


def grad_layout_is_channels_last(x: Tensor) -> bool:
    """Whether ``x``'s gradient is laid out with channels as the contiguous axis, as ``x`` is."""
    return x.stride(1) == 1 and x.shape[1] > 1 and any(size > 1 for size in x.shape[2:])


# --- global max pool -------------------------------------------------------------------------


@torch.library.custom_op("gmp_triton::gmp_forward", mutates_args=())
def gmp_forward(
    x: Tensor, sizes: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Returns ``pooled`` (N, C) and the int32 ``index`` (N, C) of the first maximum, over all
    positions, the top-left ``sizes`` (N, 2) corner, or the positions ``mask`` (N, S) marks."""
    check_sizes_values(x, sizes)
    return _impl(x).gmp_forward(x, sizes, mask)


@gmp_forward.register_fake
def _(x: Tensor, sizes: Tensor | None = None, mask: Tensor | None = None):
    n, c = x.shape[0], x.shape[1]
    return x.new_empty((n, c)), x.new_empty((n, c), dtype=torch.int32)


@torch.library.custom_op("gmp_triton::gmp_backward", mutates_args=())
def gmp_backward(
    grad_pooled: Tensor,
    index: Tensor,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
) -> Tensor:
    """Scatters ``grad_pooled`` to ``index``: the gradient of ``gmp_forward``'s input."""
    return _impl(grad_pooled).gmp_backward(grad_pooled, index, size, channels_last, dtype)


@gmp_backward.register_fake
def _(grad_pooled, index, size, channels_last, dtype):
    return cpu_path.empty_grad(size, channels_last, dtype, grad_pooled.device)


def _gmp_backward_setup_context(ctx, inputs, output) -> None:
    _, index, _, _, _ = inputs
    ctx.save_for_backward(index)


def _gmp_backward_backward(ctx, grad_grad_x):
    # The scatter is linear in grad_pooled: its own gradient reads grad_grad_x at the same index.
    (index,) = ctx.saved_tensors
    n, c = index.shape
    flat = grad_grad_x.reshape(n, c, -1)
    return flat.gather(2, index.long().unsqueeze(2)).squeeze(2), None, None, None, None


gmp_backward.register_autograd(_gmp_backward_backward, setup_context=_gmp_backward_setup_context)


def _gmp_setup_context(ctx, inputs, output) -> None:
    x, _, _ = inputs
    _, index = output
    ctx.save_for_backward(index)
    ctx.size = list(x.shape)
    ctx.channels_last = grad_layout_is_channels_last(x)
    ctx.dtype = x.dtype


def _gmp_backward(ctx, grad_pooled, _grad_index):
    (index,) = ctx.saved_tensors
    return gmp_backward(grad_pooled, index, ctx.size, ctx.channels_last, ctx.dtype), None, None


gmp_forward.register_autograd(_gmp_backward, setup_context=_gmp_setup_context)


# --- global max pool + L2 norm ---------------------------------------------------------------


@torch.library.custom_op("gmp_triton::gmp_l2norm_forward", mutates_args=())
def gmp_l2norm_forward(
    x: Tensor, eps: float, sizes: Tensor | None = None, mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``out`` (N, C), and for the backward ``pooled`` (N, C), ``index`` (N, C, int32)
    and ``norm`` (N,) in the accumulation dtype. ``sizes`` and ``mask`` as in ``gmp_forward``."""
    check_sizes_values(x, sizes)
    impl = _impl(x)
    pooled, index = impl.gmp_forward(x, sizes, mask)
    out, norm = impl.l2norm_forward(pooled, eps)
    return out, pooled, index, norm


@gmp_l2norm_forward.register_fake
def _(x: Tensor, eps: float, sizes: Tensor | None = None, mask: Tensor | None = None):
    n, c = x.shape[0], x.shape[1]
    acc_dtype = cpu_path.accumulation_dtype(x.dtype)
    return (
        x.new_empty((n, c)),
        x.new_empty((n, c)),
        x.new_empty((n, c), dtype=torch.int32),
        x.new_empty((n,), dtype=acc_dtype),
    )


@torch.library.custom_op("gmp_triton::l2norm_backward", mutates_args=())
def l2norm_backward(grad_out: Tensor, pooled: Tensor, norm: Tensor, eps: float) -> Tensor:
    """Gradient of ``pooled / max(norm, eps)`` with respect to ``pooled``, in ``norm.dtype``."""
    return _impl(pooled).l2norm_backward(grad_out, pooled, norm, eps)


@l2norm_backward.register_fake
def _(grad_out, pooled, norm, eps):
    return pooled.new_empty(pooled.shape, dtype=norm.dtype)


def _gmp_l2norm_setup_context(ctx, inputs, output) -> None:
    x, eps, _, _ = inputs
    _, pooled, index, norm = output
    ctx.mark_non_differentiable(pooled, index, norm)
    ctx.save_for_backward(pooled, index, norm)
    ctx.eps = eps
    ctx.size = list(x.shape)
    ctx.channels_last = grad_layout_is_channels_last(x)
    ctx.dtype = x.dtype


def _gmp_l2norm_backward(ctx, grad_out, *_unused):
    # Grad mode is on in a backward pass only under create_graph=True. The second derivative
    # would need the input itself, which is not kept (only the pooled values are): refuse rather
    # than return a gradient that silently lacks that term.
    if torch.is_grad_enabled():
        raise RuntimeError(
            "gmp_l2norm does not support double backward (create_graph=True); "
            "global_max_pool does, and F.normalize can be applied after it"
        )
    pooled, index, norm = ctx.saved_tensors
    grad_pooled = l2norm_backward(grad_out, pooled, norm, ctx.eps)
    grad_x = gmp_backward(grad_pooled, index, ctx.size, ctx.channels_last, ctx.dtype)
    return grad_x, None, None, None


gmp_l2norm_forward.register_autograd(_gmp_l2norm_backward, setup_context=_gmp_l2norm_setup_context)


# --- the pooling family: avg, avgmax, catavgmax, gem --------------------------------------------


def _or_empty(tensor: Tensor | None, like: Tensor) -> Tensor:
    """Ops return a fixed number of tensors: an unused one is empty."""
    return like.new_empty((0,)) if tensor is None else tensor


def check_gem_p(gem_p: Tensor | None) -> None:
    """GeM's exponent must be positive and finite; like sizes, its value is checked when the op
    runs (on CUDA this reads one flag back to the host)."""
    if gem_p is not None and not bool(((gem_p > 0) & gem_p.isfinite()).all()):
        raise ValueError(f"gem: the exponent p must be positive and finite, got {gem_p.tolist()}")


@torch.library.custom_op("gmp_triton::pool_forward", mutates_args=())
def pool_forward(
    x: Tensor,
    pool: str,
    gem_p: Tensor | None,
    gem_eps: float,
    sizes: Tensor | None = None,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``pooled`` (N, C; 2C for catavgmax) in the accumulation dtype, the int32 ``index``
    of the max (empty for avg and gem) and ``d pooled / d p`` (N, C) for GeM (empty otherwise)."""
    check_sizes_values(x, sizes)
    check_gem_p(gem_p)
    pooled, index, gem_dp = _impl(x).pool_forward(x, pool, sizes, mask, gem_p, gem_eps)
    return pooled, _or_empty(index, x).to(torch.int32), _or_empty(gem_dp, pooled)


@pool_forward.register_fake
def _(x, pool, gem_p, gem_eps, sizes=None, mask=None):
    n, c = x.shape[0], x.shape[1]
    acc_dtype = cpu_path.accumulation_dtype(x.dtype)
    width = 2 * c if pool == "catavgmax" else c
    has_max = pool in ("avgmax", "catavgmax")
    return (
        x.new_empty((n, width), dtype=acc_dtype),
        x.new_empty((n, c) if has_max else (0,), dtype=torch.int32),
        x.new_empty((n, c) if pool == "gem" else (0,), dtype=acc_dtype),
    )


@torch.library.custom_op("gmp_triton::pool_backward", mutates_args=())
def pool_backward(
    grad_pooled: Tensor,
    index: Tensor,
    pooled: Tensor,
    x: Tensor | None,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
    pool: str,
    gem_p: Tensor | None,
    gem_eps: float,
    sizes: Tensor | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The input gradient of ``pool_forward``; ``x`` is needed for GeM only."""
    return _impl(grad_pooled).pool_backward(
        grad_pooled,
        index if index.numel() else None,
        pooled,
        x,
        size,
        channels_last,
        dtype,
        pool,
        sizes,
        mask,
        gem_p,
        gem_eps,
    )


@pool_backward.register_fake
def _(grad_pooled, index, pooled, x, size, channels_last, dtype, *rest, **kwargs):
    return cpu_path.empty_grad(size, channels_last, dtype, grad_pooled.device)


def _pool_setup_context(ctx, inputs, output) -> None:
    x, pool, gem_p, gem_eps, sizes, mask = inputs
    pooled, index, gem_dp = output
    ctx.mark_non_differentiable(index, gem_dp)
    # GeM's gradient depends on the input values, so only GeM keeps the input for backward.
    ctx.save_for_backward(index, pooled, gem_dp, x if pool == "gem" else None, gem_p, sizes, mask)
    ctx.pool, ctx.gem_eps = pool, gem_eps
    ctx.size = list(x.shape)
    ctx.channels_last = grad_layout_is_channels_last(x)
    ctx.dtype = x.dtype


def _pool_backward(ctx, grad_pooled, _grad_index, _grad_gem_dp):
    if torch.is_grad_enabled():
        raise RuntimeError("the pooling family does not support double backward (create_graph)")
    index, pooled, gem_dp, x, gem_p, sizes, mask = ctx.saved_tensors
    grad_x = pool_backward(
        grad_pooled,
        index,
        pooled,
        x,
        ctx.size,
        ctx.channels_last,
        ctx.dtype,
        ctx.pool,
        gem_p,
        ctx.gem_eps,
        sizes,
        mask,
    )
    grad_p = None
    if ctx.pool == "gem" and ctx.needs_input_grad[2]:
        grad_p = (grad_pooled.to(gem_dp.dtype) * gem_dp).sum().reshape(gem_p.shape)
        grad_p = grad_p.to(gem_p.dtype)
    return grad_x, None, grad_p, None, None, None


pool_forward.register_autograd(_pool_backward, setup_context=_pool_setup_context)


@torch.library.custom_op("gmp_triton::l2_normalize", mutates_args=())
def l2_normalize(pooled: Tensor, eps: float, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Rows of ``pooled`` divided by ``max(norm, eps)``, as ``out_dtype``, and the norm
    (accumulated in fp32, fp64 for an fp64 ``out_dtype``)."""
    return _impl(pooled).l2norm_forward(pooled, eps, out_dtype)


@l2_normalize.register_fake
def _(pooled, eps, out_dtype):
    acc_dtype = cpu_path.accumulation_dtype(out_dtype)
    return pooled.new_empty(pooled.shape, dtype=out_dtype), pooled.new_empty(
        (pooled.shape[0],), dtype=acc_dtype
    )


def _l2_normalize_setup_context(ctx, inputs, output) -> None:
    pooled, eps, _ = inputs
    _, norm = output
    ctx.mark_non_differentiable(norm)
    ctx.save_for_backward(pooled, norm)
    ctx.eps = eps


def _l2_normalize_backward(ctx, grad_out, _grad_norm):
    if torch.is_grad_enabled():
        raise RuntimeError("l2_normalize does not support double backward (create_graph)")
    pooled, norm = ctx.saved_tensors
    grad = l2norm_backward(grad_out, pooled, norm, ctx.eps)
    return grad.to(pooled.dtype), None, None


l2_normalize.register_autograd(_l2_normalize_backward, setup_context=_l2_normalize_setup_context)
