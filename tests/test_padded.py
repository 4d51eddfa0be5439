"""Padded batches (``sizes``) and masked sequences: every item's result equals the reference op
applied to that item alone, whatever the padding holds."""

import pytest
import torch
import torch.nn.functional as F
from compare import assert_near, assert_same
from conftest import CPU_BACKENDS
from hypothesis import given
from hypothesis import strategies as st
from strategies import forced_split, splits

import gmp_triton
from gmp_triton import _backend, ops

# What padding may hold: none of it may ever win the max or leak into a result.
PADDING = [0.0, 1e4, float("nan"), float("inf")]


def _accumulation(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _reference_item(item: torch.Tensor, grad_out: torch.Tensor, normalise: bool):
    """Reference result and input gradient for one unpadded (1, C, ...) item, in the item's
    dtype; an empty item gives zeros and no gradient."""
    c = item.shape[1]
    if item[0, 0].numel() == 0:
        return torch.zeros(1, c, dtype=item.dtype), torch.zeros_like(item)
    acc = _accumulation(item.dtype)
    leaf = item.detach().to(acc).requires_grad_(True)
    pool = F.adaptive_max_pool2d if item.dim() == 4 else F.adaptive_max_pool1d
    out = pool(leaf, 1).flatten(1)
    if normalise:
        out = F.normalize(out, dim=1, eps=1e-12)
    out.backward(grad_out.to(acc))
    return out.detach().to(item.dtype), leaf.grad.to(item.dtype)


@st.composite
def padded_batches(draw):
    n = draw(st.integers(1, 4))
    c = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=n, max_size=n))
    height = max(h for h, _ in sizes) + draw(st.integers(0, 2))
    width = max(w for _, w in sizes) + draw(st.integers(0, 2))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    fill = draw(st.sampled_from(PADDING))
    channels_last = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.full((n, c, max(height, 1), max(width, 1)), fill, dtype=torch.float64)
    values = torch.randn(x.shape, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        values = values.clamp_min(0)  # ReLU-like ties
    for i, (h, w) in enumerate(sizes):
        x[i, :, :h, :w] = values[i, :, :h, :w]
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.tensor(sizes, dtype=torch.int64)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalise", [False, True])
@given(batch=padded_batches(), split=splits, seed=st.integers(0, 2**31 - 1))
def test_padded_batch_equals_items_alone(backend, normalise, batch, split, seed):
    x, sizes = batch
    grad_out = torch.randn(x.shape[:2], generator=torch.Generator().manual_seed(seed))
    grad_out = grad_out.to(x.dtype)
    leaf = x.detach().clone().requires_grad_(True)
    with _backend.cpu_backend(backend), forced_split(split):
        if normalise:
            out = gmp_triton.gmp_l2norm(leaf, sizes)
        else:
            out = gmp_triton.global_max_pool(leaf, sizes)
        out.backward(grad_out)

    for i, (h, w) in enumerate(sizes.tolist()):
        item = x[i : i + 1, :, :h, :w]
        ref_out, ref_grad = _reference_item(item, grad_out[i : i + 1], normalise)
        compare = assert_near if normalise else assert_same
        compare(out[i : i + 1], ref_out, f"item {i} of size {(h, w)}: result")
        compare(leaf.grad[i : i + 1, :, :h, :w], ref_grad, f"item {i}: gradient")
        padding_grad = leaf.grad[i].clone()
        padding_grad[:, :h, :w] = 0
        assert torch.count_nonzero(padding_grad) == 0, f"item {i}: gradient leaked into padding"


@st.composite
def masked_sequences(draw):
    n = draw(st.integers(1, 4))
    length = draw(st.integers(1, 24))
    c = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]))
    mask_dtype = draw(st.sampled_from([torch.bool, torch.int64, torch.int32]))
    fill = draw(st.sampled_from(PADDING))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    # Arbitrary masks (not only right-padding), including rows with no valid token.
    mask = torch.rand(n, length, generator=generator) < draw(st.sampled_from([0.0, 0.3, 0.8, 1.0]))
    hidden = torch.randn(n, length, c, generator=generator, dtype=torch.float64)
    hidden = torch.where(mask.unsqueeze(2), hidden, fill).to(dtype)
    return hidden, mask.to(mask_dtype)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("normalise", [False, True])
