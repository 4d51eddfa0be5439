"""Launchers: allocate outputs, pick block sizes and grids, and call the Triton kernels.

Every function here takes and returns plain tensors; autograd and validation live in ``ops`` and
``functional``. Inputs are (N, C, H, W) or (N, C, L) and are read through their strides.
"""

import contextlib
import functools
import math
from collections.abc import Sequence

import torch
import triton.language as tl

from . import cpu_path
from .kernels import heuristics
from .kernels.global_max_pool import (
    ALL_POSITIONS,
    MASK,
    SIZES,
    gmp_backward_kernel,
    gmp_combine_kernel,
    gmp_forward_kernel,
    l2norm_backward_kernel,
    l2norm_forward_kernel,
)

# Triton's interpreter runs the programs of a grid one after another: pretending the "device"
# has a single multiprocessor keeps grids short, while large maps still take the split path.
INTERPRETER_NUM_SMS = 1
INT32_LIMIT = 2**31 - 1

# Tests set these to force a particular split; ``None`` lets the heuristics choose.
forced_splits: int | None = None
forced_block_s: int | None = None

_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_NUM_SMS


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _max_offset(tensor: torch.Tensor) -> int:
    return sum(
        (size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True)
    )


def _needs_int64(*tensors: torch.Tensor) -> bool:
    return any(t.numel() > 0 and _max_offset(t) >= INT32_LIMIT for t in tensors)


