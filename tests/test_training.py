"""Training, evaluation, embedding and resuming, through the command and the Python API.

The training runs use the PyTorch path on the CPU (``cpu_backend("torch")``) so that they take
seconds even when the suite runs with ``TRITON_INTERPRET=1``; one small test trains through the
interpreted Triton kernels and checks that it matches.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gmp_triton import _backend
from gmp_triton.cli import main
from gmp_triton.training.checkpoint import CHECKPOINT_NAME, load_checkpoint
from gmp_triton.training.config import TrainConfig
from gmp_triton.training.data import read_image
from gmp_triton.training.evaluation import METRICS
from gmp_triton.training.run import RAW_PIXELS, TRAINED, UNTRAINED, load_model, train

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("sklearn")

SHORT_RUN = ["--epochs", "4", "--seed", "0"]


def run_command(*argv: str) -> int:
    with _backend.cpu_backend("torch"):
        return main([str(arg) for arg in argv])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """One short run on the default data, shared by the tests that read its results."""
    out = tmp_path_factory.mktemp("run") / "digits"
    assert run_command("train", *SHORT_RUN, "--out", out) == 0
    return out


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_short_run_beats_both_baselines_on_held_out_map_at_r(trained_run):
    results = read_metrics(trained_run)["results"]
    assert set(results) == {RAW_PIXELS, UNTRAINED, TRAINED}
    trained = results[TRAINED]["mean_average_precision_at_r"]
    assert trained > results[RAW_PIXELS]["mean_average_precision_at_r"], results
    assert trained > results[UNTRAINED]["mean_average_precision_at_r"], results


def test_run_folder_holds_checkpoint_config_and_metrics(trained_run):
    config = json.loads((trained_run / "config.json").read_text())
    assert config["epochs"] == 4 and config["pool"] == "max"
    assert config["train_classes"] == ["0", "1", "2", "3", "4"]
    assert config["eval_classes"] == ["5", "6", "7", "8", "9"]

    metrics = read_metrics(trained_run)
    assert [entry["epoch"] for entry in metrics["epochs"]] == [1, 2, 3, 4]
    from sklearn.datasets import load_digits

    assert metrics["held_out"]["images"] == int((load_digits().target >= 5).sum())
    for model_metrics in metrics["results"].values():
        assert set(model_metrics) == set(METRICS)
        assert all(0.0 <= value <= 1.0 for value in model_metrics.values())
        recalls = [model_metrics[f"recall_at_{k}"] for k in (1, 2, 4, 8)]
        assert recalls == sorted(recalls), "Recall@K cannot fall as K grows"
        assert model_metrics["recall_at_1"] == pytest.approx(model_metrics["precision_at_1"])

    checkpoint = load_checkpoint(trained_run)
    assert checkpoint["epoch"] == 4
    # Written to a temporary file and renamed: nothing temporary is left behind.
    assert sorted(path.name for path in trained_run.iterdir()) == [
        CHECKPOINT_NAME,
        "config.json",
        "metrics.json",
    ]


def test_evaluate_recomputes_the_stored_metrics(trained_run, tmp_path):
    out = tmp_path / "evaluated.json"
    assert run_command("evaluate", trained_run, "--json", out) == 0
    evaluated = json.loads(out.read_text())
    stored = read_metrics(trained_run)["results"][TRAINED]
    assert evaluated == pytest.approx(stored, abs=1e-9)


def digit_canvas(digit_index: int, side: int, top: int, left: int) -> np.ndarray:
    """A uint8 grey image with one scikit-learn digit scan (white on black)."""
    from sklearn.datasets import load_digits

    scan = load_digits().images[digit_index]
    canvas = np.zeros((side, side), dtype=np.uint8)
    canvas[top : top + 8, left : left + 8] = np.round(scan * 255 / 16).astype(np.uint8)
    return canvas


def test_embed_matches_the_model_on_images_of_different_sizes(trained_run, tmp_path, capsys):
    from PIL import Image

    canvases = [digit_canvas(5, 30, 3, 17), digit_canvas(6, 41, 30, 2)]
    paths = []
    for index, canvas in enumerate(canvases):
        paths.append(tmp_path / f"digit{index}.png")
        Image.fromarray(canvas).save(paths[-1])

    saved = tmp_path / "embeddings.npy"
    assert run_command("embed", trained_run, *paths, "--out", saved) == 0
    assert run_command("embed", trained_run, *paths) == 0
    printed = capsys.readouterr().out.strip().splitlines()

    model, _, _ = load_model(trained_run, "cpu")
    with _backend.cpu_backend("torch"), torch.no_grad():
        expected = [
            model(torch.from_numpy(canvas).float().div(255)[None, None])[0] for canvas in canvases
        ]
    embeddings = np.load(saved)
    assert embeddings.shape == (2, model.embedding_size)
    for row, line, path, reference in zip(embeddings, printed, paths, expected, strict=True):
        torch.testing.assert_close(torch.from_numpy(row), reference, rtol=1e-5, atol=1e-6)
        assert line.split()[0] == str(path)
        np.testing.assert_allclose([float(v) for v in line.split()[1:]], row, atol=1e-6)
        assert np.linalg.norm(row) == pytest.approx(1.0, abs=1e-5)


def test_resume_after_an_interruption_gives_the_uninterrupted_result(trained_run, tmp_path):
    out = tmp_path / "interrupted"
    config = TrainConfig(epochs=4, seed=0)

    def stop_after_first_epoch(epoch: int, _entry: dict) -> None:
        if epoch == 1:
            raise KeyboardInterrupt

    with _backend.cpu_backend("torch"), pytest.raises(KeyboardInterrupt):
        train(config, out, device="cpu", on_epoch_end=stop_after_first_epoch)
    assert load_checkpoint(out)["epoch"] == 1

    assert run_command("train", "--resume", out) == 0

    resumed, uninterrupted = load_checkpoint(out), load_checkpoint(trained_run)
    assert resumed["epoch"] == 4
    for name, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][name], value), name
    assert read_metrics(out)["results"] == read_metrics(trained_run)["results"]


def test_interrupt_before_the_first_checkpoint_says_there_is_nothing_to_resume(
    tmp_path, monkeypatch, capsys
):
    from gmp_triton.training import run as run_module

    def interrupted(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "train", interrupted)
    monkeypatch.chdir(tmp_path)
    assert run_command("train", "--data", "digits-plain") == 130
    message = capsys.readouterr().err
    assert "no checkpoint was written" in message and "--resume" not in message
    # The run folder the command made for itself is gone again, being empty.
    assert list((tmp_path / "runs").iterdir()) == []


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
    from gmp_triton.training import cli as training_cli

    monkeypatch.chdir(tmp_path)
    folders = [training_cli._new_run_folder() for _ in range(3)]
    assert len(set(folders)) == 3 and all(folder.is_dir() for folder in folders)


def test_resume_can_extend_a_finished_run(tmp_path):
    """Two epochs then one more equals three epochs at once (plain digits: the fastest data)."""
    both = tmp_path / "at_once"
    steps = tmp_path / "in_steps"
    common = ("--data", "digits-plain", "--m-per-class", "8", "--seed", "3")
    assert run_command("train", *common, "--epochs", "3", "--out", both) == 0
    assert run_command("train", *common, "--epochs", "2", "--out", steps) == 0
    assert load_checkpoint(steps)["epoch"] == 2
    assert run_command("train", "--resume", steps, "--epochs", "3") == 0

    at_once, in_steps = load_checkpoint(both), load_checkpoint(steps)
    for name, value in at_once["model"].items():
        assert torch.equal(in_steps["model"][name], value), name
    for key in ("exp_avg", "exp_avg_sq"):
        for index, state in at_once["optimiser"]["state"].items():
            assert torch.equal(in_steps["optimiser"]["state"][index][key], state[key])


def write_digit_folder(root: Path, classes: list[int], per_class: int) -> None:
    """PNG files of the digit scans, one subfolder per digit."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        folder = root / f"digit_{digit}"
        folder.mkdir(parents=True)
        indices = np.flatnonzero(digits.target == digit)[:per_class]
        for index in indices:
            pixels = np.round(digits.images[index] * 255 / 16).astype(np.uint8)
            Image.fromarray(pixels).resize((16, 16), Image.Resampling.NEAREST).save(
                folder / f"{index}.png"
            )