@given(batch=masked_sequences(), split=splits, seed=st.integers(0, 2**31 - 1))
def test_masked_sequences_equal_valid_tokens_alone(backend, normalise, batch, split, seed):
    hidden, mask = batch
    grad_out = torch.randn(hidden.shape[0], hidden.shape[2])
    grad_out = grad_out.to(hidden.dtype)
    leaf = hidden.detach().clone().requires_grad_(True)
    with _backend.cpu_backend(backend), forced_split(split):
        if normalise:
            out = gmp_triton.masked_gmp_l2norm(leaf, mask)
        else:
            out = gmp_triton.masked_max_pool(leaf, mask)
        out.backward(grad_out)

    for i in range(hidden.shape[0]):
        keep = mask[i] != 0
        tokens = hidden[i, keep].T.unsqueeze(0)  # (1, C, valid tokens)
        ref_out, ref_grad = _reference_item(tokens, grad_out[i : i + 1], normalise)
        compare = assert_near if normalise else assert_same
        compare(out[i : i + 1], ref_out, f"sequence {i}: result")
        compare(leaf.grad[i, keep], ref_grad[0].T, f"sequence {i}: gradient of valid tokens")
        assert torch.count_nonzero(leaf.grad[i, ~keep]) == 0, f"sequence {i}: padding gradient"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_empty_items_give_zero_embedding_and_zero_gradient(backend):
    x = torch.full((3, 4, 5, 6), float("nan"))
    x[1, :, :2, :3] = torch.randn(4, 2, 3)
    sizes = torch.tensor([[0, 6], [2, 3], [5, 0]])
    leaf = x.requires_grad_(True)
    with _backend.cpu_backend(backend):
        out = gmp_triton.gmp_l2norm(leaf, sizes)
        out.sum().backward()
    assert torch.equal(out[[0, 2]], torch.zeros(2, 4))
    assert torch.count_nonzero(leaf.grad[[0, 2]]) == 0
    assert not out.isnan().any() and not leaf.grad.isnan().any()


def test_pad_and_unpad_round_trip():
    maps = [torch.randn(3, h, w) for h, w in [(4, 5), (1, 1), (7, 2), (0, 3)]]
    batch, sizes = gmp_triton.pad_maps(maps, memory_format=torch.channels_last)
    assert batch.shape == (4, 3, 7, 5) and batch.is_contiguous(memory_format=torch.channels_last)
    assert sizes.tolist() == [[4, 5], [1, 1], [7, 2], [0, 3]]
    for original, recovered in zip(maps, gmp_triton.unpad_maps(batch, sizes), strict=True):
        assert torch.equal(original, recovered)
    alone = torch.stack([gmp_triton.global_max_pool(m[None])[0] for m in maps[:3]])
    assert torch.equal(gmp_triton.global_max_pool(batch, sizes)[:3], alone)


@pytest.mark.parametrize(
    "maps, message",
    [
        ([], "got no maps"),
        ([torch.randn(3, 4)], r"map 0 must be a \(C, h, w\) tensor"),
        ([torch.randn(3, 4, 4), torch.randn(2, 4, 4)], "map 1 has 2 channels"),
        ([torch.randn(3, 4, 4), torch.randn(3, 4, 4).double()], "map 1 has 3 channels, torch.f"),
    ],
)
def test_pad_maps_errors(maps, message):
    with pytest.raises(ValueError, match=message):
        gmp_triton.pad_maps(maps)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "sizes, error, message",
    [
        (torch.tensor([[5, 4], [2, 2]]), ValueError, r"sizes\[0\] = \(5, 4\) does not fit"),
        (torch.tensor([[1, 1], [2, 7]]), ValueError, r"sizes\[1\] = \(2, 7\) does not fit"),
        (torch.tensor([[-1, 2], [2, 2]]), ValueError, r"sizes\[0\] = \(-1, 2\)"),
        (torch.tensor([[1, 1]]), ValueError, r"shape \(N, 2\) = \(2, 2\).*got \(1, 2\)"),
        (torch.tensor([[1.0, 1.0], [1, 1]]), TypeError, "integers, got torch.float32"),
        (torch.ones(2, 2, dtype=torch.bool), TypeError, "integers, got torch.bool"),
        (torch.ones(2, 2, dtype=torch.int64, device="meta"), ValueError, "sizes is on meta"),
        (1e-6, TypeError, "pass eps by keyword"),
    ],
)
def test_bad_sizes(backend, sizes, error, message):
    x = torch.randn(2, 3, 4, 6)
    with _backend.cpu_backend(backend), pytest.raises(error, match=message):
        gmp_triton.gmp_l2norm(x, sizes)


