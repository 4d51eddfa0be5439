"""The implementations a benchmark compares.

* ``gmp_triton``: this package's ``gmp_l2norm`` (Triton kernels on CUDA; on the CPU, its PyTorch
  path, which is what a CPU tensor runs).
* ``eager_adaptive``: ``F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1))``, the layer it
  replaces.
* ``eager_amax``: ``F.normalize(x.amax(dim=(2, 3)))``, the same values with a reduction op
  (its gradient splits evenly between tied maxima instead of going to the first).
* ``compiled_adaptive``, ``compiled_amax``: ``torch.compile`` of the two references.
"""

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F

import gmp_triton

EPS = 1e-12
BASELINE_OF_REPORT = "gmp_triton"


def gmp_triton_head(x: torch.Tensor) -> torch.Tensor:
    return gmp_triton.gmp_l2norm(x, eps=EPS)


def adaptive_max_pool_reference(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1), dim=1, eps=EPS)


def amax_reference(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x.amax(dim=(2, 3)), dim=1, eps=EPS)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    description: str
    function: Callable[[torch.Tensor], torch.Tensor]
    compiled: bool = False

    def build(self, compile_mode: str) -> Callable[[torch.Tensor], torch.Tensor]:
        """The callable to time; ``compile_mode`` is "static" or "dynamic" for compiled ones."""
        if not self.compiled:
            return self.function
        return torch.compile(self.function, dynamic=compile_mode == "dynamic")


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider("gmp_triton", "`gmp_triton.gmp_l2norm(x)`", gmp_triton_head),
        Provider(
            "eager_adaptive",
            "`F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1))`",
            adaptive_max_pool_reference,
        ),
        Provider("eager_amax", "`F.normalize(x.amax(dim=(2, 3)))`", amax_reference),
        Provider(
            "compiled_adaptive",
            "`torch.compile` of `F.normalize(F.adaptive_max_pool2d(x, 1).flatten(1))`",
            adaptive_max_pool_reference,
            compiled=True,
        ),
        Provider(
            "compiled_amax",
            "`torch.compile` of `F.normalize(x.amax(dim=(2, 3)))`",
            amax_reference,
            compiled=True,
        ),
    )
}