def test_image_folder_training_splits_by_sorted_class_name(tmp_path):
    data = tmp_path / "digits_as_png"
    write_digit_folder(data, [0, 1, 2, 3], per_class=10)
    out = tmp_path / "run"
    argv = ("--data", data, "--image-size", "16", "--m-per-class", "4", "--epochs", "2")
    assert run_command("train", *argv, "--embed-dim", "32", "--out", out) == 0

    config = json.loads((out / "config.json").read_text())
    assert config["train_classes"] == ["digit_0", "digit_1"]
    assert config["eval_classes"] == ["digit_2", "digit_3"]
    metrics = read_metrics(out)
    assert metrics["held_out"] == {"classes": ["digit_2", "digit_3"], "images": 20}
    assert len(metrics["epochs"]) == 2
    model, _, _ = load_model(out, "cpu")
    assert model.embedding_size == 32
    # The projection maps the pooled vector (64 channels) to 32 dimensions, before the norm.
    assert load_checkpoint(out)["model"]["head.projection.weight"].shape == (32, 64)


def test_a_held_out_class_of_one_image_is_warned_about(tmp_path, caplog):
    write_digit_folder(tmp_path / "data", [0, 1, 2], per_class=20)
    write_digit_folder(tmp_path / "data", [3], per_class=1)
    with _backend.cpu_backend("torch"):
        train(
            TrainConfig(data=str(tmp_path / "data"), epochs=1, m_per_class=4, image_size=16),
            tmp_path / "run",
            device="cpu",
        )
    assert "held-out class 'digit_3' has a single image" in caplog.text


