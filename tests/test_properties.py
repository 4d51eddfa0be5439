"""Property tests: every CPU implementation against PyTorch's reference ops.

For each feature map the interpreted Triton kernels and the PyTorch path must give
- pooled values bit-identical to ``adaptive_max_pool2d`` / ``adaptive_max_pool1d``,
- the gradient of each channel at its first maximal position (the index
  ``adaptive_max_pool2d`` reports) or, for a channel holding NaN, at its first NaN,
- ``gmp_l2norm`` within one rounding step of ``F.normalize`` computed in fp32 (fp64),
  and its gradient within the same tolerance of autograd through the reference ops.
"""

import pytest
import torch
import torch.nn.functional as F
from compare import assert_near, assert_same
from conftest import CPU_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from strategies import feature_maps, forced_split, splits

import gmp_triton
from gmp_triton import _backend


def _accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and flat winning positions from PyTorch's adaptive max pooling, with the NaN rule
    of ``torch.amax``: a channel holding NaN points at its first NaN."""
    if x.dim() == 4:
        values, index = F.adaptive_max_pool2d(x, 1, return_indices=True)
    else:
        values, index = F.adaptive_max_pool1d(x, 1, return_indices=True)
    values, index = values.flatten(1), index.flatten(1)
    flat_nan = x.flatten(2).isnan()
    first_nan = flat_nan.to(torch.uint8).argmax(dim=2)
    return values, torch.where(flat_nan.any(dim=2), first_nan, index)


def scatter_like(x: torch.Tensor, index: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    flat = torch.zeros(x.shape[0], x.shape[1], x[0, 0].numel(), dtype=grad.dtype)
    flat.scatter_(2, index.unsqueeze(2), grad.unsqueeze(2))
    return flat.view(x.shape)


def _backward(fn, x, grad_out):
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad_out)
    return out.detach(), leaf.grad


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(x=feature_maps(), split=splits, seed=st.integers(0, 2**31 - 1))
def test_global_max_pool_matches_reference(backend, x, split, seed):
    ref_values, ref_index = reference_pool(x)
    grad_out = torch.randn(ref_values.shape, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(x.dtype)

    with _backend.cpu_backend(backend), forced_split(split):
        pooled, grad_x = _backward(gmp_triton.global_max_pool, x, grad_out)

    assert_same(pooled, ref_values, "pooled values")
    assert_same(grad_x, scatter_like(x, ref_index, grad_out), "input gradient")
    if x.dim() == 4 and not x.isnan().any():
        # Without NaN the routing is exactly adaptive_max_pool2d's own backward.
        _, ref_grad = _backward(lambda t: F.adaptive_max_pool2d(t, 1).flatten(1), x, grad_out)
        assert_same(grad_x, ref_grad, "input gradient vs adaptive_max_pool2d")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(x=feature_maps(), split=splits, seed=st.integers(0, 2**31 - 1))
def test_gmp_l2norm_matches_reference(backend, x, split, seed):
    eps = 1e-12
    acc = _accumulation(x.dtype)
    ref_values, ref_index = reference_pool(x)
    grad_out = torch.randn(ref_values.shape, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(x.dtype)

    # Reference: F.normalize in the accumulation dtype on the exact pooled values, its autograd
    # gradient routed to the reference positions.
    ref_out, ref_grad_pooled = _backward(
        lambda p: F.normalize(p, dim=1, eps=eps), ref_values.to(acc), grad_out.to(acc)
    )
    ref_grad_x = scatter_like(x, ref_index, ref_grad_pooled.to(x.dtype))

    with _backend.cpu_backend(backend), forced_split(split):
        out, grad_x = _backward(lambda t: gmp_triton.gmp_l2norm(t, eps=eps), x, grad_out)

    assert_near(out, ref_out.to(x.dtype), "normalised output")
    assert_near(grad_x, ref_grad_x, "input gradient")
    finite_rows = ref_values.isfinite().all(dim=1) & (ref_values.to(acc).norm(dim=1) > eps)
    lengths = out[finite_rows].to(acc).norm(dim=1)
    assert_near(lengths, torch.ones_like(lengths), "row lengths", atol=2e-2, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@given(x=feature_maps(dtypes=[torch.float32], patterns=["normal"]))
def test_layouts_give_identical_results(backend, x):
    """The same values in NCHW, channels_last and a strided view give the same bits."""
    with _backend.cpu_backend(backend):
        results = [
            gmp_triton.gmp_l2norm(y)
            for y in (
                x.contiguous(),
                x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x,
                x.transpose(1, 2).contiguous().transpose(1, 2) if x.dim() == 3 else x,
            )
        ]
    for other in results[1:]:
        assert_same(other, results[0], "output across layouts")
