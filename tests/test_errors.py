"""Bad input raises an error that names the problem; empty batches need no kernel."""

import pytest
import torch
from conftest import CPU_BACKENDS

import gmp_triton
from gmp_triton import _backend, launch

FUNCTIONS = [gmp_triton.global_max_pool, gmp_triton.gmp_l2norm]


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(2, 3), r"\(N, C, H, W\) or \(N, C, L\).*2-d"),
        (torch.randn(1, 2, 3, 4, 5), r"5-d"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.int64), r"torch.int64"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.bool), r"torch.bool"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.float8_e4m3fn), r"float8_e4m3fn"),
        (torch.zeros(2, 3, 4, 4, dtype=torch.complex64), r"complex64"),
        (torch.zeros(2, 3, 0, 4), r"H is 0"),
        (torch.zeros(2, 3, 4, 0), r"W is 0"),
        (torch.zeros(2, 3, 0), r"L is 0"),
        ([[1.0, 2.0]], r"expected a torch.Tensor, got list"),
    ],
)
def test_bad_input_names_the_problem(fn, x, message):
    with pytest.raises((ValueError, TypeError), match=message):
        fn(x)


@pytest.mark.parametrize("eps", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        gmp_triton.gmp_l2norm(torch.randn(2, 3, 4, 4), eps=eps)


class _NoLaunch:
    """Stands in for a kernel: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError(f"a kernel was launched with grid {grid}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("shape", [(0, 5, 3, 3), (0, 5, 7), (4, 0, 3, 3)])
def test_empty_batch_gives_empty_result_and_zero_gradient(backend, fn, shape, monkeypatch):
    for name in dir(launch):
        if name.endswith("_kernel"):
            monkeypatch.setattr(launch, name, _NoLaunch())
    x = torch.randn(shape, requires_grad=True)
    with _backend.cpu_backend(backend):
        out = fn(x)
        out.sum().backward()
    assert out.shape == shape[:2]
    assert x.grad.shape == x.shape
    assert torch.count_nonzero(x.grad) == 0


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_all_zero_input_gives_zero_embedding_not_nan(backend):
    x = torch.zeros(3, 4, 5, 5, requires_grad=True)
    with _backend.cpu_backend(backend):
        out = gmp_triton.gmp_l2norm(x)
        out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 4))
    assert not x.grad.isnan().any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_sum_of_squares_past_fp16_range(backend):
    # Each pooled value squared is 2**20, beyond float16's 65504: the norm must still be right.
    x = torch.full((2, 16, 3, 3), 1024.0, dtype=torch.float16)
    with _backend.cpu_backend(backend):
        out = gmp_triton.gmp_l2norm(x)
    assert torch.equal(out, torch.full((2, 16), 0.25, dtype=torch.float16))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_forced_int64_offsets_give_the_same_result(backend, monkeypatch):
    """The int64 offset path (taken for tensors past 2**31 elements) computes the same values;
    it is forced here because such a tensor is too large for the interpreter."""
    x = torch.randn(2, 5, 6, 7).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with _backend.cpu_backend(backend):
        expected = gmp_triton.gmp_l2norm(x)
        (expected_grad,) = torch.autograd.grad(expected.sum(), x)
        monkeypatch.setattr(launch, "_needs_int64", lambda *tensors: True)
        out = gmp_triton.gmp_l2norm(x)
        (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(out, expected)
    assert torch.equal(grad, expected_grad)


def test_int64_offsets_chosen_for_large_tensors():
    small = torch.empty(2, 3, 4, 4)
    # A meta tensor has strides but no memory, so a huge layout costs nothing here.
    huge_view = torch.empty_strided((2, 3, 4, 4), (2**31, 1, 1, 1), device="meta")
    assert not launch._needs_int64(small)
    assert launch._needs_int64(huge_view)
