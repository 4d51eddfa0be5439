"""gradcheck in fp64 and torch.library.opcheck on every registered op, for both CPU backends."""

import os

import pytest
import torch
from conftest import CPU_BACKENDS
from strategies import forced_split

import gmp_triton
from gmp_triton import _backend, ops

# Full gradcheck probes every input element, one interpreted launch each; the fast mode checks
# random projections of the Jacobian instead. GMP_HYPOTHESIS_PROFILE=deep runs the full check.
DEEP = os.environ.get("GMP_HYPOTHESIS_PROFILE", "ci") == "deep"
# Random values have no ties, so max pooling is differentiable where gradcheck probes it.
SHAPES = [(2, 3, 4, 5), (1, 4, 1, 1), (3, 2, 7)]


def _inputs(shape, layout, dtype=torch.float64):
    x = torch.randn(shape, dtype=dtype, generator=torch.Generator().manual_seed(sum(shape)))
    if layout == "channels_last":
        x = (
            x.contiguous(memory_format=torch.channels_last)
            if x.dim() == 4
            else (x.transpose(1, 2).contiguous().transpose(1, 2))
        )
    return x


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("split", [None, (3, 1)])
def test_gradcheck_fp64(backend, shape, layout, split):
    x = _inputs(shape, layout).requires_grad_(True)
    fast = backend == "triton" and not DEEP
    with _backend.cpu_backend(backend), forced_split(split):
        assert torch.autograd.gradcheck(gmp_triton.global_max_pool, (x,), fast_mode=fast)
        assert torch.autograd.gradcheck(
            lambda t: gmp_triton.gmp_l2norm(t, eps=1e-12),
            (x,),
            fast_mode=fast,
        )
        # Below eps the norm is clamped and the gradient is g / eps. The probe step stays far
        # below the gaps between values, so no argmax changes under it.
        small = (x.detach() * 1e-4).requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda t: gmp_triton.gmp_l2norm(t, eps=1.0),
            (small,),
            eps=1e-9,
            fast_mode=fast,
        )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(backend, layout, dtype):
    x = _inputs((2, 3, 4, 5), layout, dtype)
    with _backend.cpu_backend(backend):
        torch.library.opcheck(ops.gmp_forward, (x.requires_grad_(True),))
        torch.library.opcheck(ops.gmp_l2norm_forward, (x, 1e-12))
        out, pooled, index, norm = ops.gmp_l2norm_forward(x.detach(), 1e-12)
        grad_pooled = torch.randn(pooled.shape, dtype=norm.dtype)
        channels_last = layout == "channels_last"
        torch.library.opcheck(
            ops.gmp_backward, (grad_pooled, index, list(x.shape), channels_last, x.dtype)
        )
        torch.library.opcheck(ops.l2norm_backward, (out.float(), pooled, norm, 1e-12))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradient_keeps_the_input_layout(backend, layout):
    x = _inputs((2, 3, 4, 5), layout, torch.float32).requires_grad_(True)
    with _backend.cpu_backend(backend):
        gmp_triton.gmp_l2norm(x).sum().backward()
    assert x.grad.stride() == x.stride()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_global_max_pool_double_backward(backend):
    x = _inputs((2, 3, 4, 5), "contiguous", torch.float64).requires_grad_(True)
    with _backend.cpu_backend(backend):
        assert torch.autograd.gradgradcheck(gmp_triton.global_max_pool, (x,), fast_mode=True)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gmp_l2norm_double_backward_is_refused_clearly(backend):
    x = _inputs((2, 3, 4, 5), "contiguous", torch.float64).requires_grad_(True)
    with _backend.cpu_backend(backend), pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(gmp_triton.gmp_l2norm(x).sum(), x, create_graph=True)
