"""The pooling family (avg, avgmax, catavgmax, gem) against stock-op references, dense and
padded, with gradients (GeM's exponent included), gradcheck, opcheck and compile."""

import pytest
import torch
import torch.nn.functional as F
from compare import assert_near
from conftest import CPU_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from strategies import forced_split, splits

import gmp_triton
from gmp_triton import _backend, ops

FAMILY = ["avg", "avgmax", "catavgmax", "gem"]
GEM_EPS = 1e-6


def _accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_pool(x: torch.Tensor, pool: str, p: torch.Tensor | None) -> torch.Tensor:
    """The pooling by stock ops on one unpadded (N, C, ...) map."""
    spatial = x.shape[2:]
    if pool == "gem":
        powered = x.clamp(min=GEM_EPS).pow(p)
        mean = F.avg_pool2d(powered, spatial) if x.dim() == 4 else F.avg_pool1d(powered, spatial)
        return mean.pow(1.0 / p).flatten(1)
    avg = x.mean(dim=tuple(range(2, x.dim())))
    top = (F.adaptive_max_pool2d(x, 1) if x.dim() == 4 else F.adaptive_max_pool1d(x, 1)).flatten(1)
    if pool == "avg":
        return avg
    if pool == "avgmax":
        return 0.5 * (avg + top)
    return torch.cat([avg, top], dim=1)


def _reference(x, pool, p, grad_out, normalise):
    """Result, input gradient and exponent gradient of the reference, computed in the
    accumulation dtype and returned in the input's dtype."""
    acc = _accumulation(x.dtype)
    leaf = x.detach().to(acc).requires_grad_(True)
    p_leaf = None if p is None else p.detach().to(acc).requires_grad_(True)
    out = reference_pool(leaf, pool, p_leaf)
    if normalise:
        out = F.normalize(out, dim=1, eps=1e-12)
    out.backward(grad_out.to(acc))
    p_grad = None if p is None else p_leaf.grad
    return out.detach().to(x.dtype), leaf.grad.to(x.dtype), p_grad


@st.composite
def family_inputs(draw):
    pool = draw(st.sampled_from(FAMILY))
    rank = draw(st.sampled_from([4, 4, 3]))
    n, c = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    spatial = (
        (draw(st.integers(1, 9)), draw(st.integers(1, 9)))
        if rank == 4
        else (draw(st.integers(1, 30)),)
    )
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    channels_last = draw(st.booleans()) and rank == 4
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    x = torch.randn((n, c, *spatial), generator=generator, dtype=torch.float64)
    if pool == "gem":
        # Mostly positive activations, some below the clamp, as after a ReLU.
        x = x.clamp_min(0) + 0.05 * torch.rand(x.shape, generator=generator, dtype=torch.float64)
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    p = torch.tensor([draw(st.floats(1.0, 5.0))]) if pool == "gem" else None
    return x, pool, p


def _tolerance(x, pool, normalise):
    # GeM goes through exp and log; the GPU's are a few ulps off the correctly rounded ones.
    if pool == "gem" and x.dtype == torch.float32:
        return dict(atol=1e-5, rtol=1e-4)
    return {}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalise", [False, True])