def test_sizes_on_a_sequence_points_to_the_masked_api():
    with pytest.raises(ValueError, match="masked_max_pool"):
        gmp_triton.global_max_pool(torch.randn(2, 3, 5), torch.ones(2, 2, dtype=torch.long))


@pytest.mark.parametrize(
    "hidden, mask, error, message",
    [
        (torch.randn(2, 5, 3), torch.ones(2, 4, dtype=torch.bool), ValueError, r"got \(2, 4\)"),
        (torch.randn(2, 5, 3), torch.ones(2, 5), TypeError, "bool or integer.*float32"),
        (torch.randn(2, 5, 3), [[1] * 5] * 2, TypeError, "got list"),
        (
            torch.randn(2, 5, 3),
            torch.ones(2, 5, dtype=torch.bool, device="meta"),
            ValueError,
            "attention_mask is on meta",
        ),
        (torch.randn(2, 5), torch.ones(2, 5, dtype=torch.bool), ValueError, r"\(N, L, C\)"),
        (torch.randn(2, 0, 3), torch.ones(2, 0, dtype=torch.bool), ValueError, "L is 0"),
    ],
)
def test_bad_attention_mask(hidden, mask, error, message):
    with pytest.raises(error, match=message):
        gmp_triton.masked_gmp_l2norm(hidden, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_opcheck_with_sizes_and_mask(backend):
    x = torch.randn(3, 4, 5, 6, requires_grad=True)
    sizes = torch.tensor([[5, 6], [2, 3], [0, 4]])
    hidden = torch.randn(3, 7, 4, requires_grad=True)
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(0)) < 0.6
    with _backend.cpu_backend(backend):
        torch.library.opcheck(ops.gmp_forward, (x, sizes, None))
        torch.library.opcheck(ops.gmp_l2norm_forward, (x, 1e-12, sizes, None))
        torch.library.opcheck(ops.gmp_l2norm_forward, (hidden.transpose(1, 2), 1e-12, None, mask))


class PaddedHead(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.pool = gmp_triton.GMPL2Norm()
        self.text_pool = gmp_triton.MaskedGMPL2Norm()

    def forward(self, images, sizes, hidden, mask):
        return self.pool(torch.relu(images), sizes), self.text_pool(hidden * 2, mask)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_modules_compile_without_recompiling_for_new_sizes(backend):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    model = PaddedHead()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=True)
    counts = []
    with _backend.cpu_backend(backend):
        # All sizes of the first call differ (3 image channels, 5 hidden channels, the 2 of the
        # sizes tensor): the compiler gives equal sizes one symbol ("duck sizing"), and a batch
        # of 2 would then be specialised through the constant 2 in sizes' (N, 2) shape.
        for n, h, w, length in [(6, 8, 7, 11), (4, 9, 5, 12), (9, 4, 11, 6)]:
            images = torch.randn(n, 3, h, w)
            sizes = torch.stack([torch.randint(0, h + 1, (n,)), torch.randint(0, w + 1, (n,))], 1)
            hidden = torch.randn(n, length, 5)
            mask = torch.rand(n, length) < 0.5
            for got, expected in zip(
                compiled(images, sizes, hidden, mask),
                model(images, sizes, hidden, mask),
                strict=True,
            ):
                torch.testing.assert_close(got, expected)
            counts.append(counter.frame_count)
    assert counts[-1] == counts[0], f"recompiled for new sizes: frame counts {counts}"
