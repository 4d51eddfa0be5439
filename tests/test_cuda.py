"""The compiled kernels on a CUDA GPU against the PyTorch path on the CPU.

Both implement the same rules (first maximal position, NaN first, fp32/fp64 norm), so pooled
values, indices and the gradient of ``global_max_pool`` must be bit-identical, and
``gmp_l2norm`` must agree within one rounding step (the norm's sum is ordered differently).
Skipped where PyTorch sees no CUDA GPU: the CPU suite covers the same kernels through Triton's
interpreter.
"""

import pytest
import torch
from compare import assert_near, assert_same

import gmp_triton
from gmp_triton import _backend, launch, ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU to run the compiled kernels"
)

LAYOUTS = ["NCHW", "channels_last"]
# Unaligned heads (7x7), aligned early-layer maps (56x56), odd sizes, a (N, C, L) map, 1x1 maps.
SHAPES = [(4, 2048, 7, 7), (2, 256, 56, 56), (5, 37, 9, 11), (6, 100, 197), (3, 64, 1, 1)]
# Each dtype on the shapes that reach its distinct code; every new (shape, dtype, layout) costs
# a compile of each kernel, so the grid is kept to what differs.
CASES = [
    *[(shape, dtype) for shape in SHAPES for dtype in (torch.float32, torch.bfloat16)],
    *[(shape, dtype) for shape in SHAPES[:2] for dtype in (torch.float16, torch.float64)],
]
EPS = 1e-12