def test_a_run_on_an_image_folder_resumes_after_the_folder_moved(tmp_path, capsys):
    write_digit_folder(tmp_path / "data", [0, 1, 2, 3], per_class=20)
    common = ("--m-per-class", "4", "--image-size", "16", "--seed", "2")
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert (
        run_command(
            "train", "--data", tmp_path / "data", *common, "--epochs", "2", "--out", straight
        )
        == 0
    )
    assert (
        run_command("train", "--data", tmp_path / "data", *common, "--epochs", "1", "--out", run)
        == 0
    )
    (tmp_path / "data").rename(tmp_path / "moved")
    assert run_command("train", "--resume", run, "--epochs", "2") == 2  # the old path is gone
    assert "if it moved, give its new place with --data" in capsys.readouterr().err
    assert run_command("train", "--resume", run, "--epochs", "2", "--data", tmp_path / "moved") == 0
    resumed = load_checkpoint(run)
    assert resumed["epoch"] == 2
    assert resumed["config"]["data"] == str((tmp_path / "moved").resolve())
    for name, value in load_checkpoint(straight)["model"].items():
        assert torch.equal(resumed["model"][name], value), name


def test_image_folder_split_can_be_chosen(tmp_path):
    data = tmp_path / "digits_as_png"
    write_digit_folder(data, [0, 1, 2, 3, 4], per_class=6)
    out = tmp_path / "run"
    argv = ("--data", data, "--image-size", "16", "--m-per-class", "4", "--epochs", "1")
    classes = ("--train-classes", "digit_3,digit_0", "--eval-classes", "digit_1,digit_4")
    assert run_command("train", *argv, *classes, "--pool", "avg", "--out", out) == 0
    metrics = read_metrics(out)
    assert metrics["held_out"] == {"classes": ["digit_1", "digit_4"], "images": 12}
    assert json.loads((out / "config.json").read_text())["train_classes"] == ["digit_0", "digit_3"]


