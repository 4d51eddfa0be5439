"""pytest-benchmark suites: gmp_triton and the PyTorch references, per map, dtype, layout and mode.

    pytest benchmarks/ --benchmark-only

On a CUDA GPU the grid is the report's full CUDA grid; elsewhere the CPU grid (the package's
PyTorch path against eager PyTorch). pytest-benchmark times with warm caches and, on CUDA, a
synchronisation after each call; ``gmp-triton bench`` is the reference measurement (L2 flushed,
CUDA events, bytes and copy ceiling). Each result carries its ideal bytes and GB/s in
``extra_info``, so ``--benchmark-json`` output holds them too.
"""

import functools

import pytest
import torch

from gmp_triton.benchmarking import cases
from gmp_triton.benchmarking.providers import PROVIDERS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cuda":
    CASES = cases.make_cases(cases.CUDA_SHAPES, cases.CUDA_DTYPES, cases.LAYOUTS)
else:
    CASES = cases.make_cases(cases.CPU_SHAPES, cases.CPU_DTYPES, cases.LAYOUTS)


@functools.cache
def built(provider: str):
    # One compiled function per provider for the whole session, with dynamic shapes.
    return PROVIDERS[provider].build("dynamic")


def synchronised(fn):
    if DEVICE != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize()

    return call


@pytest.mark.parametrize("mode", cases.MODES)
@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=cases.Case.label)
def test_speed(benchmark, case, provider, mode):
    function = built(provider)
    x = case.make_input(DEVICE)
    out = function(x)
    grad = torch.randn_like(out)
    calls = {
        "forward": lambda: function(x),
        "backward": lambda: torch.autograd.grad(out, x, grad, retain_graph=True),
        "forward+backward": lambda: torch.autograd.grad(function(x), x, grad),
    }
    benchmark.group = f"{case.label()} {mode}"
    benchmark(synchronised(calls[mode]))

    moved = cases.ideal_bytes(case, mode)
    benchmark.extra_info.update(
        device=DEVICE, ideal_bytes=moved, gbps=moved / benchmark.stats.stats.median / 1e9
    )
