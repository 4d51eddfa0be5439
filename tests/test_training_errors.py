"""Bad input to ``train``, ``evaluate`` and ``embed``: one line that names the problem, exit
status 2, no traceback, and nothing trained."""

from pathlib import Path

import numpy as np
import pytest

from gmp_triton import _backend
from gmp_triton.cli import main

pytest.importorskip("pytorch_metric_learning")
pytest.importorskip("PIL")


def write_pngs(folder: Path, count: int, side: int = 12) -> None:
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{index}.png")


def run_failing(capsys, *argv) -> str:
    """Run the command, check that it failed cleanly, and return its one line of error."""
    with _backend.cpu_backend("torch"):
        status = main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    assert status == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert lines[0].startswith(f"gmp-triton {argv[0]}: error: ")
    return lines[0]


def test_missing_data_folder(capsys, tmp_path):
    line = run_failing(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "r")
    assert "does not exist" in line and "nowhere" in line
    assert not (tmp_path / "r").exists()


def test_empty_data_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    line = run_failing(capsys, "train", "--data", tmp_path / "empty", "--out", tmp_path / "r")
    assert "holds no class subfolders" in line


def test_class_folder_without_images(capsys, tmp_path):
    write_pngs(tmp_path / "data" / "a", 4)
    (tmp_path / "data" / "b").mkdir()
    line = run_failing(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "r")
    assert "holds no images" in line and "'" + str(tmp_path / "data" / "b") + "'" in line


def test_single_class(capsys, tmp_path):
    write_pngs(tmp_path / "data" / "cats", 20)
    line = run_failing(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "r")
    assert "single class ('cats')" in line


def test_too_few_classes_for_both_halves(capsys, tmp_path):
    for name in ("a", "b", "c"):
        write_pngs(tmp_path / "data" / name, 20)
    line = run_failing(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "r")
    assert "1 training class" in line and "at least 2" in line


def test_unreadable_image(capsys, tmp_path):
    for name in ("a", "b", "c", "d"):
        write_pngs(tmp_path / "data" / name, 20)
    broken = tmp_path / "data" / "c" / "broken.png"
    broken.write_bytes(b"this is not a PNG file")
    line = run_failing(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "r")
    assert "cannot read image" in line and "broken.png" in line


def test_class_smaller_than_the_sampler_needs(capsys, tmp_path):
    for name, count in (("a", 20), ("b", 3), ("c", 20), ("d", 20)):
        write_pngs(tmp_path / "data" / name, count)
    argv = ("--data", tmp_path / "data", "--m-per-class", "4", "--out", tmp_path / "r")
    line = run_failing(capsys, "train", *argv)
    assert "class 'b' has 3 images" in line and "--m-per-class" in line
    assert not (tmp_path / "r").exists()


def test_embed_dim_zero(capsys, tmp_path):
    line = run_failing(capsys, "train", "--embed-dim", "0", "--out", tmp_path / "r")
    assert "--embed-dim must be a positive integer, got 0" in line


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--epochs", "0"), "--epochs must be a positive integer"),
        (("--batch-size", "20", "--m-per-class", "8"), "not a multiple of --m-per-class"),
        (("--batch-size", "64", "--m-per-class", "8"), "there are 5 training classes"),
        (("--canvas-size", "30", "20"), "--canvas-size 30 20"),
        (("--pool", "gem", "--gem-p", "0"), "--gem-p must be a positive finite number"),
        (("--mixed-sizes", "--data", "digits-plain"), "--mixed-sizes needs --data digits"),
        (("--lr", "-1"), "--lr must be positive"),
        (("--train-classes", "0,1,x"), "no class 'x'"),
        (("--train-classes", "0,1,5", "--eval-classes", "5,6"), "both trained on and held out"),
        (("--seed", "-1"), "--seed must be an integer from 0 to 2**32 - 1, got -1"),
        (("--seed", str(2**32)), "--seed must be an integer from 0 to 2**32 - 1"),
        (("--m-per-class", "1"), "--m-per-class 1 with --loss multi-similarity"),
        (("--gem-p", "4"), "--gem-p sets GeM's exponent: it needs --pool gem, not max"),
        (("--lr", "inf"), "--lr must be positive and finite, got inf"),
        (("--weight-decay", "inf"), "--weight-decay must be 0 or more and finite, got inf"),
        (("--device", "meta"), "--device meta: training runs on cpu or cuda, not meta"),
        (("--eval-classes", "5,5,6"), "names '5' twice"),
        (("--train-classes", "0,,1"), "has an empty name between its commas"),
    ],
)
def test_other_bad_options(capsys, tmp_path, option, message):
    line = run_failing(capsys, "train", *option, "--out", tmp_path / "r")
    assert message in line


