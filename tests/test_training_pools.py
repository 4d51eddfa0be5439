"""Every pooling in ``train --pool``, the round trip of its checkpoint through ``evaluate`` and
``embed``, and ``gmp-triton experiment`` end to end on a tiny configuration.

The runs use the PyTorch path on the CPU (``cpu_backend("torch")``) and small canvases, so that
they take seconds also under ``TRITON_INTERPRET=1``.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import gmp_triton
from gmp_triton import _backend
from gmp_triton.cli import main
from gmp_triton.training.checkpoint import load_checkpoint
from gmp_triton.training.evaluation import METRICS
from gmp_triton.training.run import RAW_PIXELS, TRAINED, load_model

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("sklearn")
pytest.importorskip("PIL")

SHORT_RUN = ("--canvas-size", "10", "14", "--epochs", "2", "--m-per-class", "8", "--seed", "1")
FEATURES = 64  # channels of the small CNN's maps


def run_command(*argv) -> int:
    with _backend.cpu_backend("torch"):
        return main([str(arg) for arg in argv])


def digit_png(path: Path, index: int, side: int, top: int, left: int) -> torch.Tensor:
    """Write one scikit-learn digit on a black canvas as a grey PNG; returns it as read."""
    from PIL import Image
    from sklearn.datasets import load_digits

    canvas = np.zeros((side, side), dtype=np.uint8)
    scan = load_digits().images[index]
    canvas[top : top + 8, left : left + 8] = np.round(scan * 255 / 16).astype(np.uint8)
    Image.fromarray(canvas).save(path)
    return torch.from_numpy(canvas).float().div(255)[None, None]


def check_metrics(metrics: dict) -> None:
    assert set(metrics) == set(METRICS)
    assert all(0.0 <= value <= 1.0 for value in metrics.values()), metrics


@pytest.mark.parametrize(
    ("pool", "embed_dim"),
    [("max", None), ("avg", None), ("avgmax", None), ("catavgmax", 16), ("gem", None)],
)
def test_each_pooling_trains_and_its_checkpoint_round_trips(pool, embed_dim, tmp_path, capsys):
    out = tmp_path / "run"
    options = ["--pool", pool, "--out", out]
    options += ["--embed-dim", embed_dim] if embed_dim else []
    options += ["--gem-p", "2.5"] if pool == "gem" else []
    assert run_command("train", *SHORT_RUN, *options) == 0

    # The checkpoint records the head's settings, and evaluate/embed rebuild the same head.
    config = json.loads((out / "config.json").read_text())
    assert (config["pool"], config["embed_dim"]) == (pool, embed_dim)
    model, _, epochs = load_model(out, "cpu")
    assert epochs == 2
    assert isinstance(model.head, gmp_triton.EmbeddingHead) and model.head.pool.pool == pool
    pooled = 2 * FEATURES if pool == "catavgmax" else FEATURES
    assert model.embedding_size == (embed_dim or pooled)

    weights = load_checkpoint(out)["model"]
    head = {name: value for name, value in weights.items() if name.startswith("head.")}
    if embed_dim:
        # Pool -> Linear -> L2 norm: the projection takes the pooled vector.
        assert head["head.projection.weight"].shape == (embed_dim, pooled)
    if pool == "gem":
        # GeM's exponent is a parameter, and training moved it from its start.
        assert head["head.pool.p"].shape == (1,)
        assert head["head.pool.p"].item() != 2.5 and head["head.pool.p"].item() > 0
    if not embed_dim and pool != "gem":
        assert head == {}, "a head with neither projection nor GeM has no weights"

    results = json.loads((out / "metrics.json").read_text())["results"]
    for metrics in results.values():
        check_metrics(metrics)
    capsys.readouterr()

    evaluated = tmp_path / "evaluated.json"
    assert run_command("evaluate", out, "--json", evaluated) == 0
    assert json.loads(evaluated.read_text()) == pytest.approx(results[TRAINED], abs=1e-9)

    image = digit_png(tmp_path / "digit.png", 7, 13, 2, 4)
    assert run_command("embed", out, tmp_path / "digit.png", "--out", tmp_path / "e.npy") == 0
    embedding = np.load(tmp_path / "e.npy")
    with _backend.cpu_backend("torch"), torch.no_grad():
        expected = model(image)[0]
    assert embedding.shape == (1, model.embedding_size)
    torch.testing.assert_close(torch.from_numpy(embedding[0]), expected, rtol=1e-5, atol=1e-6)
    assert np.linalg.norm(embedding[0]) == pytest.approx(1.0, abs=1e-5)


def test_max_pooling_beats_raw_pixels_after_a_short_run(tmp_path):
    out = tmp_path / "run"
    assert run_command("train", *SHORT_RUN, "--out", out) == 0
    results = json.loads((out / "metrics.json").read_text())["results"]
    map_at_r = "mean_average_precision_at_r"
    assert results[TRAINED][map_at_r] > results[RAW_PIXELS][map_at_r], results


# The experiment ---------------------------------------------------------------------------------

TINY_EXPERIMENT = (
    *("--pools", "max", "avg"),
    *("--seeds", "2", "--epochs", "1"),
    *("--canvas", "10", "12", "--small-canvas", "10", "11", "--large-canvas", "16", "18"),
    *("--shift-canvas", "14", "--shift-step", "1", "--shift-digits-per-class", "2"),
    *("--test-noise", "0.2"),
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> tuple[Path, dict, str]:
    out = tmp_path_factory.mktemp("experiment") / "out"
    assert run_command("experiment", *TINY_EXPERIMENT, "--out", out) == 0
    results = json.loads((out / "results.json").read_text())
    return out, results, (out / "report.md").read_text()


def test_experiment_writes_its_report_and_plots(experiment):
    out, _, _ = experiment
    expected = {"report.md", "results.json", "retrieval.png", "translation.png"}
    expected |= {"sizes.png", "noise.png"}
    assert {path.name for path in out.iterdir()} == expected
    for name in expected - {"report.md", "results.json"}:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def check_spread(stat: dict, seeds: int) -> None:
    values = stat["values"]
    assert len(values) == seeds and all(0.0 <= v <= 1.0 for v in values)
    assert stat["mean"] == pytest.approx(sum(values) / seeds)
    assert stat["min"] == min(values) and stat["max"] == max(values)
    assert stat["std"] == pytest.approx(float(np.std(values, ddof=1)))


def test_experiment_results_cover_every_pooling_seed_and_study(experiment):
    _, results, _ = experiment
    pools, seeds = ["max", "avg"], 2
    assert results["config"]["pools"] == pools and results["config"]["seeds"] == seeds
    assert results["held_out"]["classes"] == ["5", "6", "7", "8", "9"]
    for pool in pools:
        for study in (results["retrieval"][pool], results["noise"][pool]):
            assert set(study) == set(METRICS)
            for stat in study.values():
                check_spread(stat, seeds)
        for split in ("small", "large"):
            for stat in results["sizes"][pool][split].values():
                check_spread(stat, seeds)
    assert results["seconds"]["total"] >= results["seconds"]["canvas size"] > 0


def test_experiment_translation_curves_are_cosines_to_the_centre(experiment):
    _, results, _ = experiment
    translation = results["translation"]
    shifts = translation["shifts"]
    # 14-pixel canvas, 8-pixel digit: left edges 0..6, centre 3, one pixel apart.
    assert shifts == [-3, -2, -1, 0, 1, 2, 3]
    assert translation["digits"] == 10
    centre = shifts.index(0)
    for pool, curve in translation["cosine"].items():
        assert len(curve["per_seed"]) == 2, pool
        for run in curve["per_seed"]:
            assert run[centre] == pytest.approx(1.0, abs=1e-5)
            assert all(-1.0 - 1e-6 <= value <= 1.0 + 1e-6 for value in run)
        assert curve["mean"] == pytest.approx(np.mean(curve["per_seed"], axis=0).tolist())
        summary = translation["summary"][pool]["every shift"]
        assert summary["mean"] == pytest.approx(float(np.mean(curve["per_seed"])))
    # Raw pixels are not invariant: a one-pixel move already lowers the cosine.
    raw = translation["raw_pixels"]
    assert raw[centre] == pytest.approx(1.0, abs=1e-6)
    assert max(raw[centre - 1], raw[centre + 1]) < 0.99 and raw[0] < raw[centre - 1]


def test_experiment_report_shows_the_numbers_of_results_json(experiment):
    _, results, report = experiment
    for heading in ("Retrieval", "Translation", "Canvas size", "Noise", "Machine", "Time"):
        assert heading in report, heading
    for pool in ("max", "avg"):
        stat = results["retrieval"][pool]["mean_average_precision_at_r"]
        assert f"| {pool} | {stat['mean']:.3f} ± {stat['std']:.3f} |" in report
    assert f"{results['seconds']['total']:.0f} s in all" in report
    assert results["environment"]["device"] in report

    # The findings say where max pooling loses, and follow the numbers: max is listed as
    # losing on retrieval MAP@R exactly when avg's mean is higher.
    assert "**Where max pooling loses**" in report and "**Where max pooling comes first**" in report
    map_at_r = {
        p: results["retrieval"][p]["mean_average_precision_at_r"]["mean"] for p in ("max", "avg")
    }
    loses_section = report.split("**Where max pooling loses**")[1].split("**Where max")[0]
    assert ("retrieval, MAP@R: max" in loses_section) == (map_at_r["avg"] > map_at_r["max"])
    assert math.isfinite(results["seconds"]["total"])


def test_findings_judge_a_difference_by_the_seed_spread_only_with_several_seeds():
    from gmp_triton.training.experiment_report import _spread_verdict

    ours, other = {"mean": 0.50, "std": 0.01}, {"mean": 0.45, "std": 0.01}
    assert _spread_verdict(ours, other, seeds=3) == "beyond the seed spread"
    assert _spread_verdict(ours, {"mean": 0.49, "std": 0.01}, seeds=3) == "within the seed spread"
    # One seed has no spread (std 0): every difference would look beyond it.
    single = {"mean": 0.50, "std": 0.0}, {"mean": 0.45, "std": 0.0}
    assert _spread_verdict(*single, seeds=1) == "one seed: no spread to judge it by"
