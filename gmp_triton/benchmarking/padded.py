"""Padded batch against a loop over items: pooling maps of different sizes.

Maps of different sizes (detections, crops, images kept at their own resolution) can be pooled
one at a time in a Python loop, or padded into one batch and pooled in one call with their
``sizes``. The implementations timed, each forward, backward and forward+backward:

* ``padded``: ``gmp_l2norm(batch, sizes)`` on the zero-padded batch (one call);
* ``pad_then_pool``: ``pad_maps(maps)`` then the same call: the cost when the maps come as a
  list, the copy included;
* ``loop``: ``gmp_l2norm(map)`` for each map;
* ``loop_eager``: ``F.normalize(F.adaptive_max_pool2d(map, 1).flatten(1))`` for each map.

All four give the same embeddings; each result records its largest difference from
``loop_eager``.
"""

import dataclasses
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

import gmp_triton

from . import measure
from .cases import MODES, dtype_name

logger = logging.getLogger(__name__)

EPS = 1e-12
REFERENCE = "loop_eager"


@dataclasses.dataclass(frozen=True)
class PaddedCase:
    """``n`` maps of ``c`` channels, each side drawn uniformly from ``side_min..side_max``
    (height and width apart), with a fixed seed."""

    name: str
    n: int
    c: int
    side_min: int
    side_max: int
    dtype: torch.dtype = torch.float32
    seed: int = 0

    def sizes(self) -> list[tuple[int, int]]:
        generator = torch.Generator().manual_seed(self.seed)
        sides = torch.randint(self.side_min, self.side_max + 1, (self.n, 2), generator=generator)
        return [(h, w) for h, w in sides.tolist()]

    def make_maps(self, device: str | torch.device) -> list[torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed + 1)
        return [
            torch.randn(self.c, h, w, generator=generator).to(device=device, dtype=self.dtype)
            for h, w in self.sizes()
        ]

    def positions(self) -> tuple[int, int]:
        """Valid positions over all maps, and positions of the padded batch."""
        sizes = self.sizes()
        height, width = (max(side) for side in zip(*sizes, strict=True))
        return sum(h * w for h, w in sizes), self.n * height * width

    def label(self) -> str:
        return (
            f"{self.n} maps x {self.c} ch, sides {self.side_min}-{self.side_max} "
            f"{dtype_name(self.dtype)}"
        )


# On CUDA, a realistic mix: detections or crops pooled from a ResNet stage.
CUDA_PADDED_CASES = (
    PaddedCase("padded batch", 64, 256, 7, 56, torch.float32),
    PaddedCase("padded batch", 64, 256, 7, 56, torch.bfloat16),
)
CPU_PADDED_CASES = (PaddedCase("padded batch", 16, 64, 7, 28),)
QUICK_PADDED_CASES = (PaddedCase("padded batch", 8, 32, 3, 12),)


def _padded(batch: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return gmp_triton.gmp_l2norm(batch, sizes, eps=EPS)


def _pad_then_pool(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return gmp_triton.gmp_l2norm(*gmp_triton.pad_maps(maps), eps=EPS)


def _loop(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([gmp_triton.gmp_l2norm(m.unsqueeze(0), eps=EPS) for m in maps])


def _loop_eager(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat(
        [F.normalize(F.adaptive_max_pool2d(m.unsqueeze(0), 1).flatten(1), eps=EPS) for m in maps]
    )


IMPLEMENTATIONS = {
    "padded": "`gmp_l2norm(batch, sizes)` on the padded batch",
    "pad_then_pool": "`gmp_l2norm(*pad_maps(maps))`: padding the list, then one call",
    "loop": "`gmp_l2norm(map)` for each map, in a Python loop",
    "loop_eager": "`F.normalize(F.adaptive_max_pool2d(map, 1).flatten(1))` for each map",
}


def _inputs_and_function(
    name: str, maps: list[torch.Tensor]
) -> tuple[list[torch.Tensor], Callable[[], torch.Tensor]]:
    """The leaves that receive gradients, and a function of them returning the embeddings."""
    if name == "padded":
        batch, sizes = gmp_triton.pad_maps([m.detach() for m in maps])
        batch.requires_grad_(True)
        return [batch], lambda: _padded(batch, sizes)
    leaves = [m.detach().requires_grad_(True) for m in maps]
    function = {"pad_then_pool": _pad_then_pool, "loop": _loop, "loop_eager": _loop_eager}[name]
    return leaves, lambda: function(leaves)


def _time_modes(
    name: str,
    maps: list[torch.Tensor],
    reference: torch.Tensor,
    device: str,
    timer: measure.TimerSettings,
    modes: Sequence[str],
) -> list[dict]:
    leaves, function = _inputs_and_function(name, maps)
    out = function()
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    difference = (out.detach().double() - reference.double()).abs().max().item()
    calls = {
        "forward": function,
        "backward": lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True),
        "forward+backward": lambda: torch.autograd.grad(function(), leaves, grad),
    }
    rows = []
    for mode in modes:
        timing = measure.time_function(calls[mode], device, timer)
        rows.append(
            {
                "mode": mode,
                "median_ms": timing.median_ms,
                "p20_ms": timing.p20_ms,
                "p80_ms": timing.p80_ms,
                "runs": timing.runs,
                "max_abs_difference": difference,
            }
        )
    return rows


def measure_padded_case(
    case: PaddedCase,
    device: str,
    timer: measure.TimerSettings,
    modes: Sequence[str] = MODES,
    implementations: Sequence[str] = tuple(IMPLEMENTATIONS),
) -> list[dict]:
    """One row per implementation and mode: median and 20th/80th percentile milliseconds."""
    maps = case.make_maps(device)
    with torch.no_grad():
        reference = _loop_eager(maps)
    valid, padded = case.positions()
    rows = []
    for name in implementations:
        base = {
            "case": case.label(),
            "shape_name": case.name,
            "n": case.n,
            "c": case.c,
            "sides": [case.side_min, case.side_max],
            "dtype": dtype_name(case.dtype),
            "valid_positions": valid,
            "padded_positions": padded,
            "implementation": name,
        }
        try:
            timed = _time_modes(name, maps, reference, device, timer, modes)
            rows += [base | row for row in timed]
        except Exception as error:  # one failing implementation must not end the run
            logger.warning("%s on %s failed: %s", name, case.label(), error)
            rows.append(base | {"mode": None, "error": f"{type(error).__name__}: {error}"})
    return rows
