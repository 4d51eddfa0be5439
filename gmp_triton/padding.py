"""Packing maps of different sizes into one padded batch, and back."""

from collections.abc import Sequence

import torch
from torch import Tensor


def pad_maps(
    maps: Sequence[Tensor], memory_format: torch.memory_format = torch.contiguous_format
) -> tuple[Tensor, Tensor]:
    """Stack ``(C, h_i, w_i)`` maps into a zero-padded ``(N, C, max h, max w)`` batch, each map in
    the top-left corner, and return it with the ``(N, 2)`` int64 tensor of sizes.

    The batch and sizes go straight to ``global_max_pool(batch, sizes)`` or
    ``gmp_l2norm(batch, sizes)``, which give each map's own result; ``unpad_maps`` is the way
    back. Gradients flow from the batch to the maps.
    """
    maps = list(maps)
    if not maps:
        raise ValueError("pad_maps: got no maps")
    first = maps[0]
    for i, m in enumerate(maps):
        if not isinstance(m, Tensor) or m.dim() != 3:
            shape = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise ValueError(f"pad_maps: map {i} must be a (C, h, w) tensor, got {shape}")
        if m.shape[0] != first.shape[0] or m.dtype != first.dtype or m.device != first.device:
            raise ValueError(
                f"pad_maps: map {i} has {m.shape[0]} channels, {m.dtype}, {m.device}; map 0 "
                f"has {first.shape[0]} channels, {first.dtype}, {first.device}"
            )
    sizes = torch.tensor([m.shape[1:] for m in maps], dtype=torch.int64)
    height, width = (int(v) for v in sizes.max(dim=0).values)
    batch = first.new_zeros((len(maps), first.shape[0], height, width)).contiguous(
        memory_format=memory_format
    )
    for i, m in enumerate(maps):
        batch[i, :, : m.shape[1], : m.shape[2]] = m
    return batch, sizes.to(first.device)


def unpad_maps(batch: Tensor, sizes: Tensor) -> list[Tensor]:
    """The maps of a padded batch: ``batch[i, :, :h_i, :w_i]`` for each ``(h_i, w_i)`` in
    ``sizes`` (views, not copies)."""
    if batch.dim() != 4 or tuple(sizes.shape) != (batch.shape[0], 2):
        raise ValueError(
            f"unpad_maps: expected an (N, C, H, W) batch and (N, 2) sizes, got "
            f"{tuple(batch.shape)} and {tuple(sizes.shape)}"
        )
    return [batch[i, :, :h, :w] for i, (h, w) in enumerate(sizes.tolist())]