def test_diverging_training_stops_with_one_line(capsys, tmp_path):
    argv = ["train", "--data", "digits-plain", "--epochs", "1", "--lr", "1e10"]
    with _backend.cpu_backend("torch"):
        status = main([*argv, "--out", str(tmp_path / "r")])
    captured = capsys.readouterr()
    # Training had started, so its log lines come first; the error is the last line.
    assert status == 2 and "Traceback" not in captured.err, captured.err
    line = captured.err.strip().splitlines()[-1]
    assert line.startswith("gmp-triton train: error: training diverged in epoch 1"), line
    assert "try a lower --lr than 1e+10" in line
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_run_folder_inside_a_file(capsys, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    line = run_failing(capsys, "train", "--data", "digits-plain", "--out", tmp_path / "file" / "r")
    assert "cannot use" in line and str(tmp_path / "file") in line


def test_bench_needs_a_positive_time_budget(capsys, tmp_path):
    line = run_failing(capsys, "bench", "--quick", "--time-budget", "0", "--out", tmp_path / "b")
    assert "--time-budget must be a positive number of seconds, got 0" in line


def test_missing_checkpoint(capsys, tmp_path):
    line = run_failing(capsys, "evaluate", tmp_path / "no_run")
    assert "no checkpoint at" in line
    line = run_failing(capsys, "embed", tmp_path / "no_run", tmp_path / "x.png")
    assert "no checkpoint at" in line


def test_damaged_checkpoint(capsys, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 100)
    line = run_failing(capsys, "evaluate", tmp_path)
    assert "cannot read checkpoint" in line


def test_resume_to_fewer_epochs_than_trained(capsys, tmp_path):
    import torch

    from gmp_triton.training.checkpoint import CHECKPOINT_FORMAT
    from gmp_triton.training.config import TrainConfig

    config = TrainConfig(data="digits-plain", epochs=4).to_dict()
    state = {"format": CHECKPOINT_FORMAT, "config": config, "epoch": 4}
    torch.save(state, tmp_path / "checkpoint.pt")
    line = run_failing(capsys, "train", "--resume", tmp_path, "--epochs", "2")
    assert "has already trained 4 epochs" in line and "give 4 or more" in line


def test_resume_without_a_run(capsys, tmp_path):
    line = run_failing(capsys, "train", "--resume", tmp_path)
    assert "no checkpoint at" in line


def test_checkpoint_whose_weights_do_not_fit_its_settings(capsys, tmp_path):
    """A checkpoint of the earlier head design (a 1x1 convolution before the pooling)."""
    import torch

    from gmp_triton.training.checkpoint import CHECKPOINT_FORMAT
    from gmp_triton.training.config import TrainConfig
    from gmp_triton.training.model import build_model

    weights = build_model(1, "max", None).state_dict()
    weights |= {"head.0.weight": torch.zeros(32, 64, 1, 1), "head.0.bias": torch.zeros(32)}
    config = TrainConfig(data="digits-plain", embed_dim=32, epochs=1).to_dict()
    state = {"format": CHECKPOINT_FORMAT, "config": config, "epoch": 1, "model": weights}
    torch.save(state, tmp_path / "checkpoint.pt")
    line = run_failing(capsys, "evaluate", tmp_path)
    assert "do not fit the model its settings describe" in line and "embed-dim 32" in line


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (("--seeds", "0"), "--seeds must be a positive integer"),
        (("--epochs", "-1"), "--epochs must be a positive integer"),
        (("--small-canvas", "20", "10"), "--small-canvas 20 10: need 8 <= MIN <= MAX"),
        (("--canvas", "4", "10"), "--canvas 4 10: need 8 <= MIN <= MAX"),
        (("--shift-canvas", "10"), "leaves no room to move an 8-pixel digit"),
        (("--test-noise", "-0.1"), "--test-noise must be 0 or more"),
    ],
)
def test_bad_experiment_options(capsys, tmp_path, option, message):
    line = run_failing(capsys, "experiment", *option, "--out", tmp_path / "e")
    assert message in line
    assert not (tmp_path / "e").exists()


def test_experiment_refuses_a_folder_with_results(capsys, tmp_path):
    (tmp_path / "results.json").write_text("{}")
    line = run_failing(capsys, "experiment", "--out", tmp_path)
    assert "already holds an experiment's results" in line
