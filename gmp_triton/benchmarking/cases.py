"""What the benchmarks measure: the shape grids and the ideal byte model.

Bytes are counted from an ideal model, the least traffic any implementation needs, and the same
model is used for every implementation so that GB/s compare like with like:

* forward: read the feature map once and write the ``(N, C)`` output;
* backward: write the input gradient once and read the small tensors: the output gradient
  ``(N, C)``, the pooled values ``(N, C)``, the int32 index ``(N, C)`` and the norm ``(N,)`` (fp32,
  fp64 for fp64 input);
* forward+backward: the sum of the two.
"""

import dataclasses
import math

import torch

MODES = ("forward", "backward", "forward+backward")
LAYOUTS = ("NCHW", "channels_last")
INDEX_BYTES = 4


@dataclasses.dataclass(frozen=True)
class Shape:
    """A feature map ``(N, C, *spatial)`` with a name saying where such maps occur."""

    name: str
    n: int
    c: int
    spatial: tuple[int, ...]

    @property
    def size(self) -> tuple[int, ...]:
        return (self.n, self.c, *self.spatial)

    @property
    def positions(self) -> int:
        return math.prod(self.spatial)

    def label(self) -> str:
        return f"{self.n}x{self.c}x" + "x".join(map(str, self.spatial))


# Both ends of real use: many samples with small maps (classification heads) and few samples with
# large maps (early layers, dense retrieval features).
CUDA_SHAPES = (
    Shape("ResNet-50 head", 32, 2048, (7, 7)),
    Shape("ResNet-50 head", 256, 2048, (7, 7)),
    Shape("early layer", 1, 256, (56, 56)),
    Shape("early layer", 8, 256, (56, 56)),
    Shape("early layer", 1, 256, (128, 128)),
    Shape("early layer", 8, 256, (128, 128)),
    Shape("ViT map", 64, 768, (14, 14)),
)
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The CPU report keeps one map of each kind at its real size, so that it runs in minutes on a
# couple of cores.
CPU_SHAPES = (
    Shape("ResNet-50 head", 32, 2048, (7, 7)),
    Shape("early layer", 1, 256, (56, 56)),
    Shape("ViT map", 64, 768, (14, 14)),
)
CPU_DTYPES = (torch.float32, torch.bfloat16)

# A smoke run: small maps of both kinds, seconds on any machine.
QUICK_SHAPES = (
    Shape("ResNet-50 head, small batch", 4, 2048, (7, 7)),
    Shape("early layer", 1, 256, (56, 56)),
)
QUICK_DTYPES = (torch.float32,)

DTYPES_BY_NAME = {
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "fp64": torch.float64,
}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES_BY_NAME.items() if value == dtype)


@dataclasses.dataclass(frozen=True)
class Case:
    """One measured configuration: a map, a dtype and a memory layout."""

    shape: Shape
    dtype: torch.dtype
    layout: str

    def make_input(self, device: str | torch.device, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.shape.size, generator=generator, dtype=torch.float32)
        memory_format = torch.channels_last if self.layout == "channels_last" else None
        x = x.to(device=device, dtype=self.dtype)
        if memory_format is not None:
            x = x.contiguous(memory_format=memory_format)
        return x.requires_grad_(True)

    def label(self) -> str:
        return f"{self.shape.label()} {dtype_name(self.dtype)} {self.layout}"


def ideal_bytes(case: Case, mode: str) -> int:
    """Bytes an ideal implementation moves for ``mode`` (see the module docstring)."""
    element = torch.empty((), dtype=case.dtype).element_size()
    norm_element = 8 if case.dtype == torch.float64 else 4
    n, c = case.shape.n, case.shape.c
    feature_map = n * c * case.shape.positions * element
    rows = n * c * element
    forward = feature_map + rows
    backward = feature_map + 2 * rows + n * c * INDEX_BYTES + n * norm_element
    return {"forward": forward, "backward": backward, "forward+backward": forward + backward}[mode]


def make_cases(shapes, dtypes, layouts) -> list[Case]:
    """Dtype by dtype, so that a run cut short by its time budget has whole dtypes measured."""
    return [
        Case(shape, dtype, layout) for dtype in dtypes for shape in shapes for layout in layouts
    ]