def as_channels_positions(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """``x`` seen as ``x[n, c, s]`` with ``s = h * W + w``: the tensor to read and its strides
    ``(stride_n, stride_c, stride_s)``. Views whose H and W cannot be merged are copied first."""
    if x.dim() == 3:
        return (x, *x.stride())
    _, _, height, width = x.shape
    stride_n, stride_c, stride_h, stride_w = x.stride()
    if width == 1:
        return x, stride_n, stride_c, stride_h
    if height == 1 or stride_h == width * stride_w:
        return x, stride_n, stride_c, stride_w
    return as_channels_positions(x.contiguous())


def channels_are_contiguous(stride_c: int, stride_s: int, positions: int) -> bool:
    """Whether a tile must run along the channels (channels_last) rather than the positions."""
    return stride_c == 1 and (stride_s != 1 or positions == 1)


def _tile_config(
    n: int, c: int, s: int, channels_contiguous: bool, device
) -> heuristics.TileConfig:
    config = heuristics.tile_config(
        n, c, s, channels_contiguous, _num_sms(device), forced_splits, forced_block_s
    )
    if config.grid_size(n) > heuristics.MAX_GRID:
        raise ValueError(
            f"global max pool: {n} samples x {c} channels need {config.grid_size(n)} programs, "
            f"more than the {heuristics.MAX_GRID} CUDA allows in one launch"
        )
    return config


def gmp_forward(
    x: torch.Tensor, sizes: torch.Tensor | None = None, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Max and first argmax over the positions: ``pooled`` (N, C) in ``x.dtype``, ``index``
    (N, C) int32 positions in row-major (h, w) order.

    ``sizes`` (N, 2) limits sample n to its top-left ``sizes[n]`` corner; ``mask`` (N, S) to the
    positions where it is non-zero. Both are checked by the caller."""
    n, c = x.shape[0], x.shape[1]
    positions = math.prod(x.shape[2:])
    pooled = torch.empty((n, c), dtype=x.dtype, device=x.device)
    index = torch.empty((n, c), dtype=torch.int32, device=x.device)
    if n == 0 or c == 0:
        return pooled, index

    source, stride_n, stride_c, stride_s = as_channels_positions(x)
    config = _tile_config(
        n, c, positions, channels_are_contiguous(stride_c, stride_s, positions), x.device
    )
    if config.num_splits == 1:
        part_val, part_idx = pooled, index
    else:
        part_val = torch.empty((n, config.num_splits, c), dtype=x.dtype, device=x.device)
        part_idx = torch.empty((n, config.num_splits, c), dtype=torch.int32, device=x.device)
    index_64 = _needs_int64(source, part_val)
    acc_dtype = _acc_dtype(x.dtype)
    # Unused pointer arguments still need a tensor; the index tensor is a harmless stand-in.
    validity, sizes_arg, mask_arg, mask_strides = ALL_POSITIONS, index, index, (0, 0)
    if sizes is not None:
        validity, sizes_arg = SIZES, sizes.to(torch.int32).contiguous()
    if mask is not None:
        # Triton reads bool tensors as 1-bit values; the same bytes as uint8 load plainly.
        mask_arg = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
        validity, mask_strides = MASK, mask_arg.stride()

    with _device_guard(x):
        gmp_forward_kernel[(config.grid_size(n),)](
            source,
            part_val,
            part_idx,
            sizes_arg,
            mask_arg,
            c,
            positions,
            x.shape[-1],
            config.positions_per_split,
            config.num_c_blocks,
            config.num_splits,
            stride_n,
            stride_c,
            stride_s,
            *mask_strides,
            BLOCK_C=config.block_c,
            BLOCK_S=config.block_s,
            VALIDITY=validity,
            ACC_DTYPE=acc_dtype,
            INDEX_64=index_64,
            num_warps=config.num_warps,
        )
        if config.num_splits > 1:
            block, num_warps = heuristics.row_config(c)
            num_c_blocks = heuristics.cdiv(c, block)
            gmp_combine_kernel[(n * num_c_blocks,)](
                part_val,
                part_idx,
                pooled,
                index,
                c,
                num_c_blocks,
                config.num_splits,
                BLOCK_C=block,
                ACC_DTYPE=acc_dtype,
                INDEX_64=index_64,
                num_warps=num_warps,
            )
    return pooled, index


def l2norm_forward(pooled: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``out = pooled / max(||pooled||, eps)`` per row, and the norm in the accumulation dtype."""
    n, c = pooled.shape
    out = torch.empty_like(pooled)
    norm = torch.empty(n, dtype=cpu_path.accumulation_dtype(pooled.dtype), device=pooled.device)
    if n == 0:
        return out, norm
    if c == 0:
        return out, norm.zero_()
    block, num_warps = heuristics.row_config(c)
    with _device_guard(pooled):
        l2norm_forward_kernel[(n,)](
            pooled,
            out,
            norm,
            c,
            eps,
            BLOCK_C=block,
            ACC_DTYPE=_acc_dtype(pooled.dtype),
            INDEX_64=_needs_int64(pooled),
            num_warps=num_warps,
        )
    return out, norm


def l2norm_backward(
    grad_out: torch.Tensor, pooled: torch.Tensor, norm: torch.Tensor, eps: float
) -> torch.Tensor:
    """Gradient with respect to ``pooled`` of ``l2norm_forward``, in the accumulation dtype."""
    n, c = pooled.shape
    grad_pooled = torch.empty((n, c), dtype=norm.dtype, device=pooled.device)
    if n == 0 or c == 0:
        return grad_pooled
    grad_out = grad_out.contiguous()
    block, num_warps = heuristics.row_config(c)
    with _device_guard(pooled):
        l2norm_backward_kernel[(n,)](
            grad_out,
            pooled,
            norm,
            grad_pooled,
            c,
            eps,
            BLOCK_C=block,
            ACC_DTYPE=_acc_dtype(pooled.dtype),
            INDEX_64=_needs_int64(pooled),
            num_warps=num_warps,
        )
    return grad_pooled


def gmp_backward(
    grad_pooled: torch.Tensor,
    index: torch.Tensor,
    size: Sequence[int],
    channels_last: bool,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The input gradient: ``grad_pooled[n, c]`` at ``index[n, c]``, zero elsewhere, written in
    one pass in the input's layout family."""
    grad_x = cpu_path.empty_grad(size, channels_last, dtype, grad_pooled.device)
    n, c = size[0], size[1]
    positions = math.prod(size[2:])
    if grad_x.numel() == 0:
        return grad_x

    target, stride_n, stride_c, stride_s = as_channels_positions(grad_x)
    config = _tile_config(
        n, c, positions, channels_are_contiguous(stride_c, stride_s, positions), grad_x.device
    )
    grad_pooled = grad_pooled.contiguous()
    with _device_guard(grad_x):
        gmp_backward_kernel[(config.grid_size(n),)](
            grad_pooled,
            index,
            target.view(_INT_OF_WIDTH[target.element_size()]),
            c,
            positions,
            config.positions_per_split,
            config.num_c_blocks,
            config.num_splits,
            stride_n,
            stride_c,
            stride_s,
            BLOCK_C=config.block_c,
            BLOCK_S=config.block_s,
            GRAD_DTYPE=_triton_dtype(dtype),
            ACC_DTYPE=_acc_dtype(grad_pooled.dtype),
            INDEX_64=_needs_int64(target),
            num_warps=config.num_warps,
        )
    return grad_x


def _triton_dtype(dtype: torch.dtype):
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]
