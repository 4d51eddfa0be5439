"""Comparisons whose failure message lists the first mismatching elements."""

import torch

# Tolerances for values of order one (unit embeddings and their gradients), by dtype: about one
# rounding step of the dtype, since both sides accumulate in fp32 (fp64) and round once.
TOLERANCES = {
    torch.float64: dict(atol=1e-12, rtol=1e-10),
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=8e-3, rtol=1.6e-2),
}


def _describe_mismatch(actual, expected, bad, what, limit=5):
    where = bad.nonzero()[:limit].tolist()
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first ones:"]
    for index in where:
        i = tuple(index)
        lines.append(f"  at {i}: got {actual[i].item()!r}, expected {expected[i].item()!r}")
    return "\n".join(lines)


def _check_meta(actual, expected, what):
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-exact equality, NaN equal to NaN."""
    _check_meta(actual, expected, what)
    both_nan = actual.isnan() & expected.isnan() if actual.is_floating_point() else False
    bad = ~((actual == expected) | both_nan)
    if bad.any():
        raise AssertionError(_describe_mismatch(actual, expected, bad, what))


def assert_near(actual: torch.Tensor, expected: torch.Tensor, what: str, **tolerance) -> None:
    """``|actual - expected| <= atol + rtol * |expected|`` with the dtype's tolerance unless
    given; NaN must match NaN and infinities must match exactly."""
    _check_meta(actual, expected, what)
    tol = TOLERANCES[expected.dtype] | tolerance
    a, e = actual.double(), expected.double()
    both_nan = a.isnan() & e.isnan()
    same_inf = a.isinf() & e.isinf() & (a == e)
    finite = a.isfinite() & e.isfinite()
    close = finite & ((a - e).abs() <= tol["atol"] + tol["rtol"] * e.abs())
    bad = ~(both_nan | same_inf | close)
    if bad.any():
        raise AssertionError(_describe_mismatch(actual, expected, bad, f"{what} ({tol})"))
