"""Batches of images of different sizes: zero-padded to the largest, with each image's size.

``train --mixed-sizes`` builds its training batches with ``MixedCanvasBatch``: every digit gets
a canvas of its own random side, the canvases are padded into one batch with
``gmp_triton.pad_maps``, and the model pools each feature map over its own canvas only. The
held-out images are then embedded in padded batches as well (``padded_batches``).
"""

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from ..padding import pad_maps
from .data import place_on_canvases


class PaddedImages(NamedTuple):
    """A zero-padded batch ``(N, C, H, W)`` and the ``(N, 2)`` valid ``(h, w)`` of each image,
    top-left aligned. It moves to a device like a tensor (``.to``), so the training loop hands
    it to the model as it would a batch tensor; the model passes ``sizes`` to its head."""

    images: Tensor
    sizes: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PaddedImages":
        return PaddedImages(
            self.images.to(device, non_blocking=non_blocking),
            self.sizes.to(device, non_blocking=non_blocking),
        )

    def __len__(self) -> int:
        return len(self.images)


class MixedCanvasBatch:
    """Collate function that places each digit of a batch on a canvas of its own random side,
    drawn from ``canvas_min..canvas_max``, and pads the canvases into one batch."""

    def __init__(self, canvas_min: int, canvas_max: int, noise: float, generator: torch.Generator):
        self.canvas_min, self.canvas_max, self.noise = canvas_min, canvas_max, noise
        self.generator = generator

    def __call__(self, samples: list[tuple[Tensor, int]]) -> tuple[PaddedImages, Tensor]:
        digits = torch.stack([digit for digit, _ in samples])
        labels = torch.tensor([label for _, label in samples])
        sides = torch.randint(
            self.canvas_min, self.canvas_max + 1, (len(samples),), generator=self.generator
        )
        canvases = place_on_canvases(digits, sides.tolist(), self.noise, self.generator)
        return PaddedImages(*pad_maps(canvases)), labels


def padded_batches(
    images: Tensor | Sequence[Tensor], batch_size: int
) -> Iterator[tuple[list[int], PaddedImages]]:
    """Yield ``(indices, padded batch)`` for consecutive chunks of ``images``, whatever their
    sizes."""
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        yield list(range(start, stop)), PaddedImages(*pad_maps(list(images[start:stop])))
