"""``train --mixed-sizes``: batches of canvases of different sizes, zero-padded and pooled with
their sizes, and the model that embeds such a batch as it embeds each image alone."""

import json

import pytest
import torch

from gmp_triton import _backend
from gmp_triton.cli import main
from gmp_triton.training.model import build_model
from gmp_triton.training.padded import MixedCanvasBatch, PaddedImages, padded_batches
from gmp_triton.training.run import RAW_PIXELS, TRAINED

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("sklearn")


def run_command(*argv) -> int:
    with _backend.cpu_backend("torch"):
        return main([str(arg) for arg in argv])


def test_mixed_canvas_batch_gives_each_digit_its_own_canvas():
    digits = torch.rand(12, 1, 8, 8)
    samples = [(digit, index % 3) for index, digit in enumerate(digits)]
    collate = MixedCanvasBatch(9, 20, noise=0.0, generator=torch.Generator().manual_seed(0))
    batch, labels = collate(samples)

    assert isinstance(batch, PaddedImages)
    assert labels.tolist() == [index % 3 for index in range(12)]
    sizes = batch.sizes.tolist()
    assert all(9 <= h <= 20 and h == w for h, w in sizes), sizes
    assert len({h for h, _ in sizes}) > 1, "all canvases of the batch had one size"
    side = max(h for h, _ in sizes)
    assert batch.images.shape == (12, 1, side, side)
    for image, (h, w), digit in zip(batch.images, sizes, digits, strict=True):
        # Zero outside the canvas; inside it, the digit (noise 0) and nothing else.
        assert image[:, h:].abs().sum() == 0 and image[:, :, w:].abs().sum() == 0
        assert image[:, :h, :w].sum().item() == pytest.approx(digit.sum().item(), rel=1e-5)


def test_padded_batches_cover_every_image_once_in_order():
    images = [torch.rand(1, side, side + 1) for side in (5, 9, 7, 3, 6)]
    seen = []
    for indices, batch in padded_batches(images, 2):
        seen += indices
        assert batch.images.shape[0] == len(indices) <= 2
        for row, index in enumerate(indices):
            h, w = batch.sizes[row].tolist()
            assert torch.equal(batch.images[row, :, :h, :w], images[index])
    assert seen == list(range(5))


@pytest.mark.parametrize("pool", ["max", "avg", "catavgmax", "gem"])
def test_a_padded_batch_embeds_each_image_as_it_is_alone(pool):
    """In eval mode the small CNN zeroes the padding before each convolution, and the head pools
    each map over its own image: the padding changes nothing."""
    torch.manual_seed(0)
    model = build_model(1, pool, None, widths=(8, 16)).eval()
    # Batch norm with non-trivial statistics, so that a leak of padded positions would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    images = [torch.rand(1, h, w) for h, w in ((9, 13), (16, 16), (11, 7), (14, 10))]
    ((_, batch),) = padded_batches(images, len(images))
    # Large values in the padding: zeroed by the model before they reach any convolution.
    for row, (h, w) in enumerate(batch.sizes.tolist()):
        batch.images[row, :, h:, :] = 50.0
        batch.images[row, :, :, w:] = 50.0
    with torch.no_grad():
        together = model(batch)
        alone = torch.cat([model(image[None]) for image in images])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


def test_train_with_mixed_sizes_beats_raw_pixels_and_round_trips(tmp_path, capsys):
    out = tmp_path / "run"
    options = ("--canvas-size", "10", "16", "--epochs", "2", "--m-per-class", "8", "--seed", "3")
    assert run_command("train", "--mixed-sizes", *options, "--out", out) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["mixed_sizes"] is True
    results = json.loads((out / "metrics.json").read_text())["results"]
    map_at_r = "mean_average_precision_at_r"
    assert results[TRAINED][map_at_r] > results[RAW_PIXELS][map_at_r], results
    capsys.readouterr()

    # evaluate embeds the held-out canvases in padded batches again: the same metrics.
    evaluated = tmp_path / "evaluated.json"
    assert run_command("evaluate", out, "--json", evaluated) == 0
    assert json.loads(evaluated.read_text()) == pytest.approx(results[TRAINED], abs=1e-9)