@given(inputs=family_inputs(), split=splits, seed=st.integers(0, 2**31 - 1))
def test_family_matches_stock_ops(backend, normalise, inputs, split, seed):
    x, pool, p = inputs
    width = 2 * x.shape[1] if pool == "catavgmax" else x.shape[1]
    grad_out = torch.randn(x.shape[0], width, generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(x.dtype)
    ref_out, ref_grad, ref_p_grad = _reference(x, pool, p, grad_out, normalise)

    leaf = x.detach().clone().requires_grad_(True)
    p_leaf = None if p is None else p.clone().requires_grad_(True)
    fn = gmp_triton.pool_l2norm if normalise else gmp_triton.global_pool
    with _backend.cpu_backend(backend), forced_split(split):
        out = fn(leaf, pool, p=p_leaf)
        out.backward(grad_out)

    tol = _tolerance(x, pool, normalise)
    assert_near(out, ref_out, f"{pool} result", **tol)
    assert_near(leaf.grad, ref_grad, f"{pool} input gradient", **tol)
    if p is not None:
        assert_near(p_leaf.grad, ref_p_grad.float(), "gem exponent gradient", atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", FAMILY)
def test_padded_family_equals_items_alone(backend, pool):
    generator = torch.Generator().manual_seed(7)
    maps = [torch.rand(4, h, w, generator=generator) for h, w in [(5, 3), (1, 1), (6, 7), (2, 7)]]
    batch, sizes = gmp_triton.pad_maps(maps)
    batch[0, :, 5:, :] = float("nan")  # padding must never be read
    batch = batch.requires_grad_(True)
    p = torch.tensor([2.5]) if pool == "gem" else None
    with _backend.cpu_backend(backend), forced_split((2, 4)):
        out = gmp_triton.pool_l2norm(batch, pool, sizes, p=p)
        out.sum().backward()
    for i, m in enumerate(maps):
        item = m[None].requires_grad_(True)
        ref = F.normalize(reference_pool(item, pool, p), dim=1)
        ref.sum().backward()
        h, w = m.shape[1:]
        assert_near(out[i : i + 1], ref.detach(), f"{pool} item {i}", atol=1e-5, rtol=1e-4)
        assert_near(batch.grad[i : i + 1, :, :h, :w], item.grad, f"{pool} item {i} gradient")
        assert torch.count_nonzero(batch.grad[i].nan_to_num(1.0)) == torch.count_nonzero(
            batch.grad[i, :, :h, :w].nan_to_num(1.0)
        ), "gradient outside the item"


# No 0 * inf or log(0) on the way to the zero, either: the interpreter reports them as warnings.
@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", FAMILY)
def test_empty_item_gives_zero_embedding(backend, pool):
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    sizes = torch.tensor([[0, 0], [4, 4]])
    p = torch.tensor([3.0]) if pool == "gem" else None
    with _backend.cpu_backend(backend):
        out = gmp_triton.pool_l2norm(x, pool, sizes, p=p)
        out.sum().backward()
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.count_nonzero(x.grad[0]) == 0
    assert not out.isnan().any() and not x.grad.isnan().any()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", FAMILY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradcheck_fp64(backend, pool, layout):
    generator = torch.Generator().manual_seed(11)
    x = torch.rand(2, 3, 4, 5, dtype=torch.float64, generator=generator) + 0.1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    inputs = (x, torch.tensor([2.5], dtype=torch.float64, requires_grad=True))
    fast = backend == "triton"
    with _backend.cpu_backend(backend):
        if pool == "gem":
            assert torch.autograd.gradcheck(
                lambda t, p: gmp_triton.pool_l2norm(t, pool, p=p), inputs, fast_mode=fast
            )
            assert torch.autograd.gradcheck(
                lambda t, p: gmp_triton.global_pool(t, pool, p=p), inputs, fast_mode=fast
            )
        else:
            assert torch.autograd.gradcheck(
                lambda t: gmp_triton.pool_l2norm(t, pool), (x,), fast_mode=fast
            )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", FAMILY)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(backend, pool, layout):
    x = torch.rand(2, 3, 4, 5) + 0.1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    p = torch.tensor([3.0], requires_grad=True) if pool == "gem" else None
    sizes = torch.tensor([[4, 5], [2, 3]])
    with _backend.cpu_backend(backend):
        torch.library.opcheck(ops.pool_forward, (x, pool, p, 1e-6, None, None))
        torch.library.opcheck(ops.pool_forward, (x, pool, p, 1e-6, sizes, None))
        pooled, _, _ = ops.pool_forward(x.detach(), pool, p, 1e-6)
        torch.library.opcheck(ops.l2_normalize, (pooled.requires_grad_(True), 1e-12, x.dtype))


def test_bad_family_arguments():
    x = torch.rand(2, 3, 4, 4)
    with pytest.raises(ValueError, match="pool must be one of max, avg, avgmax, catavgmax, gem"):
        gmp_triton.global_pool(x, "mean")
    with pytest.raises(ValueError, match="needs its exponent p"):
        gmp_triton.global_pool(x, "gem")
    with pytest.raises(ValueError, match="takes none"):
        gmp_triton.pool_l2norm(x, "avg", p=3.0)
    with pytest.raises(ValueError, match="positive and finite"):
        gmp_triton.global_pool(x, "gem", p=torch.tensor([0.0]))
    with pytest.raises(ValueError, match="one-element float tensor"):
        gmp_triton.global_pool(x, "gem", p=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"expected an \(N, D\) tensor"):
        gmp_triton.l2_normalize(x)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("pool", ["max", *FAMILY])
def test_embedding_head_compiles_without_recompiling(backend, pool):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 6, 3, padding=1),
        torch.nn.ReLU(),
        gmp_triton.EmbeddingHead(6, embed_dim=4, pool=pool, norm_layer="layernorm"),
    )
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    counts = []
    with _backend.cpu_backend(backend):
        for n, h, w in [(5, 9, 7), (4, 12, 10), (7, 6, 11)]:
            x = torch.randn(n, 3, h, w)
            out = compiled(x)
            out.sum().backward()
            torch.testing.assert_close(out, model(x))
            counts.append(counter.frame_count)
    assert counts[-1] == counts[0], f"recompiled: {counts}"


def test_embedding_head_options():
    x = torch.rand(4, 8, 5, 5)
    head = gmp_triton.EmbeddingHead(8, pool="catavgmax", return_features=True)
    emb, features = head(x)
    assert emb.shape == features.shape == (4, 16)
    torch.testing.assert_close(emb, F.normalize(features, dim=1))
    head = gmp_triton.EmbeddingHead(8, embed_dim=3, pool="gem", norm_layer="batchnorm")
    assert head(x).shape == (4, 3)
    assert [name for name, _ in head.named_parameters()][0] == "pool.p"
    fused = gmp_triton.EmbeddingHead(8, pool="avg")
    torch.testing.assert_close(fused(x), F.normalize(x.mean(dim=(2, 3)), dim=1))
    with pytest.raises(ValueError, match="embed_dim must be a positive int"):
        gmp_triton.EmbeddingHead(8, embed_dim=0)
    with pytest.raises(ValueError, match="norm_layer must be"):
        gmp_triton.EmbeddingHead(8, norm_layer="groupnorm")
    # A map with other channels than the head was built for: named, fused or not.
    for head in (fused, gmp_triton.EmbeddingHead(8, norm_layer="layernorm")):
        with pytest.raises(ValueError, match="input has 16 channels .* built for 8"):
            head(torch.rand(4, 16, 5, 3))


def test_embedding_model_on_a_backbone_with_forward_features():
    class Backbone(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)

        def forward_features(self, x):
            return torch.relu(self.conv(x))

        def forward(self, x):
            raise AssertionError("the head must use forward_features")

    model = gmp_triton.EmbeddingModel(Backbone(), gmp_triton.EmbeddingHead(8, embed_dim=5))
    emb = model(torch.randn(2, 3, 10, 12))
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))


def test_from_timm():
    timm = pytest.importorskip("timm", reason="timm is not installed")
    model = gmp_triton.from_timm("resnet18", embed_dim=32, pool="gem")
    assert isinstance(model.backbone, timm.models.ResNet)
    emb = model(torch.randn(2, 3, 64, 64))
    assert emb.shape == (2, 32)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