def test_read_image_gives_the_pixels_in_unit_range(tmp_path):
    from PIL import Image

    canvas = digit_canvas(0, 12, 2, 3)
    Image.fromarray(canvas).save(tmp_path / "grey.png")
    grey = read_image(tmp_path / "grey.png", "L", None)
    assert grey.shape == (1, 12, 12)
    torch.testing.assert_close(grey[0], torch.from_numpy(canvas).float() / 255)
    colour = read_image(tmp_path / "grey.png", "RGB", 6)
    assert colour.shape == (3, 6, 6)
    assert torch.equal(colour[0], colour[1]) and torch.equal(colour[1], colour[2])


@pytest.mark.parametrize("loss", ["triplet", "contrastive", "proxy-anchor", "arcface"])
def test_every_loss_trains(loss, tmp_path):
    """Two epochs on the plain 8x8 digits: the second ends with a lower mean loss."""
    config = TrainConfig(data="digits-plain", loss=loss, epochs=2, m_per_class=8, seed=0)
    with _backend.cpu_backend("torch"):
        result = train(config, tmp_path / loss, device="cpu")
    first, last = (entry["loss"] for entry in (result.history[0], result.history[-1]))
    assert np.isfinite(first) and np.isfinite(last)
    assert last < first, result.history


@pytest.mark.skipif(
    not (_backend.TRITON_AVAILABLE and _backend.TRITON_INTERPRET),
    reason="needs triton and TRITON_INTERPRET=1 to run the kernels on the CPU",
)
def test_training_steps_through_the_interpreted_kernels_match_the_pytorch_path():
    from gmp_triton.training.data import stack_batch
    from gmp_triton.training.loop import train_one_epoch
    from gmp_triton.training.losses import build_loss
    from gmp_triton.training.model import build_model

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 8, 1, 10, 10, generator=generator)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    batches = [stack_batch(list(zip(batch, labels.tolist(), strict=True))) for batch in images]

    trained = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        model = build_model(1, "max", None, widths=(4, 8))
        loss_fn, miner = build_loss("multi-similarity", 4, model.embedding_size)
        optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
        with _backend.cpu_backend(backend):
            stats = train_one_epoch(model, batches, loss_fn, miner, optimiser, torch.device("cpu"))
        assert stats.batches == 2 and np.isfinite(stats.loss)
        trained[backend] = (stats.loss, model.state_dict())

    assert trained["triton"][0] == pytest.approx(trained["torch"][0], rel=1e-5)
    for name, value in trained["torch"][1].items():
        torch.testing.assert_close(trained["triton"][1][name], value, rtol=1e-4, atol=1e-6)
    # The steps changed the weights, so the comparison above is not between two initial models.
    torch.manual_seed(0)
    initial = build_model(1, "max", None, widths=(4, 8)).state_dict()
    first_conv = "backbone.layers.0.weight"
    assert not torch.equal(initial[first_conv], trained["triton"][1][first_conv])


def test_command_parsers_do_not_import_the_training_dependencies():
    # tqdm is left out: torch.hub imports it whenever it is installed.
    code = (
        "import argparse, sys\n"
        "from gmp_triton.training import cli\n"
        "parser = argparse.ArgumentParser()\n"
        "cli.add_parsers(parser.add_subparsers())\n"
        "print([m for m in ('pytorch_metric_learning', 'sklearn', 'PIL') "
        "if m in sys.modules])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_help_lists_the_commands_and_their_options(capsys):
    for argv, expected in (
        ([], ("train", "evaluate", "embed")),
        (["train"], ("--data", "--pool", "--embed-dim", "--loss", "--resume", "--device")),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--help"])
        assert exit_info.value.code == 0
        shown = capsys.readouterr().out
        assert all(name in shown for name in expected), shown