def make_input(shape, dtype, layout, values, seed=0) -> torch.Tensor:
    """A CPU map: ``values`` is "random", "ties" (few distinct values, many tied maxima) or
    "nan" (random with some NaN and -inf)."""
    generator = torch.Generator().manual_seed(seed)
    if values == "ties":
        x = torch.randint(-3, 3, shape, generator=generator).to(torch.float64)
    else:
        x = torch.randn(shape, generator=generator, dtype=torch.float64)
    if values == "nan":
        spots = torch.rand(shape, generator=generator)
        x = x.masked_fill(spots < 0.01, float("nan")).masked_fill(spots > 0.99, float("-inf"))
    x = x.to(dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last":
        # (N, L, C) memory seen as (N, C, L): channels contiguous, as token maps come.
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def run(fn, x: torch.Tensor, grad_out: torch.Tensor):
    leaf = x.detach().clone().requires_grad_(True)
    out = fn(leaf)
    out.backward(grad_out.to(leaf.device))
    return out.detach().cpu(), leaf.grad


def on_cpu_path(fn, x, grad_out):
    with _backend.cpu_backend("torch"):
        return run(fn, x, grad_out)


@pytest.fixture(params=[None, 3], ids=["heuristic split", "3 splits"])
def split(request, monkeypatch):
    """Let the heuristics choose, or force three splits with small tiles on every map."""
    if request.param is not None:
        monkeypatch.setattr(launch, "forced_splits", request.param)
        monkeypatch.setattr(launch, "forced_block_s", 16)
    return request.param


@pytest.fixture
def three_splits(monkeypatch):
    """Force three splits with 16-position tiles, on maps too small to be split otherwise."""
    monkeypatch.setattr(launch, "forced_splits", 3)
    monkeypatch.setattr(launch, "forced_block_s", 16)


def case_id(case) -> str:
    shape, dtype = case
    return "x".join(map(str, shape)) + "-" + str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("values", ["random", "ties", "nan"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_global_max_pool_is_bit_identical_to_the_cpu_path(case, layout, values):
    shape, dtype = case
    x = make_input(shape, dtype, layout, values)
    grad_out = torch.randn(shape[:2], generator=torch.Generator().manual_seed(1)).to(dtype)

    pooled, grad_x = run(gmp_triton.global_max_pool, x.cuda(), grad_out)
    ref_pooled, ref_grad_x = on_cpu_path(gmp_triton.global_max_pool, x, grad_out)

    assert_same(pooled, ref_pooled, "pooled values")
    assert_same(grad_x.cpu(), ref_grad_x, "input gradient")
    assert grad_x.stride() == ref_grad_x.stride(), "the gradient keeps the input's layout"


@pytest.mark.parametrize("values", ["random", "ties", "nan"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_gmp_l2norm_matches_the_cpu_path(case, layout, values):
    shape, dtype = case
    x = make_input(shape, dtype, layout, values)
    grad_out = torch.randn(shape[:2], generator=torch.Generator().manual_seed(2)).to(dtype)

    out, grad_x = run(gmp_triton.gmp_l2norm, x.cuda(), grad_out)
    ref_out, ref_grad_x = on_cpu_path(gmp_triton.gmp_l2norm, x, grad_out)
    _, pooled, index, norm = ops.gmp_l2norm_forward(x.cuda(), EPS)
    with _backend.cpu_backend("torch"):
        _, ref_pooled, ref_index, ref_norm = ops.gmp_l2norm_forward(x, EPS)

    assert_same(pooled.cpu(), ref_pooled, "pooled values")
    assert_same(index.cpu(), ref_index, "winning positions")
    assert_near(norm.cpu(), ref_norm, "norms")
    assert_near(out, ref_out, "normalised output")
    assert_near(grad_x.cpu(), ref_grad_x, "input gradient")


@pytest.mark.parametrize("values", ["random", "ties", "nan"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES[:4], ids=str)
def test_forced_splits_match_the_cpu_path(shape, layout, values, three_splits):
    # Several splits on small maps: the combine kernel and split boundaries inside ties and NaN.
    x = make_input(shape, torch.float32, layout, values)
    grad_out = torch.randn(shape[:2], generator=torch.Generator().manual_seed(5))

    pooled, grad_pool = run(gmp_triton.global_max_pool, x.cuda(), grad_out)
    out, grad_x = run(gmp_triton.gmp_l2norm, x.cuda(), grad_out)
    ref_pooled, ref_grad_pool = on_cpu_path(gmp_triton.global_max_pool, x, grad_out)
    ref_out, ref_grad_x = on_cpu_path(gmp_triton.gmp_l2norm, x, grad_out)

    assert_same(pooled, ref_pooled, "pooled values")
    assert_same(grad_pool.cpu(), ref_grad_pool, "input gradient of global_max_pool")
    assert_near(out, ref_out, "normalised output")
    assert_near(grad_x.cpu(), ref_grad_x, "input gradient of gmp_l2norm")


@pytest.mark.parametrize(
    "shape, dtype, layout",
    [
        ((256, 2048, 7, 7), torch.float16, "channels_last"),
        ((1, 256, 128, 128), torch.bfloat16, "NCHW"),
        ((8, 256, 56, 56), torch.float32, "channels_last"),
        ((64, 768, 14, 14), torch.bfloat16, "NCHW"),
    ],
    ids=str,
)
def test_benchmark_sized_maps_match_the_cpu_path(shape, dtype, layout):
    # Real sizes on the real multiprocessor count: the heuristics' own split choices.
    x = make_input(shape, dtype, layout, "random")
    grad_out = torch.randn(shape[:2], generator=torch.Generator().manual_seed(3)).to(dtype)

    out, grad_x = run(gmp_triton.gmp_l2norm, x.cuda(), grad_out)
    ref_out, ref_grad_x = on_cpu_path(gmp_triton.gmp_l2norm, x, grad_out)

    assert_near(out, ref_out, "normalised output")
    assert_near(grad_x.cpu(), ref_grad_x, "input gradient")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradcheck_fp64_on_cuda(layout, split):
    x = make_input((2, 5, 4, 6), torch.float64, layout, "random").cuda().requires_grad_(True)
    assert torch.autograd.gradcheck(gmp_triton.gmp_l2norm, (x,))
    assert torch.autograd.gradcheck(gmp_triton.global_max_pool, (x,))


def test_compiled_model_matches_eager_on_cuda():
    x = make_input((8, 512, 14, 14), torch.float32, "channels_last", "random").cuda()
    grad_out = torch.randn(8, 512, generator=torch.Generator().manual_seed(4))
    compiled = torch.compile(gmp_triton.gmp_l2norm, fullgraph=True)

    out, grad_x = run(compiled, x, grad_out)
    ref_out, ref_grad_x = run(gmp_triton.gmp_l2norm, x, grad_out)

    assert_same(out, ref_out, "compiled output")
    assert_same(grad_x, ref_grad_x, "compiled input gradient")


FAMILY = ["avg", "avgmax", "catavgmax", "gem"]


def _family(pool, p=None, sizes=None):
    def fn(t):
        exponent = None if p is None else p.to(t.device)
        size_arg = None if sizes is None else sizes.to(t.device)
        return gmp_triton.pool_l2norm(t, pool, size_arg, p=exponent)

    return fn


@pytest.mark.parametrize("pool", FAMILY)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_pool_family_matches_the_cpu_path(pool, layout, dtype, split):
    x = make_input((4, 64, 13, 9), dtype, layout, "random")
    if pool == "gem":
        x = x.abs()
    width = 128 if pool == "catavgmax" else 64
    grad_out = torch.randn(4, width, generator=torch.Generator().manual_seed(6)).to(dtype)
    p = torch.tensor([3.0], dtype=torch.float64 if dtype == torch.float64 else torch.float32)

    fn = _family(pool, p if pool == "gem" else None)
    out, grad_x = run(fn, x.cuda(), grad_out)
    ref_out, ref_grad_x = on_cpu_path(fn, x, grad_out)

    # GeM goes through the GPU's exp and log, a few ulps from the CPU's.
    tolerance = dict(atol=1e-5, rtol=1e-4) if pool == "gem" and dtype == torch.float32 else {}
    assert_near(out, ref_out, f"{pool} output", **tolerance)
    assert_near(grad_x.cpu(), ref_grad_x, f"{pool} input gradient", **tolerance)


@pytest.mark.parametrize("pool", ["max", *FAMILY])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_padded_batches_match_the_cpu_path(pool, layout, split):
    x = make_input((5, 48, 20, 17), torch.float32, layout, "random").abs()
    x[:, :, 12:, :] = float("nan")  # padding below every item but the first: never read
    sizes = torch.tensor([[20, 17], [12, 5], [0, 3], [7, 17], [12, 1]])
    grad_out = torch.randn(5, 96 if pool == "catavgmax" else 48)
    fn = _family(pool, torch.tensor([2.5]) if pool == "gem" else None, sizes)

    out, grad_x = run(fn, x.cuda(), grad_out)
    ref_out, ref_grad_x = on_cpu_path(fn, x, grad_out)

    tolerance = dict(atol=1e-5, rtol=1e-4) if pool == "gem" else {}
    assert_near(out, ref_out, f"padded {pool} output", **tolerance)
    assert_near(grad_x.cpu(), ref_grad_x, f"padded {pool} input gradient", **tolerance)


def test_masked_sequences_match_the_cpu_path(split):
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(6, 77, 384, generator=generator)
    mask = torch.rand(6, 77, generator=generator) < 0.7
    mask[2] = False  # a sequence with no valid token
    hidden = hidden.masked_fill(~mask.unsqueeze(2), float("nan"))
    grad_out = torch.randn(6, 384, generator=generator)

    def fn(t):
        return gmp_triton.masked_gmp_l2norm(t, mask.to(t.device))

    out, grad_x = run(fn, hidden.cuda(), grad_out)
    ref_out, ref_grad_x = on_cpu_path(fn, hidden, grad_out)

    assert_near(out, ref_out, "masked output")
    assert_near(grad_x.cpu(), ref_grad_x, "masked input gradient")


def test_int64_offsets_on_a_map_past_two_to_the_31_elements():
    # 2**31 + 2**21 fp16 elements (4 GiB): offsets past int32 must be computed in int64.
    n, c, h, w = 1, 2, 2**15 + 64, 2**15
    assert n * c * h * w > 2**31
    x = torch.randn(n, c, h, w, device="cuda", dtype=torch.float16)
    x[0, 1, -1, -1] = 100.0  # the max of the last channel sits at the very last element
    leaf = x.requires_grad_(True)
    pooled = gmp_triton.global_max_pool(leaf)
    pooled.backward(torch.ones_like(pooled))

    assert_same(pooled.detach(), x.detach().amax(dim=(2, 3)), "pooled values")
    grad = leaf.grad.view(c, -1)
    assert grad[1, -1].item() == 1.0
    assert torch.count_nonzero(grad, dim=1).tolist() == [1, 1]
